"""JUnit XML of a conformance report: one testcase per case, for CI systems that collect JUnit."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from nemoh.output import atomic_write


def junit_xml(report: dict[str, Any]) -> str:
    root = ET.Element("testsuites", name=f"nemoh conformance {report['model']['name']}")
    for run in report["runs"]:
        by_suite: dict[str, list] = {}
        for r in run["results"]:
            by_suite.setdefault(r["suite"], []).append(r)
        for suite, results in by_suite.items():
            ts = ET.SubElement(root, "testsuite", name=f"{run['spec']}.{run['dtype']}.{suite}",
                               tests=str(len(results)),
                               failures=str(sum(r["status"] == "FAIL" for r in results)),
                               skipped=str(sum(r["status"] in ("SKIPPED", "NOT_SUPPORTED") for r in results)),
                               time=f"{sum(r['duration_s'] for r in results):.3f}")
            for r in results:
                tc = ET.SubElement(ts, "testcase", classname=f"{run['spec']}.{run['dtype']}.{suite}", name=r["id"],
                                   time=f"{r['duration_s']:.3f}")
                metrics = "\n".join(f"{m['label']} {m['name']} = {m['value_repr']} (tolerance {m['tolerance']})"
                                    for m in r["metrics"])
                if r["status"] == "FAIL":
                    loc = r.get("localisation") or {}
                    where = f"\nfirst diverging: layer {loc.get('layer')} ({loc.get('kind')}), op {loc.get('op')}" \
                        if loc.get("found") else ""
                    f = ET.SubElement(tc, "failure", message=r["message"] or "FAIL")
                    f.text = metrics + where
                elif r["status"] in ("SKIPPED", "NOT_SUPPORTED"):
                    ET.SubElement(tc, "skipped", message=f"{r['status']}: {r['message']}")
                if metrics:
                    ET.SubElement(tc, "system-out").text = metrics
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def write_junit(report: dict[str, Any], path: Path) -> None:
    atomic_write(path, junit_xml(report))

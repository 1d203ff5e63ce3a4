"""Reading the reports to compare: the kind from the schema, and checks that the report is whole and
consistent with itself, so a truncated or hand-edited report is refused (one line) instead of compared."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemoh.errors import NemohError

#: schema family -> kind
KINDS = {"nemoh-conformance": "conformance", "nemoh-bench": "bench"}
STATUSES = ("OK", "FAIL", "NOT_SUPPORTED", "SKIPPED")


@dataclass(frozen=True)
class Report:
    path: Path
    kind: str  # conformance | bench
    schema: str  # e.g. nemoh-conformance/2
    data: dict[str, Any]

    @property
    def model(self) -> str:
        return str(self.data["model"]["name"])

    @property
    def key(self) -> str:
        """What a folder pairs by: the kind and the model."""
        return f"{self.model} ({self.kind})"


class NotAReport(NemohError):
    """A JSON file that is not a nemoh run report (skipped inside folders)."""


def schema_of(data: Any) -> str | None:
    if not isinstance(data, dict):
        return None
    s = data.get("schema", data.get("format"))
    return s if isinstance(s, str) and s.split("/")[0] in KINDS else None


def read_report(path: Path) -> Report:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise NemohError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise NemohError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}): "
                         "a truncated or damaged report?") from None
    schema = schema_of(data)
    if schema is None:
        raise NotAReport(f"{path}: not a nemoh report (no 'schema' nemoh-conformance/N or 'format' nemoh-bench/N)")
    kind = KINDS[schema.split("/")[0]]
    try:
        (_check_conformance if kind == "conformance" else _check_bench)(data)
    except (KeyError, TypeError, IndexError, AttributeError) as e:
        raise NemohError(f"{path}: a {schema} report without the expected structure "
                         f"({type(e).__name__}: {e}): truncated or edited by hand?") from None
    except NemohError as e:
        raise NemohError(f"{path}: {e}") from None
    return Report(path, kind, schema, data)


def _close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-300)


def _check_conformance(r: dict[str, Any]) -> None:
    for k in ("model", "environment", "tolerances", "runs", "summary", "complete"):
        if k not in r:
            raise NemohError(f"field '{k}' is missing: truncated or edited by hand?")
    if r["complete"] is not True:
        raise NemohError(f"an incomplete run (complete: false; {r.get('aborted') or 'cut short or killed'}): "
                         "compare finished runs only")
    str(r["model"]["name"])
    tally = dict.fromkeys(STATUSES, 0)
    for i, run in enumerate(r["runs"]):
        str(run["backend"]), str(run["dtype"])
        for j, res in enumerate(run["results"]):
            if res["status"] not in STATUSES:
                raise NemohError(f"runs[{i}].results[{j}]: unknown status {res['status']!r}")
            tally[res["status"]] += 1
            for m in res["metrics"]:
                v, rep = m["value"], m["value_repr"]
                try:
                    shown = float(rep)
                except (TypeError, ValueError):
                    continue
                if v is not None and math.isfinite(shown) and not _close(float(v), shown, 1e-2):
                    raise NemohError(f"runs[{i}].results[{j}] ({res['id']}): {m['name']} value {v!r} does not "
                                     f"match the value_repr {rep!r} written with it: edited by hand?")
    counts = r["summary"]["counts"]
    if any(counts.get(s) != tally[s] for s in STATUSES):
        said = ", ".join(f"{s}={counts.get(s)}" for s in STATUSES)
        seen = ", ".join(f"{s}={tally[s]}" for s in STATUSES)
        raise NemohError(f"summary.counts ({said}) disagree with the cases ({seen}): edited by hand?")


def _check_stats(where: str, st: Any) -> None:
    """A timing summary must agree with the samples it summarises (what the comparison resamples)."""
    if not isinstance(st, dict) or "samples" not in st:
        return
    xs = [float(x) for x in st["samples"]]
    if len(xs) != st["n"] or not xs:
        raise NemohError(f"{where}: n={st['n']} but {len(xs)} samples: edited by hand?")
    s = sorted(xs)
    r = 0.5 * (len(s) - 1)
    lo = math.floor(r)
    p50 = s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (r - lo)
    for k, v in (("p50", p50), ("mean", sum(xs) / len(xs)), ("min", s[0]), ("max", s[-1])):
        if k in st and not _close(v, float(st[k]), 1e-6):
            raise NemohError(f"{where}: {k} {st[k]!r} does not match its samples ({v!r}): edited by hand?")


def _check_bench(r: dict[str, Any]) -> None:
    for k in ("model", "environment", "device", "settings", "backends", "clock"):
        if k not in r:
            raise NemohError(f"field '{k}' is missing: truncated or edited by hand?")
    str(r["model"]["name"])
    for b in r["backends"]:
        str(b["name"]), str(b["status"])
        for part in ("prefill", "decode"):
            for i, w in enumerate(b[part]):
                for k in ("ttft_seconds", "tpot_seconds", "tokens_per_second"):
                    _check_stats(f"backend {b['name']} {part}[{i}].{k}", w.get(k))


def collect(path: Path) -> tuple[dict[str, Report], list[str]]:
    """key -> report for a file or every nemoh report in a folder; and the files skipped as not reports."""
    if not path.exists():
        raise NemohError(f"{path}: no such file or folder")
    if path.is_file():
        rep = read_report(path)
        return {rep.key: rep}, []
    found: dict[str, Report] = {}
    skipped = []
    for p in sorted(path.glob("*.json")):
        try:
            rep = read_report(p)
        except NotAReport:
            skipped.append(p.name)
            continue
        if rep.key in found:
            raise NemohError(f"{path}: two reports of {rep.key}: {found[rep.key].path.name} and {p.name}")
        found[rep.key] = rep
    if not found:
        raise NemohError(f"{path}: no nemoh reports (*.json with schema nemoh-conformance/N or nemoh-bench/N)")
    return found, skipped

"""The history of a folder of successive runs (one per commit): each headline figure over the runs, with
the steps asv-style step detection finds. Conformance: per model and backend/dtype, the worst judged
metric's share of its tolerance and the FAIL count; bench: per model and backend, tok/s p50 per prompt
length, TPOT p50 per depth, the ratio to the reference and peak memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nemoh.errors import NemohError

from . import stats
from .load import NotAReport, Report, read_report

SCHEMA = "nemoh-history/1"


def _runs(folder: Path) -> list[list[Report]]:
    """One list of reports per run: a sub-folder per run, or else a file per run; in time order."""
    if not folder.is_dir():
        raise NemohError(f"{folder}: not a folder of reports")
    subs = sorted(p for p in folder.iterdir() if p.is_dir() and any(p.glob("*.json")))
    groups = [sorted(p.glob("*.json")) for p in subs] if subs else [[p] for p in sorted(folder.glob("*.json"))]
    runs = []
    for files in groups:
        reps = []
        for f in files:
            try:
                reps.append(read_report(f))
            except NotAReport:
                continue
        if reps:
            runs.append(reps)
    if len(runs) < 1:
        raise NemohError(f"{folder}: no nemoh reports")
    runs.sort(key=lambda reps: min(str(r.data["environment"].get("started", "")) for r in reps))
    return runs


def _figures(r: Report) -> dict[tuple[str, str, str], float | None]:
    """(series, unit, direction) -> value, for one report."""
    d, m, out = r.data, r.model, {}
    if r.kind == "conformance":
        for run in d["runs"]:
            key = f"{m} {run['backend']}/{run['dtype']}"
            ran = [x for x in run["results"] if x["status"] in ("OK", "FAIL")]
            if not ran:
                continue
            shares = [mm.get("badness") for x in ran for mm in x["metrics"] if mm.get("tolerance") is not None]
            out[(f"{key}: worst metric, % of tolerance", "%", "lower")] = (
                None if any(s is None for s in shares) else max([0.0, *shares]) * 100)
            out[(f"{key}: FAIL cases", "cases", "lower")] = float(sum(x["status"] == "FAIL" for x in ran))
        return out
    for b in d["backends"]:
        key = f"{m} {b['name']}"
        for w in b.get("prefill", []):
            out[(f"{key}: prefill tok/s T={w['prompt_length']}", "tok/s", "higher")] = (
                (w.get("tokens_per_second") or {}).get("p50"))
            if not b.get("is_reference") and w.get("ratio_to_reference") is not None:
                out[(f"{key}: prefill x ref T={w['prompt_length']}", "x", "higher")] = w["ratio_to_reference"]
        for w in b.get("decode", []):
            out[(f"{key}: TPOT S={w['context_depth']}", "s", "lower")] = (w.get("tpot_seconds") or {}).get("p50")
            if not b.get("is_reference") and w.get("ratio_to_reference") is not None:
                out[(f"{key}: decode x ref S={w['context_depth']}", "x", "higher")] = w["ratio_to_reference"]
        peaks = [w.get("peak_memory_bytes") for w in [*b.get("prefill", []), *b.get("decode", [])]]
        if any(peaks):
            out[(f"{key}: peak memory", "bytes", "lower")] = float(max(p for p in peaks if p))
    return out


def history(folder: Path) -> dict[str, Any]:
    runs = _runs(folder)
    per_run = []
    for reps in runs:
        figs: dict[tuple[str, str, str], float | None] = {}
        for r in reps:
            figs.update(_figures(r))
        per_run.append(figs)
    keys = sorted({k for f in per_run for k in f})
    series = []
    for k in keys:
        values = [f.get(k) for f in per_run]
        series.append({"name": k[0], "unit": k[1], "better": k[2], "values": values,
                       "steps": stats.steps(values)})
    # series with a step first: what a reader looks for
    series.sort(key=lambda s: (not s["steps"], s["name"]))
    info = [{"files": [str(r.path) for r in reps], "started": min(str(r.data["environment"].get("started", ""))
                                                                   for r in reps),
             "commit": reps[0].data["environment"].get("git_commit")} for reps in runs]
    return {"schema": SCHEMA, "folder": str(folder), "runs": info, "series": series}

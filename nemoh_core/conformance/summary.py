"""The run's summary, computed once from the results so that every report only renders it: the
counts, the exit code, the status matrix, and what a reader needs first:

  cells            per backend/dtype column and suite: the status, the count of each status, and the
                   judged metric furthest from its tolerance (by its `badness`);
  failure_groups   the FAILs grouped by where they start (first diverging layer and op, the first
                   carried state that diverges when every layer is within tolerance, or the reason
                   they could not be localised), each group listing its cases (with the side of an
                   equivalence case, e.g. the split, that localised it), so a bug that fails nine
                   cases on nine different splits is shown once;
  failing_suites   the suites with a FAIL, each once; failing_columns the backend/dtype columns with one;
  not_run          per column, each distinct NOT_SUPPORTED / SKIPPED reason once, with its count.
"""

from __future__ import annotations

from typing import Any

from nemoh.conformance.case import Status
from nemoh.conformance.localise import diverging_state

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_NOTHING_CHECKED, EXIT_ABORTED = 0, 1, 2, 3, 4  # see nemoh.cli's help

STATUSES = ("OK", "FAIL", "NOT_SUPPORTED", "SKIPPED")


def stored_badness(metric: dict[str, Any]) -> float:
    """The badness the case computed (nemoh.conformance.case.badness), read back from the JSON."""
    b = metric.get("badness")
    return float("inf") if b is None else b  # null in the JSON: NaN, or past a zero tolerance


def column(run: dict[str, Any]) -> str:
    return f"{run['spec']}/{run['dtype']}"


def cells(report: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for run in report["runs"]:
        col = out.setdefault(column(run), {})
        for x in run["results"]:
            c = col.setdefault(x["suite"], {"counts": dict.fromkeys(STATUSES, 0), "worst_metric": None, "cases": 0})
            c["counts"][x["status"]] += 1
            c["cases"] += 1
            w = x.get("worst_metric")
            if w and w.get("tolerance") is not None and (c["worst_metric"] is None
                                                        or stored_badness(w) > stored_badness(c["worst_metric"])):
                c["worst_metric"] = {**w, "case": x["id"]}
        for c in col.values():
            n = c["counts"]
            c["status"] = next(s for s in ("FAIL", "NOT_SUPPORTED", "SKIPPED", "OK") if n[s])  # the worst
    return out


def _where(x: dict[str, Any]) -> tuple[str, dict[str, Any] | None, str | None, dict[str, Any] | None]:
    """(where the FAIL starts, without the side; its localisation; the side that localised it; the carried
    state that diverges when every layer is within tolerance, else None)."""
    loc = x.get("localisation") or {}
    side = loc.get("side") or None
    if loc.get("non_finite"):
        return loc["non_finite"]["message"], loc, side, None
    if loc.get("found"):
        return f"layer {loc['layer']} ({loc['kind']}), op {loc['op']}", loc, side, None
    if loc.get("available") and loc.get("message"):
        state = diverging_state(x.get("metrics") or [])
        if state is not None:
            return state["where"], loc, state["side"] or side, state
        return "every layer within tolerance in isolation: embedding, head, or accumulated error", loc, side, None
    source = (x.get("details") or {}).get("error_source")
    if source:
        return f"an error raised by the {source}", None, None, None
    return "not localised", loc or None, side, None


def failure_groups(report: dict[str, Any]) -> list[dict[str, Any]]:
    groups: dict[str, dict[str, Any]] = {}
    for run in report["runs"]:
        for x in run["results"]:
            if x["status"] != "FAIL":
                continue
            where, loc, side, state = _where(x)
            g = groups.setdefault(where, {"where": where, "localisation": loc, "state": state, "cases": [],
                                          "suites": [], "sides": []})
            g["cases"].append({"column": column(run), "id": x["id"], "suite": x["suite"], "message": x["message"],
                               "side": side})
            if x["suite"] not in g["suites"]:
                g["suites"].append(x["suite"])
            if side and side not in g["sides"]:
                g["sides"].append(side)
    return sorted(groups.values(), key=lambda g: -len(g["cases"]))


def failing_suites(report: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for run in report["runs"]:
        for x in run["results"]:
            if x["status"] == "FAIL" and x["suite"] not in out:
                out.append(x["suite"])
    return out


def failing_columns(report: dict[str, Any]) -> list[str]:
    """The backend/dtype columns with a FAIL (their cases are shown open)."""
    return [column(run) for run in report["runs"] if any(x["status"] == "FAIL" for x in run["results"])]


def not_run(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for run in report["runs"]:
        reasons: dict[tuple[str, str], int] = {}
        for x in run["results"]:
            if x["status"] in ("NOT_SUPPORTED", "SKIPPED"):
                key = (x["status"], x["message"])
                reasons[key] = reasons.get(key, 0) + 1
        if reasons:
            out[column(run)] = [{"status": s, "reason": m, "cases": n} for (s, m), n in reasons.items()]
    return out


def views(report: dict[str, Any]) -> dict[str, Any]:
    """The views, to be stored in the report's `summary`."""
    return {"cells": cells(report), "failure_groups": failure_groups(report), "failing_suites": failing_suites(report),
            "failing_columns": failing_columns(report), "not_run": not_run(report)}


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """Counts, the exit code, the status matrix and the views above, for the report's `summary`."""
    counts = dict.fromkeys((s.value for s in Status), 0)
    for run in report["runs"]:
        for r in run["results"]:
            counts[r["status"]] += 1
    executed = counts["OK"] + counts["FAIL"]
    if report.get("aborted"):
        code = EXIT_ABORTED
    elif counts["FAIL"]:
        code = EXIT_FAIL
    elif executed == 0:
        code = EXIT_NOTHING_CHECKED
    else:
        code = EXIT_OK
    out = views(report)
    matrix = {col: {suite: c["status"] for suite, c in row.items()} for col, row in out["cells"].items()}
    return {"counts": counts, "matrix": matrix, "executed": executed, "passed": code == EXIT_OK, "exit_code": code,
            **out}

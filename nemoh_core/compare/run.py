"""Pairing two reports or two folders of reports, and the rules that make a change a regression.

Rules (`--fail-on`, comma-separated): `new-fail` (default: a case that newly FAILs, or a bench gate that
newly says WRONG or ERROR), `drift=X` (a judged metric whose share of its tolerance grew by more than X
percentage points, or became non-finite), `slowdown=Y` (a speed figure slower by more than Y% and
significantly so, on the valid comparison: absolute on the same device and clock, else the in-run ratio
to the reference; data too noisy to tell never counts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nemoh.errors import NemohError, did_you_mean

from . import bench, conformance
from .load import Report, collect

SCHEMA = "nemoh-compare/1"
RULES = ("new-fail", "drift", "slowdown")
DRIFT_FLAG = 10.0  # percentage points of tolerance: drift shown as a flag even when no rule fails on it


def parse_rules(text: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, val = part.partition("=")
        if name not in RULES:
            raise NemohError("--fail-on: " + did_you_mean("rule", name, RULES)
                             + " (e.g. new-fail,drift=25,slowdown=10)")
        if name == "new-fail":
            if val:
                raise NemohError("--fail-on: new-fail takes no value")
            out.append({"rule": name, "threshold_pct": None})
            continue
        try:
            x = float(val)
        except ValueError:
            raise NemohError(f"--fail-on: {name} needs a percentage, e.g. {name}=10 (got {val!r})") from None
        if not 0 < x < (100 if name == "slowdown" else 1e6):
            raise NemohError(f"--fail-on: {name}={val} is out of range")
        out.append({"rule": name, "threshold_pct": x})
    if not out:
        raise NemohError("--fail-on: no rule given (new-fail, drift=X, slowdown=Y)")
    return out


def _pair(base: Path, new: Path, allow_different_model: bool) -> tuple[list[tuple[Report, Report]], dict[str, Any]]:
    rb, skipped_b = collect(base)
    rn, skipped_n = collect(new)
    only_b: list[str] = []
    only_n: list[str] = []
    if not base.is_dir() and not new.is_dir():  # two files: compared whatever they hold (checked below)
        pairs = [(next(iter(rb.values())), next(iter(rn.values())))]
    else:  # folders (or a file and a folder): paired by kind and model
        pairs = [(rb[k], rn[k]) for k in sorted(set(rb) & set(rn))]
        only_b, only_n = sorted(set(rb) - set(rn)), sorted(set(rn) - set(rb))
        if not pairs:
            raise NemohError(f"{base} and {new} have no model in common (base: {', '.join(sorted(rb))}; "
                             f"new: {', '.join(sorted(rn))})")
    for b, n in pairs:
        if b.kind != n.kind:
            raise NemohError(f"{b.path} is a {b.kind} report and {n.path} a {n.kind} report: nothing to compare")
        if b.schema != n.schema:
            raise NemohError(f"different schemas: {b.path} is {b.schema}, {n.path} is {n.schema} "
                             "(regenerate the baseline with this nemoh)")
        if b.model != n.model and not allow_different_model:
            raise NemohError(f"different models: {b.path} is {b.model!r}, {n.path} is {n.model!r} "
                             "(--allow-different-model to compare them anyway)")
    return pairs, {"only_in_base": only_b, "only_in_new": only_n, "skipped": skipped_b + skipped_n}


def _bench_verdicts(c: dict[str, Any], rules: dict[str, float | None]) -> tuple[list[str], list[str]]:
    regs: list[str] = []
    flags: list[str] = []
    basis = c["validity"]["basis"]
    for g in c["gates"]:
        if g["newly_wrong"]:
            what = f"{g['backend']} {g['window']}: gate {g['base']} -> {g['new']}"
            (regs if "new-fail" in rules else flags).append(what)
        elif g["changed"]:
            flags.append(f"{g['backend']} {g['window']}: gate {g['base']} -> {g['new']}")
    slow = rules.get("slowdown")
    if basis == "none" and any(f["what"] == "speed" for b in c["backends"] for f in b["figures"]):
        flags.append(f"speed not judged: {c['validity']['text']}")
    for b in c["backends"]:
        for f in b["figures"]:
            if f["what"] == "speed" and basis != "absolute" and (basis == "none" or f["vs_ref"] is None):
                f["verdict"] = {"basis": "none", "class": "inconclusive", "why": c["validity"]["text"]}
                continue
            use = f if f["what"] != "speed" or basis == "absolute" else f["vs_ref"]
            f["verdict"] = {"basis": "absolute" if use is f else "ratio to reference",
                            "class": use["class"], "why": use["why"]}
            what = f"{b['backend']} {f['figure']}: {use['class']} ({f['verdict']['basis']}: {use['why']})"
            # on the absolute basis the in-run ratio must agree: a slowdown the reference shares is the machine
            shared = use is f and f["vs_ref"] is not None and f["vs_ref"]["class"] != "regressed"
            hit = (f["what"] == "speed" and slow is not None and use["class"] == "regressed" and not shared
                   and not b["is_reference"]  # the reference is not under test: its speed is context
                   and use["goodness"] < 1 - slow / 100 and use["ci"] is not None and use["ci"][1] < 1)
            if shared and use["class"] == "regressed":
                what += "; not counted: the reference slowed down with it (its in-run ratio did not regress)"
            if hit:
                regs.append(what)
            elif use["class"] in ("regressed", "improved") or (f["what"] == "speed" and use["class"] == "inconclusive"):
                flags.append(what)
    return regs, flags


def _conformance_verdicts(c: dict[str, Any], rules: dict[str, float | None]) -> tuple[list[str], list[str]]:
    regs: list[str] = []
    flags: list[str] = []
    for case in c["changes"]["new_fail"]:
        what = f"{case['run']} {case['case']}: {case['base'] or 'new case'} -> FAIL"
        (regs if "new-fail" in rules else flags).append(what)
    drift = rules.get("drift")
    for m in c["metrics"]:
        what = f"{m['run']} {m['case']}: {m['label']}: {m['text']}"
        if drift is not None and m["judged"] and (m["drift"] is None or m["drift"] * 100 > drift):
            regs.append(what)
        elif m["flagged"]:
            flags.append(what)
    for key in ("status_changed", "appeared", "disappeared"):
        for case in c["changes"][key]:
            if case["new"] != "FAIL":
                flags.append(f"{case['run']} {case['case']}: {case['base'] or 'absent'} -> {case['new'] or 'absent'}")
    for loc in c["localisation"]:
        flags.append(f"{loc['run']} {loc['case']}: first divergence {loc['base'] or '-'} -> {loc['new'] or '-'}")
    return regs, flags


def compare_paths(base: Path, new: Path, fail_on: str = "new-fail", allow_different_model: bool = False,
                  drift_flag_pct: float = DRIFT_FLAG) -> dict[str, Any]:
    rules = parse_rules(fail_on)
    by_rule = {r["rule"]: r["threshold_pct"] for r in rules}
    pairs, extra = _pair(base, new, allow_different_model)
    comparisons = []
    for b, n in pairs:
        try:
            if b.kind == "conformance":
                c = conformance.compare(b, n, drift_flag_pct / 100)
                regs, flags = _conformance_verdicts(c, by_rule)
            else:
                c = bench.compare(b, n)
                regs, flags = _bench_verdicts(c, by_rule)
        except (KeyError, TypeError, IndexError, AttributeError) as e:
            raise NemohError(f"{b.path} / {n.path}: a field the comparison needs is missing or malformed "
                             f"({type(e).__name__}: {e}): edited by hand?") from None
        c["regressions"], c["flags"] = regs, flags
        comparisons.append(c)
    n_reg = sum(len(c["regressions"]) for c in comparisons)
    if n_reg:
        first = next(c for c in comparisons if c["regressions"])
        headline = (f"REGRESSION ({n_reg}): {first['model']} ({first['kind']}): {first['regressions'][0]}"
                    + (f" and {n_reg - 1} more" if n_reg > 1 else ""))
    else:
        n_flags = sum(len(c["flags"]) for c in comparisons)
        headline = f"no regression by {fail_on}" + (f" ({n_flags} changes flagged)" if n_flags else "")
    return {"schema": SCHEMA, "base": str(base), "new": str(new), "rules": rules,
            "drift_flag_pct": drift_flag_pct, "comparisons": comparisons, **extra,
            "verdict": {"regressed": bool(n_reg), "exit_code": 1 if n_reg else 0, "regressions": n_reg,
                        "headline": headline}}

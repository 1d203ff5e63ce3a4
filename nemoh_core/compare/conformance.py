"""The difference between two conformance reports of one model: cases that newly FAIL or pass, that
appeared, disappeared or changed status; every metric's drift as a share of its tolerance (the report's
own `badness`: value against tolerance, 1 = at the tolerance); the first diverging layer/op; and the
environment next to it (packages, device, commit, tolerance table, deviation measurements)."""

from __future__ import annotations

from typing import Any

from nemoh import display

from .load import Report


def _cases(r: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(backend/dtype, case id) -> result."""
    return {(f"{run['backend']}/{run['dtype']}", res["id"]): res for run in r["runs"] for res in run["results"]}


def _where(loc: Any) -> str | None:
    if not isinstance(loc, dict) or not loc.get("found"):
        return None
    where = f"layer {loc.get('layer')} ({loc.get('kind')})"
    return f"{where}, op {loc['op']}" if loc.get("op") else where


def _share(b: Any) -> float | None:
    """badness as a share of tolerance; None: non-finite (infinitely bad)."""
    return None if b is None else float(b)


def _pct(s: float | None) -> str:
    return "inf" if s is None else f"{s * 100:.3g}%"


def metric_text(name: str, vb: Any, vn: Any, tol: Any, sb: float | None, sn: float | None) -> str:
    """'logits_nmse 3e-4 -> 1.2e-2 of 5e-2 (0.6% -> 24% of tolerance)'."""
    text = f"{name} {display.num(vb)} -> {display.num(vn)}"
    if tol is None:
        return text + " (not judged)"
    return text + f" of {display.num(tol)} ({_pct(sb)} -> {_pct(sn)} of tolerance)"


def _diff(a: dict[str, Any], b: dict[str, Any], keys: list[str] | None = None) -> list[dict[str, Any]]:
    keys = keys if keys is not None else sorted(set(a) | set(b))
    return [{"name": k, "base": a.get(k), "new": b.get(k)} for k in keys if a.get(k) != b.get(k)]


DEVICE_KEYS = ["platform", "machine", "cpu_count", "torch_threads", "cuda_available", "cuda", "python"]
#: describe() entries that differ on every run and say nothing about the environment (the onnx backend's
#: temporary model file)
RUN_LOCAL_KEYS = ("torch", "model_file")


def environment(rb: dict[str, Any], rn: dict[str, Any]) -> dict[str, Any]:
    eb, en = rb["environment"], rn["environment"]
    device = _diff(eb, en, DEVICE_KEYS)
    db = {f"{r['backend']}/{r['dtype']}": r.get("describe", {}) for r in rb["runs"]}
    dn = {f"{r['backend']}/{r['dtype']}": r.get("describe", {}) for r in rn["runs"]}
    for k in sorted(set(db) & set(dn)):
        device += [{"name": f"{k} {d['name']}", "base": d["base"], "new": d["new"]}
                   for d in _diff(db[k], dn[k]) if d["name"] not in RUN_LOCAL_KEYS]
    tb = {f"{t['metric']} @ {t['dtype']}": t["value"] for t in rb["tolerances"]}
    tn = {f"{t['metric']} @ {t['dtype']}": t["value"] for t in rn["tolerances"]}
    devs = []
    mb = {d["id"]: d.get("measured") or {} for d in rb.get("deviations", [])}
    mn = {d["id"]: d.get("measured") or {} for d in rn.get("deviations", [])}
    for i in sorted(set(mb) | set(mn)):
        devs += [{"name": f"{i}: {d['name']}", "base": d["base"], "new": d["new"]}
                 for d in _diff(mb.get(i, {}), mn.get(i, {}))]
    packages = _diff(eb.get("packages", {}), en.get("packages", {}))
    commit = {"base": eb.get("git_commit"), "new": en.get("git_commit")}
    return {"same": not (device or packages or tb != tn),
            "commit": commit, "packages": packages, "device": device,
            "tolerances": _diff(tb, tn), "deviations": devs}


def compare(base: Report, new: Report, drift_flag: float) -> dict[str, Any]:
    rb, rn = base.data, new.data
    cb, cn = _cases(rb), _cases(rn)
    changes: dict[str, list[dict[str, Any]]] = {k: [] for k in
                                                ("new_fail", "new_pass", "appeared", "disappeared", "status_changed")}
    metrics, local = [], []
    unchanged = 0
    for key in sorted(set(cb) | set(cn)):
        b, n = cb.get(key), cn.get(key)
        sb, sn = b and b["status"], n and n["status"]
        case = {"run": key[0], "case": key[1], "base": sb, "new": sn,
                "message": (n or b or {}).get("message", "")}
        if b is None:
            changes["appeared"].append(case)
        elif n is None:
            changes["disappeared"].append(case)
        elif sb != sn:
            changes["status_changed"].append(case)
        if sn == "FAIL" and sb != "FAIL":
            changes["new_fail"].append(case)
        if sb == "FAIL" and sn == "OK":
            changes["new_pass"].append(case)
        if b is None or n is None:
            continue
        wb, wn = _where(b.get("localisation")), _where(n.get("localisation"))
        if wb != wn:
            local.append({"run": key[0], "case": key[1], "base": wb, "new": wn})
        mb = {(m["name"], m["label"]): m for m in b["metrics"]}
        for mk, mn in {(m["name"], m["label"]): m for m in n["metrics"]}.items():
            m0 = mb.get(mk)
            if m0 is None:
                continue
            if m0["value"] == mn["value"] and m0["tolerance"] == mn["tolerance"]:
                unchanged += 1
                continue
            judged = mn["tolerance"] is not None and m0["tolerance"] is not None
            s0, s1 = (_share(m0.get("badness")), _share(mn.get("badness"))) if judged else (None, None)
            drift: float | None = 0.0
            if judged:
                if s1 is None:
                    drift = 0.0 if s0 is None else None  # None: became non-finite, infinitely worse
                else:
                    drift = s1 - s0 if s0 is not None else -1.0  # from non-finite to finite: better
            flagged = judged and (drift is None or drift > drift_flag)
            metrics.append({"run": key[0], "case": key[1], "metric": mk[0], "label": mk[1],
                            "base": m0["value"], "new": mn["value"], "tolerance": mn["tolerance"],
                            "base_share": s0, "new_share": s1, "drift": drift, "judged": judged,
                            "flagged": bool(flagged),
                            "text": metric_text(mk[0], m0["value"], mn["value"], mn["tolerance"], s0, s1)})
    metrics.sort(key=lambda m: (not m["flagged"], -(1e300 if m["drift"] is None else m["drift"])))
    counts = {"base": rb["summary"]["counts"], "new": rn["summary"]["counts"]}
    return {"kind": "conformance", "model": new.model, "base_model": base.model, "schema": new.schema,
            "files": {"base": str(base.path), "new": str(new.path)},
            "counts": counts, "changes": changes, "metrics": metrics, "metrics_unchanged": unchanged,
            "localisation": local, "environment": environment(rb, rn)}

"""The difference between two nemoh-bench reports of one model: for each figure (prefill tok/s per T, TPOT
per depth, peak memory, state bytes) new/base with a bootstrap interval from the repetitions both runs kept,
and the same for the in-run ratio to the reference; which comparison is valid (absolute times only on the
same device, clock and a quiet host; otherwise only the ratios); and every correctness-gate status change."""

from __future__ import annotations

from typing import Any

from nemoh import display

from . import stats
from .load import Report

BAD_GATES = ("WRONG", "ERROR")
BUSY = 0.25  # CPU share used by other processes above which absolute times are not comparable
DEVICE_KEYS = ("type", "name", "memory_total_bytes", "cpu_count", "torch_threads", "datasheet_key")


def validity(rb: dict[str, Any], rn: dict[str, Any]) -> dict[str, Any]:
    """Which comparison is valid: absolute figures on the same device and clock; otherwise only the
    in-run ratios to the reference; neither when a host was busy (timings taken while other processes
    held the CPU say more about them than about the executor)."""
    why, busy = [], []
    for k in DEVICE_KEYS:
        if rb["device"].get(k) != rn["device"].get(k):
            why.append(f"device {k} {rb['device'].get(k)} -> {rn['device'].get(k)}")
    if rb["clock"] != rn["clock"]:
        why.append(f"clock {rb['clock']} -> {rn['clock']}")
    for side, r in (("base", rb), ("new", rn)):
        f = r["environment"].get("cpu_foreign_fraction")
        if isinstance(f, (int, float)) and f > BUSY:
            busy.append(f"{side} host busy ({f * 100:.0f}% of the CPU used by other processes)")
    has_ref = rb.get("reference") not in (None, "none") and rn.get("reference") not in (None, "none")
    if busy:
        basis, text = "none", ("timings not trusted: " + "; ".join(busy) + f" (over {BUSY * 100:.0f}%): "
                               "speed is shown, never called improved or regressed")
    elif not why:
        basis, text = "absolute", "same device and clock on a quiet host: absolute figures and ratios both compare"
    else:
        basis = "ratios" if has_ref else "none"
        text = ("absolute times do not compare (" + "; ".join(why) + "): "
                + ("only the in-run ratios to the reference do" if has_ref
                   else "and there is no reference to divide by"))
    return {"absolute": basis == "absolute", "basis": basis, "why": why + busy, "text": text}


def _windows(b: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {f"prefill T={w['prompt_length']}": w for w in b.get("prefill", [])}
    out.update({f"decode S={w['context_depth']}": w for w in b.get("decode", [])})
    return out


def _samples(w: dict[str, Any]) -> list[float]:
    st = w.get("tokens_per_second") or {}
    return [float(x) for x in st.get("samples", []) if x and x > 0]


def _spread(w: dict[str, Any]) -> float | None:
    v = (w.get("tokens_per_second") or {}).get("spread")
    return None if v is None else float(v)


def _speed(name: str, wb: dict[str, Any], wn: dict[str, Any], rb: dict[str, Any] | None,
           rn: dict[str, Any] | None) -> dict[str, Any] | None:
    xb, xn = _samples(wb), _samples(wn)
    if not xb or not xn:
        return None
    decode = name.startswith("decode")
    key = "tpot_seconds" if decode else "tokens_per_second"
    shown = {"base": (wb.get(key) or {}).get("p50"), "new": (wn.get(key) or {}).get("p50"),
             "unit": "s/token (TPOT p50)" if decode else "tok/s p50"}
    g, lo, hi = stats.bootstrap_ci([xb, xn], lambda b, n: n / b)
    p = stats.permutation_p(xb, xn)
    cls, why = stats.classify(g, lo, hi, (len(xb), len(xn)), (_spread(wb), _spread(wn)), p)
    fig: dict[str, Any] = {"figure": name, "what": "speed", **shown, "goodness": g, "ci": [lo, hi], "p": p,
                           "n": [len(xb), len(xn)], "spread": [_spread(wb), _spread(wn)],
                           "class": cls, "why": why, "vs_ref": None, "ceiling_share": None}
    if rb is not None and rn is not None and _samples(rb) and _samples(rn):
        sets = [xb, _samples(rb), xn, _samples(rn)]
        gr, lo_r, hi_r = stats.bootstrap_ci(sets, lambda b, br, n, nr: (n / nr) / (b / br))
        n_min = min(map(len, sets))
        mb, mn = sorted(sets[1])[len(sets[1]) // 2], sorted(sets[3])[len(sets[3]) // 2]
        p_r = stats.permutation_p([x / mb for x in xb], [x / mn for x in xn])  # each run's rates over its reference
        c_r, why_r = stats.classify(gr, lo_r, hi_r, (n_min, n_min), (_spread(wb), _spread(wn)), p_r)
        fig["vs_ref"] = {"base": wb.get("ratio_to_reference"), "new": wn.get("ratio_to_reference"),
                         "goodness": gr, "ci": [lo_r, hi_r], "p": p_r, "class": c_r, "why": why_r}
    lb, ln = wb.get("limits") or {}, wn.get("limits") or {}
    if lb.get("fraction_of_floor") is not None and ln.get("fraction_of_floor") is not None:
        fig["ceiling_share"] = {"base": lb["fraction_of_floor"], "new": ln["fraction_of_floor"]}
    return fig


def _amount(name: str, what: str, vb: Any, vn: Any) -> dict[str, Any] | None:
    """A measured amount (bytes): lower is better, no repetitions; a change over 5% is called."""
    if not isinstance(vb, (int, float)) or not isinstance(vn, (int, float)) or vb <= 0 or vn <= 0:
        return None
    g = vb / vn
    cls = "unchanged" if abs(g - 1) <= stats.CHANGE else "improved" if g > 1 else "regressed"
    why = f"{display.si(vb, 'B')} -> {display.si(vn, 'B')} (one measurement per run)"
    return {"figure": name, "what": what, "base": vb, "new": vn, "unit": "bytes", "goodness": g, "ci": None,
            "p": None, "n": [1, 1], "spread": [None, None], "class": cls, "why": why, "vs_ref": None,
            "ceiling_share": None}


def compare(base: Report, new: Report) -> dict[str, Any]:
    rb, rn = base.data, new.data
    bb = {b["name"]: b for b in rb["backends"]}
    bn = {b["name"]: b for b in rn["backends"]}
    ref_name = rn.get("reference")
    gates, backends = [], []
    for name in [*bb, *(k for k in bn if k not in bb)]:
        b, n = bb.get(name), bn.get(name)
        gates.append({"backend": name, "window": "(backend)", "base": b and b["status"], "new": n and n["status"]})
        if b is None or n is None:
            continue
        wb, wn = _windows(b), _windows(n)
        refb, refn = _windows(bb.get(ref_name, {})), _windows(bn.get(ref_name, {}))
        figures = []
        for w in [*wb, *(k for k in wn if k not in wb)]:
            gb, gn = (wb.get(w) or {}).get("gate") or {}, (wn.get(w) or {}).get("gate") or {}
            gates.append({"backend": name, "window": w, "base": gb.get("status"), "new": gn.get("status")})
            if w not in wb or w not in wn:
                continue
            ref = name != ref_name
            fig = _speed(w, wb[w], wn[w], refb.get(w) if ref else None, refn.get(w) if ref else None)
            if fig:
                figures.append(fig)
            if w.startswith("decode"):
                st = _amount(f"state bytes {w}", "state", wb[w].get("state_bytes_measured"),
                             wn[w].get("state_bytes_measured"))
                if st:
                    figures.append(st)
        peaks = [[float(w["peak_memory_bytes"]) for w in x.values() if w.get("peak_memory_bytes")] for x in (wb, wn)]
        if all(peaks):
            pk = _amount("peak memory", "memory", max(peaks[0]), max(peaks[1]))
            if pk:
                figures.append(pk)
        backends.append({"backend": name, "is_reference": name == ref_name, "figures": figures})
    for g in gates:
        g["changed"] = g["base"] != g["new"]
        g["newly_wrong"] = g["new"] in BAD_GATES and g["base"] not in BAD_GATES
    eb, en = rb["environment"], rn["environment"]
    env: dict[str, Any] = {"commit": {"base": eb.get("git_commit"), "new": en.get("git_commit")},
           "packages": [{"name": k, "base": eb.get("packages", {}).get(k), "new": en.get("packages", {}).get(k)}
                        for k in sorted(set(eb.get("packages", {})) | set(en.get("packages", {})))
                        if eb.get("packages", {}).get(k) != en.get("packages", {}).get(k)],
           "device": [{"name": k, "base": rb["device"].get(k), "new": rn["device"].get(k)}
                      for k in sorted(set(rb["device"]) | set(rn["device"]))
                      if rb["device"].get(k) != rn["device"].get(k)],
           "host_load": {"base": eb.get("cpu_foreign_fraction"), "new": en.get("cpu_foreign_fraction")},
           "settings": [{"name": k, "base": rb["settings"].get(k), "new": rn["settings"].get(k)}
                        for k in sorted(set(rb["settings"]) | set(rn["settings"]))
                        if rb["settings"].get(k) != rn["settings"].get(k)]}
    env["same"] = not (env["packages"] or env["device"] or env["settings"])
    return {"kind": "bench", "model": new.model, "base_model": base.model, "schema": new.schema,
            "files": {"base": str(base.path), "new": str(new.path)}, "validity": validity(rb, rn),
            "gates": gates, "backends": backends, "environment": env}

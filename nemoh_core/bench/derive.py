"""Deriving figures from raw samples: rates, fractions of the measured and datasheet ceilings, ratios to the
reference, and each run's overall status."""

from __future__ import annotations

import math
from typing import Any

from nemoh.bench.cost import decode_cost, state_bytes, step_cost
from nemoh.bench.measure import gate
from nemoh.bench.plan import Settings, Target
from nemoh.bench.stats import summarize

# ----------------------------------------------------------------------------------------------
# Derived figures

def _rate(work: float, seconds: float) -> float:
    return work / seconds if seconds > 0 else math.inf


def _fraction(x: float | None, ceiling: float | None) -> float | None:
    return x / ceiling if x is not None and ceiling else None


def _wall(xs: list[float] | None) -> dict[str, Any] | None:
    return summarize(xs) if xs else None


def derive(raw: dict[str, Any], ref: dict[str, Any] | None, target: Target, s: Settings,
           ceilings: dict[str, Any], datasheet: dict | None, tie_tol: float) -> dict[str, Any]:
    """Statistics, rates, fractions of the ceilings, ratios to the reference, and the gate.

    A ratio to the reference is the ratio of the two `tokens_per_second` medians printed beside it
    (per forward for prefill, per decode step for decode), so a ratio never contradicts the
    throughputs it sits next to."""
    g, B = target.graph, s.batch
    probe_bw = ceilings["copy_bandwidth"]["p50"] if ceilings.get("copy_bandwidth") else None
    probe_fl = ceilings["matmul_rate"]["p50"] if ceilings.get("matmul_rate") else None
    sheet_bw = datasheet["bandwidth_Bps"] if datasheet else None
    sheet_fl = datasheet["flops"].get(g.dtype) if datasheet else None

    def limits(cost, seconds: float, per: int) -> dict[str, Any]:
        flops, nbytes = cost.flops / per, cost.bytes / per
        achieved_fl, achieved_bw = _rate(flops, seconds), _rate(nbytes, seconds)
        floor = max(flops / probe_fl if probe_fl else 0.0, nbytes / probe_bw if probe_bw else 0.0) or None
        return {"flops": flops, "bytes": nbytes, "achieved_flops": achieved_fl, "achieved_bandwidth_Bps": achieved_bw,
                "flops_fraction_of_probe": _fraction(achieved_fl, probe_fl),
                "bandwidth_fraction_of_probe": _fraction(achieved_bw, probe_bw),
                "flops_fraction_of_datasheet": _fraction(achieved_fl, sheet_fl),
                "bandwidth_fraction_of_datasheet": _fraction(achieved_bw, sheet_bw),
                "floor_seconds_probe": floor, "fraction_of_floor": _fraction(floor, seconds) if floor else None}

    prefill = []
    for i, w in enumerate(raw["prefill"]):
        T = w["prompt_length"]
        cost = step_cost(g, B, T, 0)
        ttft = summarize(w["seconds"])
        row = {"prompt_length": T, "ttft_seconds": ttft, "wall_seconds": _wall(w["wall_seconds"]),
               "tokens_per_second": summarize([B * T / x for x in w["seconds"]]),
               "cost": cost.to_json(), "limits": limits(cost, ttft["p50"], 1),
               "peak_memory_bytes": w["peak_bytes"], "state_bytes_measured": w["state_bytes"],
               "state_bytes_ir": state_bytes(g, B, T), "repeat_identical": w["repeat_identical"],
               "tokens": w["tokens"].tolist()}
        if ref is not None:
            rw = ref["prefill"][i]
            ref_tps = summarize([B * T / x for x in rw["seconds"]])
            row["ratio_to_reference"] = row["tokens_per_second"]["p50"] / ref_tps["p50"]
            row["gate"] = gate(w["tokens"], w["logits"], rw["tokens"], rw["logits"], tie_tol)
        else:
            row["ratio_to_reference"] = None
            row["gate"] = {"status": "UNCHECKED", "first_diverging_step": None, "divergence": None, "near_ties": []}
        prefill.append(row)

    decode = []
    for i, w in enumerate(raw["decode"]):
        S, N = w["context_depth"], s.decode_tokens
        flat = [x for rep in w["step_seconds"] for x in rep]
        tpot = summarize(flat)
        cost = decode_cost(g, B, S, N)
        row = {"context_depth": S, "decode_tokens": N, "tpot_seconds": tpot,
               "wall_seconds": _wall([x for rep in w["step_wall_seconds"] for x in rep]),
               "tokens_per_second": summarize([B / x for x in flat]),
               "cost": cost.to_json(), "limits": limits(cost, tpot["p50"], N),
               "peak_memory_bytes": w["peak_bytes"], "state_bytes_measured": w["state_bytes"],
               "state_bytes_ir": state_bytes(g, B, S), "repeat_identical": w["repeat_identical"],
               "tokens": w["tokens"].tolist()}
        if ref is not None:
            rw = ref["decode"][i]
            ref_tps = summarize([B / x for rep in rw["step_seconds"] for x in rep])
            row["ratio_to_reference"] = row["tokens_per_second"]["p50"] / ref_tps["p50"]
            row["gate"] = gate(w["tokens"], w["logits"], rw["tokens"], rw["logits"], tie_tol)
        else:
            row["ratio_to_reference"] = None
            row["gate"] = {"status": "UNCHECKED", "first_diverging_step": None, "divergence": None, "near_ties": []}
        decode.append(row)
    return {"prefill": prefill, "decode": decode}


def overall_status(entry: dict[str, Any]) -> str:
    if entry.get("error"):
        return entry["status"]
    statuses = [w["gate"]["status"] for part in ("prefill", "decode") for w in entry[part]]
    if "WRONG" in statuses:
        return "WRONG"
    if statuses and all(x == "UNCHECKED" for x in statuses):
        return "UNCHECKED"
    return "OK"


def headline(entries: list[dict[str, Any]], reference: str | None) -> list[dict[str, Any]]:
    """The page's first figure, per runner that is not the reference: its status and, at the longest
    prompt and the deepest context it ran, its tokens/s p50 and the ratio to the reference (the
    `ratio_to_reference` of that row, null without a reference)."""
    out = []
    for e in entries:
        if e.get("is_reference"):
            continue
        row: dict[str, Any] = {"backend": e["name"], "status": e["status"], "reference": reference,
                               "error": e.get("error")}
        for part, key in (("prefill", "prompt_length"), ("decode", "context_depth")):
            rows = e.get(part) or []
            w = max(rows, key=lambda w: w[key]) if rows else None
            row[part] = None if w is None else {
                key: w[key], "tokens_per_second": w["tokens_per_second"]["p50"],
                "ratio_to_reference": w["ratio_to_reference"], "gate": w["gate"]["status"]}
        out.append(row)
    return out

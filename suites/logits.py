"""logits: the executor against nemoh's fp64 oracle (the precise reference) and against transformers
(the independent one: fp64 on the CPU, and at the executor's dtype), on the same prompts.

At bf16/fp16 the verdict is relative to the reference implementation's own error at that dtype: the
executor's distance to the fp64 reference (NMSE, KL, top-1 disagreement) may be at most k times
transformers-at-that-dtype's distance to the same reference, plus eps, within a loose absolute guard
(nemoh.conformance.tolerances). Each such case reports both distances and their ratio. Where
transformers cannot run the dtype, the fixed floors of the table judge instead, and the case says so."""

from __future__ import annotations

from typing import Any

import torch

from nemoh.conformance.case import Case, Metric, Result, Status, Suite, judge, logit_metrics, metric_values
from nemoh.conformance.tolerances import RELATIVE_METRICS, is_relative

REFS = ("oracle", "hf-float64", "hf-dtype")


def lengths(ctx) -> list[int]:
    c = ctx.config.chunk_size
    return [min(7, c), c + 37]  # inside one SSD chunk; across a chunk boundary


def cases(ctx) -> list[Case]:
    return [Case("logits", f"ref={ref},T={T},B=2", (("ref", ref), ("T", T), ("B", 2)), seed=T)
            for T in lengths(ctx) for ref in REFS]


def scenario(result: Result, ctx):
    p = result.case.p
    return [(ctx.prompt(p["B"], p["T"], result.case.seed), None)]


def run(case: Case, ctx) -> Result:
    p = case.p
    ids = ctx.prompt(p["B"], p["T"], case.seed)
    out = ctx.session(p["B"]).forward(ids)
    ref_name = p["ref"]
    if ref_name == "oracle":
        ref, judged_at, ref_label = ctx.oracle_logits(ids), ctx.dtype, "oracle"
        undecidable = quantizer_sensitivity(case, ctx, ids, out, ref)
        if undecidable is not None:
            return undecidable
    else:
        hf_dtype = "float64" if ref_name == "hf-float64" else ctx.dtype
        ref = ctx.hf_logits(ids, hf_dtype)
        if ref is None:
            return Result(case, ctx.hf_status, message=ctx.hf_unavailable)
        # transformers computes its Mamba scan in fp32 even in an fp64 model (known deviation
        # hf-fp64-scan-in-fp32): nothing compared with it can be judged tighter than fp32
        judged_at = "float32" if ctx.dtype == "float64" else ctx.dtype
        ref_label = ref_name = f"transformers {hf_dtype}"
    if not any(is_relative(m, judged_at) for m in RELATIVE_METRICS):
        metrics, details = logit_metrics(out, ref, judged_at, f"vs {ref_name}")
        return judge(case, metrics, details=details)
    return run_relative(case, ctx, ids, out, ref, judged_at, ref_name, ref_label)


def quantizer_sensitivity(case: Case, ctx, ids: torch.Tensor, out: torch.Tensor, ref: torch.Tensor) -> Result | None:
    """A checkpoint whose linears quantize their inputs (ModelOpt FP8 / NVFP4), at a dtype below fp64: rounding
    near a quantizer's step boundary is discontinuous, and on a model whose logits are chaotic in it a 1-ulp
    difference upstream flips steps that the layers after carry on. So the fp64 oracle is run once more with only
    its quantizers' inputs rounded to the dtype (what any executor at that dtype quantizes). If that alone is out
    of the dtype's tolerances, no executor's distance at this dtype can separate a bug from rounding: the case is
    NOT_SUPPORTED with both distances (reported, not judged); None when the case can be judged."""
    if ctx.quant is None or ctx.dtype == "float64":
        return None
    rounded = ctx.oracle_logits(ids, ctx.dtype)
    floor_ms, _ = logit_metrics(rounded, ref, ctx.dtype, "")
    if all(m.ok for m in floor_ms):
        return None
    label = f"oracle with {ctx.dtype} quantizer inputs vs oracle"
    floor, _ = logit_metrics(rounded, ref, ctx.dtype, label, judged=False)
    ms, details = logit_metrics(out, ref, ctx.dtype, "vs oracle", judged=False)
    f, e = metric_values(floor), metric_values(ms)
    details["rounding_floor"] = {k: f[k] for k in ("logits_nmse", "logits_kl", "logits_top1")}
    msg = (f"undecidable at {ctx.dtype}: rounding only the quantized linears' inputs to {ctx.dtype} moves the fp64 "
           f"oracle itself by KL {f['logits_kl']:.3g}, top-1 {f['logits_top1']:.3f}, beyond the {ctx.dtype} "
           f"tolerances; the executor is at KL {e['logits_kl']:.3g}, top-1 {e['logits_top1']:.3f} (reported, not "
           "judged: this checkpoint is judged at float32/float64 and by the equivalence suites)")
    return Result(case, Status.NOT_SUPPORTED, ms + floor, msg, details=details)


def run_relative(case: Case, ctx, ids: torch.Tensor, out: torch.Tensor, ref: torch.Tensor, dtype: str,
                 ref_name: str, ref_label: str) -> Result:
    """A low-precision verdict: against transformers' own distance at `dtype` to the fp64 reference."""
    base_name = f"transformers {dtype}"
    base, why_not = baseline_logits(ctx, ids, dtype)
    if base is None:
        metrics, details = logit_metrics(out, ref, dtype, f"vs {ref_name}")
        details["verdict_rule"] = (f"fixed floors of the tolerance table: transformers cannot run {dtype} here "
                                   f"({why_not}), so there is no reference error at this dtype to be relative to")
        return judge(case, metrics, details=details)
    if case.p["ref"] == "hf-dtype":  # the executor against transformers at the dtype: their distance is
        # judged against transformers' own distance to the fp64 oracle
        base_ref, base_label = ctx.oracle_logits(ids), f"{base_name} vs oracle"
    else:
        base_ref, base_label = ref, f"{base_name} vs {ref_label}"
    base_ms, _ = logit_metrics(base, base_ref, dtype, base_label, judged=False)
    metrics, details = logit_metrics(out, ref, dtype, f"vs {ref_name}", baseline=metric_values(base_ms),
                                     baseline_label=base_label, cross=case.p["ref"] == "hf-dtype")
    details["vs_reference_at_dtype"] = closeness(metrics, base_name, ref_name, case.p["ref"] == "hf-dtype")
    k_text = "(sqrt(k) + 1)^2 (top-1: k + 1), both sides rounding" if case.p["ref"] == "hf-dtype" else "k"
    details["verdict_rule"] = (f"d(executor, reference) <= {k_text} x d({base_label}) + eps for NMSE, KL and "
                               "top-1 disagreement, within the absolute guard (tolerance table rows *_k, *_eps, "
                               "*_guard)")
    return judge(case, metrics, details=details)


def baseline_logits(ctx, ids: torch.Tensor, dtype: str) -> tuple[torch.Tensor | None, str]:
    """transformers' logits at `dtype`, or (None, why) where it cannot run that dtype."""
    if ctx.hf_unavailable:
        return None, ctx.hf_unavailable
    try:
        base = ctx.hf_logits(ids, dtype)
    except Exception as e:  # a dtype its kernels lack on this device: judged by the fixed floors instead
        return None, f"transformers at {dtype} raised {type(e).__name__}: {e}"
    if base is None or not bool(torch.isfinite(base).all()):
        return None, f"transformers at {dtype} gave non-finite logits"
    return base, ""


def closeness(metrics: list[Metric], base_name: str, ref_name: str, same: bool = False) -> dict[str, Any]:
    """Both distances and their ratio, and one sentence the report shows (`same`: the reference is
    transformers at the dtype itself, and the baseline its distance to the oracle)."""
    from nemoh.conformance.tolerances import ratio

    rel = {m.name: m for m in metrics if m.baseline is not None}
    out: dict[str, Any] = {n: {"executor": m.value, "reference": m.baseline, "ratio": ratio(n, m.value, m.baseline)}
                           for n, m in rel.items() if m.baseline is not None}
    nm, top1 = rel["logits_nmse"], rel["logits_top1"]
    assert nm.baseline is not None and top1.baseline is not None
    r = ratio("logits_nmse", nm.value, nm.baseline)
    nums = f"NMSE {nm.value:.2g} vs {nm.baseline:.2g}, top-1 {top1.value:.3f} vs {top1.baseline:.3f}"
    if same:
        how = f"its distance to {ref_name} is {r:.2g}x {base_name}'s own distance to the fp64 oracle"
    elif r < 0.8:
        how = f"closer to {ref_name} than {base_name} ({r:.2g}x)"
    elif r <= 1.25:
        how = f"as close to {ref_name} as {base_name} ({r:.2g}x)"
    else:
        how = f"{r:.1f}x further from {ref_name} than {base_name}"
    out["summary"] = f"{how} ({nums})"
    return out


SUITE = Suite("logits", __doc__, cases, run, scenario, order=10)

"""logits: the executor against nemoh's fp64 oracle (the precise reference) and against transformers
(the independent one: fp64 on the CPU, and at the executor's dtype), on the same prompts."""

from __future__ import annotations

from nemoh.conformance.case import Case, Result, Status, Suite, judge, logit_metrics

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
        ref, judged_at = ctx.oracle_logits(ids), ctx.dtype
    else:
        hf_dtype = "float64" if ref_name == "hf-float64" else ctx.dtype
        ref = ctx.hf_logits(ids, hf_dtype)
        if ref is None:
            return Result(case, Status.SKIPPED, message=ctx.hf_unavailable)
        # transformers computes its Mamba scan in fp32 even in an fp64 model (known deviation
        # hf-fp64-scan-in-fp32): nothing compared with it can be judged tighter than fp32
        judged_at = "float32" if ctx.dtype == "float64" else ctx.dtype
        ref_name = f"transformers {hf_dtype}"
    metrics, details = logit_metrics(out, ref, judged_at, f"vs {ref_name}")
    return judge(case, metrics, details=details)


SUITE = Suite("logits", __doc__, cases, run, scenario, order=10)

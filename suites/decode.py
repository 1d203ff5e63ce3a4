"""decode: prefill then token-by-token decode against one-shot prefill (logits and carried state);
greedy generation of N tokens against transformers' `generate`, reporting the first divergence and
whether each side's token is in the other's top-k."""

from __future__ import annotations

import torch

from nemoh.conformance.case import Case, Metric, Result, Status, Suite, equiv_metrics, judge, state_metrics
from nemoh.conformance.tolerances import tol
from nemoh.runtime.backend import capability
from nemoh.runtime.session import greedy_generate

B = 2
TOPK = 5


def cases(ctx) -> list[Case]:
    c = ctx.config.chunk_size
    T = c + 24
    out = [Case("decode", f"prefill={P},steps={T - P},B={B}", (("P", P), ("T", T)), seed=11) for P in (1, c + 3)]
    out.append(Case("decode", "generate(N=16,prompt=24) vs transformers", (("N", 16), ("prompt", 24)), seed=12))
    return out


def run(case: Case, ctx) -> Result:
    p = case.p
    if "N" in p:
        return run_generate(case, ctx)
    ids = ctx.prompt(B, p["T"], case.seed)
    states = capability(ctx.model.backend, "state_export", ctx.dtype)
    s = ctx.session(B)
    whole = s.forward(ids)
    st_whole = ctx.export_state(s) if states.ok else None
    s = ctx.session(B)
    first = s.prefill(ids[:, :p["P"]])
    steps = [s.forward(ids[:, t:t + 1]) for t in range(p["P"], p["T"])]
    logits = torch.cat([first, *steps], dim=1)
    ms = equiv_metrics(logits, whole, ctx.dtype, "decode logits")
    if not states.ok:  # the logits are still judged; the carried state is not reachable
        return judge(case, ms, details={"state_comparison": f"NOT_SUPPORTED: {states.reason}"})
    ms += state_metrics(ctx.export_state(s), st_whole, ctx.dtype, "decode")
    return judge(case, ms)


def run_generate(case: Case, ctx) -> Result:
    p = case.p
    ids = ctx.prompt(1, p["prompt"], case.seed)
    ref = ctx.hf_generate(ids, p["N"])
    if ref is None:
        return Result(case, Status.SKIPPED, message=ctx.hf_unavailable)
    ref_toks, ref_logits = ref
    toks, logits = greedy_generate(ctx.model, ids, p["N"])
    toks, ref_toks = toks[0].tolist(), ref_toks[0].tolist()
    first = next((i for i, (a, b) in enumerate(zip(toks, ref_toks)) if a != b), None)
    details = {"tokens": toks, "reference_tokens": ref_toks, "first_divergence": first}
    ties_ok = 1.0
    if first is not None:
        ours_in_ref = toks[first] in ref_logits[0, first].topk(TOPK).indices.tolist()
        ref_in_ours = ref_toks[first] in logits[0, first].topk(TOPK).indices.tolist()
        details.update(ours_in_reference_topk=ours_in_ref, reference_in_our_topk=ref_in_ours, k=TOPK)
        ties_ok = float(ours_in_ref and ref_in_ours)
    matched = (first if first is not None else len(toks)) / len(toks)
    # fp32/fp64 must generate the same tokens; lower precision may part at a near-tie, which is
    # acceptable only if each side's token is in the other's top-k
    ms = [Metric("greedy_match", matched, tol("greedy_match", ctx.dtype), higher_is_better=True,
                 label="vs transformers generate"),
          Metric("greedy_divergence_in_topk", ties_ok, 1.0, higher_is_better=True, label=f"top-{TOPK}")]
    return judge(case, ms, details=details)


def scenario(result: Result, ctx):
    p = result.case.p
    if "N" in p:
        ids = ctx.prompt(1, p["prompt"], result.case.seed)
        toks = torch.tensor([result.details.get("tokens", [])], dtype=torch.int64)
        first = result.details.get("first_divergence") or 0
        return [(ids, None)] + [(toks[:, i:i + 1], None) for i in range(first)]
    ids = ctx.prompt(B, p["T"], result.case.seed)
    return {"prefill then decode": [(ids[:, :p["P"]], None)] + [(ids[:, t:t + 1], None) for t in range(p["P"], p["T"])],
            "one-shot": [(ids, None)]}  # the bug may be on either side


SUITE = Suite("decode", __doc__, cases, run, scenario, order=30)

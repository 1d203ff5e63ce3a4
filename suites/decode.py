"""decode: prefill then token-by-token decode against one-shot prefill (logits and carried state), at a
batch of one and of two; a schedule that goes back to multi-token chunks after decode steps (a short
chunk inside the conv window, then one across an SSD chunk boundary); greedy generation of N tokens
against transformers' `generate`, reporting the first divergence and whether each side's token is in
the other's top-k."""

from __future__ import annotations

import torch

from nemoh.conformance.case import Case, Metric, Result, Suite, equiv_metrics, judge, state_metrics
from nemoh.conformance.tolerances import tol
from nemoh.runtime.backend import capability
from nemoh.runtime.session import greedy_generate

TOPK = 5


def schedule(ctx) -> list[int]:
    """Chunk lengths of the mixed case: prefill, 3 decode steps, a chunk shorter than K-1 (the conv
    shift path from a decoded state), a step, a chunk across an SSD chunk boundary, 2 steps."""
    c, K = ctx.config.chunk_size, ctx.config.conv_kernel
    return [5, 1, 1, 1, max(K - 2, 2), 1, c + 2, 1, 1]


def cases(ctx) -> list[Case]:
    c = ctx.config.chunk_size
    T = c + 24
    out = [Case("decode", f"prefill={P},steps={T - P},B={B}", (("P", P), ("T", T), ("B", B)), seed=11)
           for P, B in ((1, 1), (c + 3, 2))]
    sched = schedule(ctx)
    out.append(Case("decode", f"chunks-after-decode={sched},B=1",
                    (("schedule", tuple(sched)), ("T", sum(sched)), ("B", 1)), seed=13))
    out.append(Case("decode", "generate(N=16,prompt=24) vs transformers", (("N", 16), ("prompt", 24)), seed=12))
    return out


def pieces(p) -> list[int]:
    """The case's forward calls as chunk lengths."""
    if "schedule" in p:
        return list(p["schedule"])
    return [p["P"]] + [1] * (p["T"] - p["P"])


def run(case: Case, ctx) -> Result:
    p = case.p
    if "N" in p:
        return run_generate(case, ctx)
    B = p["B"]
    ids = ctx.prompt(B, p["T"], case.seed)
    states = capability(ctx.model.backend, "state_export", ctx.dtype)
    s = ctx.session(B)
    whole = s.forward(ids)
    st_whole = ctx.export_state(s) if states.ok else None
    s = ctx.session(B)
    outs, a = [], 0
    for n in pieces(p):
        outs.append(s.prefill(ids[:, a:a + n]) if n > 1 or a == 0 else s.forward(ids[:, a:a + n]))
        a += n
    logits = torch.cat(outs, dim=1)
    ms = equiv_metrics(logits, whole, ctx.dtype, "decode logits")
    if st_whole is None:  # the logits are still judged; the carried state is not reachable
        return judge(case, ms, details={"state_comparison": f"NOT_SUPPORTED: {states.reason}"})
    ms += state_metrics(ctx.export_state(s), st_whole, ctx.dtype, "decode")
    return judge(case, ms)


def run_generate(case: Case, ctx) -> Result:
    p = case.p
    ids = ctx.prompt(1, p["prompt"], case.seed)
    ref = ctx.hf_generate(ids, p["N"])
    if ref is None:
        return Result(case, ctx.hf_status, message=ctx.hf_unavailable)
    ref_toks, ref_logits = ref
    generated, logits = greedy_generate(ctx.model, ids, p["N"])
    toks, ref_toks = generated[0].tolist(), ref_toks[0].tolist()
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
    ids = ctx.prompt(p["B"], p["T"], result.case.seed)
    calls, a = [], 0
    for n in pieces(p):
        calls.append((ids[:, a:a + n], None))
        a += n
    return {"prefill then decode": calls, "one-shot": [(ids, None)]}  # the bug may be on either side


SUITE = Suite("decode", __doc__, cases, run, scenario, order=30)

"""quant: quantized weights judged the way llama.cpp judges its quants (the KL-divergence mode of its
perplexity tool), per weight type: KL divergence of the next-token distributions against nemoh's fp64
oracle and against the same engine with F32 weights, top-1 agreement ("same top p") and the RMS of Δp
(the change in the probability of the actual next token), each with its standard error over positions.

A backend takes part by offering `weight_variant(type) -> backend` (an unloaded backend reading the same
checkpoint at that weight type, e.g. llama.cpp's GGUF Q8_0 / Q4_K_M); the others are NOT_SUPPORTED. It runs
at --dtype float32 (activations in F32; only the weights change). Tolerances are read from the one table
with the quant type as the dtype key (`tol("quant_kl", "Q8_0")`); a metric without a row is measured and
reported, not judged (rows proposed in docs/llamacpp.md).

A ModelOpt-quantized checkpoint (FP8, NVFP4: nemoh.model.quant) is scored against its unquantized original
instead, with the same statistics: the executor on the quantized checkpoint against the same executor on the
original, and against the fp64 oracle of the original; the quantized oracle's own distance to the original
oracle (what the format costs, whoever runs it) is reported next to them. The original is known for the
quantized presets (nemoh.model.presets.original_of); for another checkpoint set NEMOH_QUANT_ORIGINAL=DIR.
"""

from __future__ import annotations

import math
import os

import torch

from nemoh.conformance.case import Case, Metric, Result, Status, Suite, judge
from nemoh.conformance.tolerances import tol

B = 2
DEFAULT_TYPES = ("F16", "BF16", "Q8_0", "Q6_K", "Q4_K_M")
METRICS = ("quant_kl", "quant_kl_f32", "quant_top1", "quant_top1_oracle", "quant_rms_dp")


def types() -> tuple[str, ...]:
    env = os.environ.get("NEMOH_QUANT_TYPES")
    return tuple(t.strip().upper() for t in env.split(",") if t.strip()) if env else DEFAULT_TYPES


def length(ctx) -> int:
    return ctx.config.chunk_size + 37


def cases(ctx) -> list[Case]:
    T = length(ctx)
    q = getattr(ctx, "quant", None)
    if q is not None:
        return [Case("quant", f"{q.algo}-vs-original(T={T},B={B})", (("type", q.algo), ("T", T), ("B", B),
                                                                      ("original", True)), seed=31)]
    return [Case("quant", f"{qt}(T={T},B={B})", (("type", qt), ("T", T), ("B", B)), seed=31) for qt in types()]


def original_checkpoint(path) -> str | None:
    """The unquantized original of the quantized checkpoint at `path`: NEMOH_QUANT_ORIGINAL, or the preset's."""
    from pathlib import Path

    from nemoh.model import presets as P

    if os.environ.get("NEMOH_QUANT_ORIGINAL"):
        return os.environ["NEMOH_QUANT_ORIGINAL"]
    for name in P.QUANT_SPECS:
        if Path(path).resolve() == (P.cache_root() / "checkpoints" / f"{name}-{P.fingerprint(name)}").resolve():
            orig = P.original_of(name)
            return str(P.cached_checkpoint(orig)) if orig else None
    return None


def run_vs_original(case: Case, ctx) -> Result:
    from nemoh import oracle
    from nemoh.model.config import load_config
    from nemoh.model.ir import build_graph
    from nemoh.model.weights import Checkpoint

    p = case.p
    qt = p["type"]
    orig = original_checkpoint(ctx.model.path)
    if orig is None:
        return Result(case, Status.NOT_SUPPORTED, message="no unquantized original known for this checkpoint "
                                                          "(set NEMOH_QUANT_ORIGINAL=DIR)")
    if ctx.dtype != "float32":
        return Result(case, Status.NOT_SUPPORTED, message="the quant suite runs at --dtype float32")
    ids = ctx.prompt(p["B"], p["T"], case.seed)
    q = ctx.session(p["B"]).forward(ids)
    cfg = load_config(orig)
    ck = Checkpoint(orig)
    try:  # the same executor on the original: a fresh instance of the backend's class
        base_be = type(ctx.model.backend)()
    except TypeError as e:
        return Result(case, Status.NOT_SUPPORTED, message=f"cannot make a second {ctx.model.backend.name} backend "
                                                          f"for the original checkpoint ({e})")
    base_be.load(build_graph(cfg, ctx.dtype), ck)
    base = base_be.forward(base_be.new_state(p["B"]), ids, None)
    g64 = build_graph(cfg, "float64")
    oracle_orig = oracle.run(g64, ck.load(g64), ids)
    oracle_q = ctx.oracle_logits(ids)
    nxt = ids[:, 1:]
    vs_oracle = kl_stats(oracle_orig[:, :-1], q[:, :-1], nxt)
    vs_f32 = kl_stats(base[:, :-1], q[:, :-1], nxt)
    format_cost = kl_stats(oracle_orig[:, :-1], oracle_q[:, :-1], nxt)
    vs_q_oracle = kl_stats(oracle_q[:, :-1], q[:, :-1], nxt)
    ms = _metrics(qt, vs_oracle, vs_f32, "original, oracle fp64", "original, same executor")
    details = {"type": qt, "original": orig, "vs_oracle": vs_oracle, "vs_f32": vs_f32,
               "quantized_oracle_vs_original_oracle": format_cost, "vs_quantized_oracle": vs_q_oracle}
    unjudged = [m.name for m in ms if m.tolerance is None]
    res = judge(case, ms, details=details)
    if unjudged and res.status is Status.OK:
        res.message = (f"measured, not judged: no tolerance row for {', '.join(unjudged)} at {qt}; "
                       f"vs original KL {vs_f32['kl']:.3g} ± {vs_f32['kl_se']:.2g}, "
                       f"top-1 {vs_f32['top1']:.3f} ± {vs_f32['top1_se']:.3f}, RMS Δp {vs_f32['rms_dp']:.3g} ± "
                       f"{vs_f32['rms_dp_se']:.2g}; the format itself (quantized vs original oracle) KL "
                       f"{format_cost['kl']:.3g}")
    return res


def _metrics(qt: str, vs_oracle: dict, vs_exec: dict, oracle_label: str, exec_label: str) -> list[Metric]:
    """The quant suite's five figures of type `qt`: KL and top-1 against the fp64 oracle's reference logits,
    KL, top-1 and RMS Δp against the same executor's (F32 weights, or the unquantized original)."""
    return [Metric("quant_kl", vs_oracle["kl"], tol("quant_kl", qt), label=f"{qt} vs {oracle_label}"),
            Metric("quant_kl_f32", vs_exec["kl"], tol("quant_kl_f32", qt), label=f"{qt} vs {exec_label}"),
            Metric("quant_top1", vs_exec["top1"], tol("quant_top1", qt), higher_is_better=True,
                   label=f"{qt} vs {exec_label}"),
            Metric("quant_top1_oracle", vs_oracle["top1"], tol("quant_top1_oracle", qt), higher_is_better=True,
                   label=f"{qt} vs {oracle_label}"),
            Metric("quant_rms_dp", vs_exec["rms_dp"], tol("quant_rms_dp", qt), label=f"{qt} vs {exec_label}")]


def _se(x: torch.Tensor) -> float:
    n = x.numel()
    return (x.std(unbiased=True) / math.sqrt(n)).item() if n > 1 else float("nan")


def kl_stats(ref: torch.Tensor, out: torch.Tensor, next_tokens: torch.Tensor | None = None) -> dict[str, float]:
    """llama.cpp's KL-divergence statistics of `out` against `ref` (logits [..., V], fp64 inside).

    kl: mean over positions of KL(softmax(ref) || softmax(out)) in nats, kl_se its standard error;
    top1: the share of positions whose argmax agrees ("same top p"), top1_se = sqrt(p (1 - p) / n);
    rms_dp: sqrt(mean Δp²) where Δp = p_out(t) - p_ref(t) for the actual next token t (`next_tokens`,
    same leading shape; None: the ref's top-1 token), rms_dp_se = se(Δp²) / (2 rms_dp) (first-order
    propagation, as llama.cpp's perplexity tool does); n: the number of positions.
    """
    r = ref.double().reshape(-1, ref.shape[-1])
    o = out.double().reshape(-1, out.shape[-1])
    lr, lo = torch.log_softmax(r, -1), torch.log_softmax(o, -1)
    kl = (lr.exp() * (lr - lo)).sum(-1)
    same = (r.argmax(-1) == o.argmax(-1)).double()
    t = r.argmax(-1) if next_tokens is None else next_tokens.reshape(-1).long()
    dp = lo.exp().gather(-1, t[:, None])[:, 0] - lr.exp().gather(-1, t[:, None])[:, 0]
    n = kl.numel()
    p = same.mean().item()
    rms = dp.pow(2).mean().sqrt().item()
    return {"n": n, "kl": kl.mean().item(), "kl_se": _se(kl), "kl_max": kl.max().item(),
            "top1": p, "top1_se": math.sqrt(p * (1 - p) / n) if n else float("nan"),
            "rms_dp": rms, "rms_dp_se": (_se(dp.pow(2)) / (2 * rms)) if rms > 0 else 0.0,
            "mean_dp": dp.mean().item()}


def run(case: Case, ctx) -> Result:
    if case.p.get("original"):
        return run_vs_original(case, ctx)
    p = case.p
    qt = p["type"]
    be = ctx.model.backend
    variant = getattr(be, "weight_variant", None)
    if variant is None:
        return Result(case, Status.NOT_SUPPORTED,
                      message=f"backend '{be.name}' offers no quantized weight types (no weight_variant)")
    if ctx.dtype != "float32":
        return Result(case, Status.NOT_SUPPORTED, message="the quant suite runs at --dtype float32 (F32 activations; "
                                                          "only the weights are quantized)")
    ids = ctx.prompt(p["B"], p["T"], case.seed)
    # the same engine with F32 weights: the run's own model when it reads F32, else a variant
    wt = getattr(be, "weight_type", lambda d: "F32")(ctx.dtype)
    if wt == "F32":
        base = ctx.session(p["B"]).forward(ids)
    else:
        base, _ = _run_variant(variant("F32"), ctx, ids)
    q, q_desc = _run_variant(variant(qt), ctx, ids)
    oracle = ctx.oracle_logits(ids)
    nxt = ids[:, 1:]
    vs_oracle = kl_stats(oracle[:, :-1], q[:, :-1], nxt)
    vs_f32 = kl_stats(base[:, :-1], q[:, :-1], nxt)
    f32_vs_oracle = kl_stats(oracle[:, :-1], base[:, :-1], nxt)
    ms = _metrics(qt, vs_oracle, vs_f32, "oracle fp64", "F32 weights")
    details = {"type": qt, "vs_oracle": vs_oracle, "vs_f32": vs_f32, "f32_vs_oracle": f32_vs_oracle,
               "engine": {k: q_desc.get(k) for k in ("weights", "tensor_types", "gguf", "llama_cpp_commit")
                          if k in q_desc}}
    unjudged = [m.name for m in ms if m.tolerance is None]
    res = judge(case, ms, details=details)
    if unjudged and res.status is Status.OK:
        res.message = (f"measured, not judged: no tolerance row for {', '.join(unjudged)} at {qt} "
                       f"(proposed in docs/llamacpp.md); "
                       f"KL vs oracle {vs_oracle['kl']:.3g} ± {vs_oracle['kl_se']:.2g}, "
                       f"top-1 vs F32 {vs_f32['top1']:.3f} ± {vs_f32['top1_se']:.3f}, "
                       f"RMS Δp {vs_f32['rms_dp']:.3g} ± {vs_f32['rms_dp_se']:.2g}")
    return res


def _run_variant(backend, ctx, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Logits of one weight variant and its backend's description."""
    try:
        backend.load(ctx.graph, ctx.model.checkpoint)
        st = backend.new_state(ids.shape[0])
        out = backend.forward(st, ids, None)
        return out, backend.describe()
    finally:
        close = getattr(backend, "close", None)
        if close:
            close()


SUITE = Suite("quant", __doc__, cases, run, order=60)

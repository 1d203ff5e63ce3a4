"""The one table of tolerances, keyed by (metric, dtype), each with its reason.

Metrics (a metric with no entry at a dtype is reported but not judged there):
  logits_rel_max_abs  max |out - ref| / max |ref| over all logits, ref = the precise reference
                      (nemoh's fp64 oracle, or transformers with its dt quirk removed).
  logits_nmse         sum (out - ref)^2 / sum ref^2.
  logits_kl           mean over positions of KL(softmax(ref) || softmax(out)), in nats.
  logits_top1         the smallest acceptable fraction of positions whose argmax agrees with ref.
  equiv_*             the same executor against itself run another way: one-shot prefill vs
                      chunked prefill vs token-by-token decode, a sequence alone vs inside a
                      left-padded batch; for logits and for the carried state.
  greedy_match        the fraction of greedy steps before the first divergence from transformers.
  layer_rel_rms       localisation: a layer's output, run in isolation against the oracle.

"measured" figures come from `nemoh conformance --model PRESET --backend torch --dtype float64,float32,
bfloat16,float16` (with this table disabled) and `python -m nemoh.conformance.measure_tolerances`, on the four
tiny presets with 7-300 token prompts on a CPU; margins leave room for
longer prompts and real models. The bugs the harness must catch move logits by far more: the
reference's dt clamp alone moves them by over 100x the fp32 tolerance on every preset (asserted in
tests/backends/test_torch_backend.py::test_reference_dt_clamp_is_observable_and_explained).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tol:
    value: float
    reason: str


TOLERANCES: dict[tuple[str, str], Tol] = {
    # -- against a reference (the fp64 oracle; transformers with its dt clamp removed) -----------
    ("logits_rel_max_abs", "float64"): Tol(
        1e-12, "fp64 rounding (eps 2.2e-16) over O(1e3)-term reductions; measured <= 1.4e-15 vs the oracle"),
    ("logits_rel_max_abs", "float32"): Tol(
        2e-5, "fp32 eps 1.2e-7 times reduction depth and layer count; measured <= 8.7e-7 vs the fp64 oracle and "
              "<= 4.3e-7 vs transformers fp32 (its dt clamp removed); 20x margin"),
    # bf16/fp16 max-abs is reported, not judged: one near-tie expert flip moves a token by O(1)
    ("logits_nmse", "float64"): Tol(1e-24, "fp64 rounding; measured <= 1e-30"),
    ("logits_nmse", "float32"): Tol(1e-9, "measured <= 2.5e-13 vs the oracle and transformers"),
    # bf16/fp16 rows of logits_nmse / logits_kl / logits_top1 are the FIXED floors (the rule before issue 18),
    # used only where transformers cannot run that dtype; otherwise the dtype-relative rule below judges
    ("logits_nmse", "bfloat16"): Tol(0.05, "fixed floor, used only without transformers at bf16: 8 mantissa bits plus "
                                           "rare expert flips; measured <= 0.015 on the hand-made presets"),
    ("logits_nmse", "float16"): Tol(0.01, "fixed floor, used only without transformers at fp16: 11 mantissa bits plus "
                                          "rare expert flips; measured <= 1.5e-3"),
    ("logits_kl", "float64"): Tol(1e-12, "rounding noise (it can come out slightly negative); measured <= 1e-16"),
    ("logits_kl", "float32"): Tol(1e-8, "mean KL(ref || out) per position; measured <= 1.1e-12"),
    ("logits_kl", "bfloat16"): Tol(0.2, "measured <= 0.058 (nats, mean over positions)"),
    ("logits_kl", "float16"): Tol(0.03, "measured <= 5.8e-3 (nats, mean over positions)"),
    ("logits_top1", "float64"): Tol(1.0, "exact arithmetic up to 1e-15: every argmax agrees"),
    ("logits_top1", "float32"): Tol(0.999, "only exact near-ties may flip; measured 1.000 on every preset"),
    ("logits_top1", "bfloat16"): Tol(
        0.85, "bf16 keeps 8 mantissa bits; one rounding-induced expert flip moves a token's logits by O(1), and "
              "flips grow with the expert count: measured 0.933-0.987 vs the fp64 oracle on the hand-made presets "
              "(8-16 experts) but 0.891-0.929 on tiny-nano-30b (128 experts, top-6), where transformers' own bf16 "
              "gives 0.902 and llama.cpp's 0.857-0.884 (T=7: 12 of 14 positions). At this floor the router bias "
              "rounded to bf16 (0.857-0.906 on tiny-moe) is not caught at bf16: the fp32 run catches it"),
    ("logits_top1", "float16"): Tol(0.97, "fp16 keeps 11 mantissa bits; measured 0.990-0.997 vs the fp64 oracle"),
    # -- low precision, relative to the reference implementation at the same dtype (issue 18) ----------
    #    d(executor, fp64) <= k * d(transformers at this dtype, fp64) + eps, never looser than the guard.
    #    d is logits_nmse, logits_kl, or for top-1 the disagreement 1 - logits_top1 (eps plus one position).
    ("logits_nmse_k", "bfloat16"): Tol(
        3.0, "the executor may be k x as far from fp64 as transformers' own bf16; the torch executor measured "
        "1.01-1.08x (tiny-dense, tiny-moe, tiny-latent-moe, tiny-nano-30b); planted bugs the fixed floors "
        "missed at bf16 are "
        "11-290x (router bias in bf16, RoPE, dt clamp)"),
    ("logits_nmse_eps", "bfloat16"): Tol(
        1e-3, "absorbs a baseline near zero (bf16 NMSE of transformers measured 1.1e-4 to 0.015)"),
    ("logits_nmse_guard", "bfloat16"): Tol(
        0.3, "sanity guard only: never accepted however far transformers' own bf16 is (6x the old fixed floor)"),
    ("logits_nmse_k", "float16"): Tol(
        4.0, "as bf16; the torch executor measured 0.92-1.17x transformers' fp16 distance, but 2.74x on "
             "tiny-nano-30b (128 experts: 0.002 vs 7.3e-4 at T=c+37); planted bugs >= 4.96x there"),
    ("logits_nmse_eps", "float16"): Tol(
        2e-4, "absorbs a baseline near zero (fp16 NMSE of transformers measured 1.7e-6 to 2.3e-6 on the hand-made "
        "presets)"),
    ("logits_nmse_guard", "float16"): Tol(0.1, "sanity guard only (10x the old fixed floor)"),
    ("logits_kl_k", "bfloat16"): Tol(3.0, "as logits_nmse_k: mean KL tracks NMSE at this size of error"),
    ("logits_kl_eps", "bfloat16"): Tol(0.01, "nats; absorbs a baseline near zero"),
    ("logits_kl_guard", "bfloat16"): Tol(1.0, "nats; sanity guard only (5x the old fixed floor)"),
    ("logits_kl_k", "float16"): Tol(4.0, "as logits_nmse_k at fp16"),
    ("logits_kl_eps", "float16"): Tol(2e-3, "nats; absorbs a baseline near zero"),
    ("logits_kl_guard", "float16"): Tol(0.3, "nats; sanity guard only (10x the old fixed floor)"),
    ("logits_top1_k", "bfloat16"): Tol(
        2.0, "disagreement with fp64 at most 2x transformers' own bf16 disagreement; the torch executor measured "
        "0.052-0.064 vs transformers' 0.036-0.064 (T=c+37, B=2)"),
    ("logits_top1_eps", "bfloat16"): Tol(
        0.02, "plus one position (1/(B*T)): a single near-tie flip is never a verdict on its own"),
    ("logits_top1_guard", "bfloat16"): Tol(
        0.5, "sanity guard only: half the positions must agree with fp64 whatever transformers does"),
    ("logits_top1_k", "float16"): Tol(
        2.0, "as bf16; the torch executor measured 0.000-0.009 vs transformers' 0.000-0.006"),
    ("logits_top1_eps", "float16"): Tol(0.01, "plus one position (1/(B*T))"),
    ("logits_top1_guard", "float16"): Tol(0.7, "sanity guard only"),
    # -- the same executor run two ways (chunked / decoded / batched vs one-shot) -----------------
    ("equiv_rel_max_abs", "float64"): Tol(1e-12, "fp64 rounding only; measured <= 5.1e-15 (logits and state)"),
    ("equiv_rel_max_abs", "float32"): Tol(
        2e-5, "different chunking / batch shapes reorder fp32 sums; measured <= 1.5e-6 on logits, <= 3.5e-6 on "
              "carried state"),
    ("equiv_nmse", "float64"): Tol(1e-24, "fp64 rounding only; measured <= 8.3e-30"),
    ("equiv_nmse", "float32"): Tol(1e-9, "measured <= 7.1e-12"),
    ("equiv_nmse", "bfloat16"): Tol(
        2e-3, "decode uses the single-step update where prefill uses chunked SSD, so fp32 differences cross "
              "bf16 rounding boundaries and can flip a near-tie expert; measured <= 2.0e-4"),
    ("equiv_nmse", "float16"): Tol(5e-3, "as bf16; measured <= 8.3e-4"),
    ("equiv_top1", "float64"): Tol(1.0, "measured 1.000"),
    ("equiv_top1", "float32"): Tol(0.999, "only exact near-ties may flip; measured 1.000"),
    ("equiv_top1", "bfloat16"): Tol(0.97, "measured >= 0.992 on 100+ positions; a pick within 2 bf16 ulps of the "
                                          "other on both sides counts as agreeing (a rounding tie: a bf16 chunk after "
                                          "decode steps on tiny-8b flipped 2 of 47 such)"),
    ("equiv_top1", "float16"): Tol(0.98, "measured >= 0.994; a pick within 2 fp16 ulps counts as agreeing"),
    # -- greedy generation against transformers' generate (fp32 reference) -------------------------
    ("greedy_match", "float64"): Tol(1.0, "the same tokens, every step; measured 1.0 on every preset"),
    ("greedy_match", "float32"): Tol(1.0, "the same tokens, every step; measured 1.0 on every preset"),
    ("greedy_match", "bfloat16"): Tol(
        0.0, "may part at a near-tie (measured 0.0-1.0 of 16 steps); judged by greedy_divergence_in_topk"),
    ("greedy_match", "float16"): Tol(0.0, "as bf16; measured 1.0 on every preset"),
    # -- quantized weights (suites/quant.py; keyed by quant type, as llama.cpp's KL-divergence mode judges
    #    quants): regression bounds, about 2x the worst measured with llama.cpp 0c1e570 on the tiny presets
    #    (docs/llamacpp.md). They flag a quantizer that got worse; whether a type is near-lossless on a real
    #    model is read from the report's table, not from these bounds. The tiny presets' rows are narrower
    #    than 256, so llama.cpp writes Q5/Q8 blocks for Q4_K_M and Q8_0 for Q6_K there.
    ("quant_kl", "F16"): Tol(0.03, "nats vs the fp64 oracle, as the fp16 logits_kl row; measured <= 0.014 +- 0.006"),
    ("quant_kl", "BF16"): Tol(0.2, "as the bf16 logits_kl row; measured <= 0.032 +- 0.009 (tiny-latent-moe)"),
    ("quant_kl", "Q8_0"): Tol(0.3, "8-bit blocks, and the MoE presets' routers are built to flip experts; "
                                   "measured <= 0.075 +- 0.018 (tiny-moe), 0.0014-0.0017 on the dense presets"),
    ("quant_kl", "Q6_K"): Tol(0.3, "as Q8_0: llama.cpp writes the same Q8_0 tensors on the tiny presets"),
    ("quant_kl", "Q4_K_M"): Tol(1.5, "measured <= 0.475 +- 0.058 (tiny-moe), 0.038-0.053 on the dense presets"),
    ("quant_top1", "F16"): Tol(0.97, "agreement with the F32 weights, as the fp16 logits_top1 row; measured >= 0.994"),
    ("quant_top1", "BF16"): Tol(0.85, "as the bf16 logits_top1 row; measured >= 0.963 on the hand-made presets, "
                                      "0.89 on tiny-nano-30b (128 experts)"),
    ("quant_top1", "Q8_0"): Tol(0.80, "measured >= 0.902 +- 0.016 (tiny-moe)"),
    ("quant_top1", "Q6_K"): Tol(0.80, "as Q8_0 (the same tensors on the tiny presets)"),
    ("quant_top1", "Q4_K_M"): Tol(0.50, "measured >= 0.665 +- 0.026 (tiny-moe)"),
    # -- nemoh-bench's correctness gate: greedy tokens of a backend against the reference (transformers at the same
    #    dtype) on the same prompt. Where the two first pick different tokens and the top-2 margin between them,
    #    on both sides, is at most this share of max |reference logit|, the step is a near-tie, not WRONG
    ("greedy_tie_margin", "float64"): Tol(2e-12, "2x the fp64 logits_rel_max_abs: two logits each within it can swap"),
    ("greedy_tie_margin", "float32"): Tol(4e-5, "2x the fp32 logits_rel_max_abs: two logits each within it can swap"),
    ("greedy_tie_margin", "bfloat16"): Tol(
        0.6, "both sides round to bf16 (one ulp is 0.39% of the largest logit) and an expert choice can round the "
             "other way: measured with the torch executor vs transformers, both bf16, 24 greedy steps x 2 rows x 3 "
             "seeds: first differences at margins <= 0.0123 on tiny-dense, but 0.112 on tiny-moe and 0.207-0.551 on "
             "tiny-latent-moe, whose routers are built to flip under bf16 rounding. So at bf16 the gate catches only "
             "gross errors; bf16 correctness is judged by `nemoh conformance` (dtype-relative verdicts)"),
    ("greedy_tie_margin", "float16"): Tol(
        0.1, "11 mantissa bits: measured no greedy difference at all in the same 9 runs (tiny-dense, tiny-moe); "
             "8x bf16's dense-model figure, an expert flip at fp16 being rarer"),
    # -- localisation: one layer run in isolation against the oracle on the executor's own input ----
    ("layer_rel_rms", "float64"): Tol(1e-12, "measured <= 5.3e-16"),
    ("layer_rel_rms", "float32"): Tol(1e-5, "measured <= 3.8e-7"),
    ("layer_rel_rms", "bfloat16"): Tol(0.25, "bf16 outputs plus rare expert flips; measured <= 0.087"),
    ("layer_rel_rms", "float16"): Tol(0.15, "measured <= 0.052"),
    # -- eval-parity: lm-eval fixture tasks, `nemoh` vs lm-eval's `hf` at the same dtype (fp64 judged as
    #    fp32: transformers scans in fp32). Measured: 4 presets x torch/onnx x 8-16 MMLU-style items at
    #    0/1/5 shots, 4-12 GSM8K-style items at 1/3 shots, 24-32 generated tokens
    ("eval_loglik_abs", "float32"): Tol(
        1e-4, "nats, per choice; measured <= 9.2e-6 (fp32) and <= 3.3e-6 (fp64) on log-likelihoods of 3-25 nats. "
              "Not judged at bf16/fp16: one rounding-flipped expert choice moves a choice by O(1) (measured up to "
              "3.46 bf16, 1.06 fp16, on tiny-latent-moe)"),
    ("eval_loglik_mean_abs", "bfloat16"): Tol(0.5, "nats, mean over choices; measured <= 0.19 (tiny-latent-moe)"),
    ("eval_loglik_mean_abs", "float16"): Tol(0.1, "nats, mean over choices; measured <= 0.026 (tiny-latent-moe, onnx)"),
    ("eval_choice_agreement", "float32"): Tol(
        1.0, "the same choice on every item (a reference margin within 2x eval_loglik_abs is excused); measured "
             "1.0, smallest reference margin 3.6 nats. Reported at bf16/fp16 (measured 1.0), where a flip is "
             "bounded by the log-likelihood errors judged above"),
    ("eval_generation_match", "float32"): Tol(
        1.0, "the same text on every item (fp32 and fp64, torch and onnx); reported at bf16/fp16, where greedy "
             "decoding parts from transformers' on most items (measured 0.17-1.0 bf16, 0.67-1.0 fp16)"),
    ("eval_parting_logit_gap", "bfloat16"): Tol(
        6.0, "nats below the fp32 reference's top-1 of our token where the texts part; measured <= 3.22 over 54 "
             "partings (rank <= 13 of 512, an expert choice rounded the other way on tiny-latent-moe); at those "
             "steps the mean logit sits 6.7-10.9 nats below the top-1"),
    ("eval_parting_logit_gap", "float16"): Tol(
        6.0, "as bf16: fp16 rounds expert choices too (a log-likelihood moved by 1.06 above); measured <= 0.013 "
             "over 25 partings"),
    # -- quantized activations (ModelOpt W8A8 / W4A4 checkpoints), dtype key "float32+actq" (issue 20) ------
    #    Rounding an activation to e4m3 / e2m1 is discontinuous: where an fp32 executor's input to a quantized
    #    linear (~1e-7 from the fp64 oracle's) straddles a rounding boundary, one value moves by a whole step,
    #    and through the SSM state and later quantizers one such flip grows into a different rounding pattern
    #    downstream (NMSE up to the quantization noise itself). The exact meaning is therefore judged at fp64,
    #    where the torch executor matches the quantized oracle to <= 7e-16 (rel. max abs) on every quantized
    #    preset and the plain fp64 rows apply; these rows replace the fp32 ones for such checkpoints and only
    #    bound the cascade. Measured with `nemoh conformance --model PRESET --backend torch --json` on
    #    tiny-moe-fp8, tiny-nano-30b-nvfp4 and tiny-wide-nvfp4 (docs/quantized-formats.md); ~5x margin.
    **{(m, "float32+actq"): Tol(v, r) for m, v, r in (
        ("logits_rel_max_abs", 0.1, "measured <= 0.016 vs the fp64 oracle (tiny-wide-nvfp4, T=165)"),
        ("logits_nmse", 1e-4, "measured <= 1.2e-6 vs the fp64 oracle"),
        ("logits_kl", 1e-4, "measured <= 4.6e-6 vs the fp64 oracle"),
        ("logits_top1", 0.98, "measured 1.000 vs the fp64 oracle"),
        ("equiv_rel_max_abs", 0.3, "a split or decode path takes other fp32 roundings into the quantizers; "
                                   "measured <= 0.093 (logits and state)"),
        ("equiv_nmse", 0.02, "measured <= 0.0044 (tiny-wide-nvfp4, split [3, 257])"),
        ("equiv_top1", 0.85, "measured >= 0.942"),
        ("layer_rel_rms", 0.05, "one layer in isolation on the executor's own input: single flips only"),
        ("greedy_tie_margin", 0.2, "2x logits_rel_max_abs"),
    )},
    #    At bf16 the logits against the fp64 oracle are not judged when the oracle with its quantizers' inputs
    #    rounded to bf16 is itself out of the bf16 rows (suites/logits.py: "undecidable"); the equivalences (two
    #    paths of the same executor) are, with the bf16 rows, except where the cascade measurably exceeds one:
    ("equiv_nmse", "bfloat16+actq"): Tol(
        0.01, "151 decode steps against one prefill carry other bf16 roundings into the quantizers step after "
              "step; measured 0.0020 (tiny-nvfp4-64, torch), <= 4.5e-6 on the other quantized presets; ~5x"),
}

#: a suffix of the dtype key chosen for the whole run by the model under test ("actq": its activations are
#: quantized, nemoh.model.quant); set by conformance.references.Reference, one model per process
_VARIANT = {"key": ""}


def set_variant(key: str) -> None:
    """Judge with the `dtype+key` rows where the table has them (key "" restores the plain rows)."""
    _VARIANT["key"] = key


def variant() -> str:
    """The variant key in force ("" for the plain rows)."""
    return _VARIANT["key"]


def tol(metric: str, dtype: str) -> float | None:
    """The tolerance, or None where the table does not judge this metric at this dtype."""
    t = None
    if _VARIANT["key"]:
        t = TOLERANCES.get((metric, f"{dtype}+{_VARIANT['key']}"))
    t = t or TOLERANCES.get((metric, dtype))
    return None if t is None else t.value


#: the metrics judged relative to the reference at the executor's dtype where the table has their rows
RELATIVE_METRICS = ("logits_nmse", "logits_kl", "logits_top1")


def is_relative(metric: str, dtype: str) -> bool:
    """Whether `metric` at `dtype` is judged against the reference implementation's own error there."""
    return metric in RELATIVE_METRICS and (f"{metric}_k", dtype) in TOLERANCES


def distance(metric: str, value: float) -> float:
    """The metric as a distance (0 = identical): top-1 agreement becomes disagreement."""
    return 1.0 - value if metric == "logits_top1" else value


def relative_tolerance(metric: str, dtype: str, baseline: float, positions: int = 0, cross: bool = False) -> float:
    """The tolerance of `metric` (in its own units) when the reference implementation at `dtype` is at
    `baseline` from the same fp64 reference: d <= k * d_ref + eps (top-1: plus one of `positions`),
    never looser than the absolute guard.

    `cross`: the executor is compared with the reference implementation at the dtype itself (both carry
    their own rounding error): an executor within k * d_ref of fp64 is within (sqrt(k) + 1)^2 * d_ref of the
    reference for the squared-error metrics (NMSE, KL, by the triangle inequality on the root), and within
    (k + 1) * d_ref for top-1 disagreement, so k becomes that."""
    k, eps, guard = (TOLERANCES[(f"{metric}_{x}", dtype)].value for x in ("k", "eps", "guard"))
    if cross:
        k = k + 1 if metric == "logits_top1" else (math.sqrt(k) + 1) ** 2
    if metric == "logits_top1":
        bound = k * distance(metric, baseline) + eps + (1.0 / positions if positions else 0.0)
        return max(1.0 - bound, guard)
    return min(k * baseline + eps, guard)


def ratio(metric: str, value: float, baseline: float) -> float:
    """How many times further from fp64 than the reference at the same dtype (1 = as close; inf when
    the reference is exact and the executor is not; 1 when both are exact)."""
    d, d_ref = distance(metric, value), distance(metric, baseline)
    if d_ref > 0:
        return max(d, 0.0) / d_ref
    return 1.0 if d <= 0 else math.inf


def rel_max_abs(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (in fp64; 0 when both are all zeros)."""
    out, ref = out.double(), ref.double()
    denom = ref.abs().max().item()
    err = (out - ref).abs().max().item() if out.numel() else 0.0
    return err / denom if denom else err


def top1_agreement(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.argmax(-1) == ref.argmax(-1)).double().mean().item()

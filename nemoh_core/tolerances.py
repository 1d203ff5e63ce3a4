"""The one table of tolerances, keyed by (metric, dtype), each with its reason.

Metrics (see `rel_max_abs` below):
  logits_rel_max_abs  max |out - ref| / max |ref| over all logits, ref = the precise reference
                      (nemoh's fp64 oracle, or transformers in fp32 with its dt quirk removed).
  logits_top1         the smallest acceptable fraction of positions whose argmax agrees with ref.
  equiv_rel_max_abs   the same executor against itself run another way: one-shot prefill vs
                      chunked prefill vs token-by-token decode, a sequence alone vs inside a
                      left-padded batch; for logits and for the carried state.

"measured" figures come from `python -m nemoh.measure_tolerances` (tests/test_models.py runs the
same comparisons) on the tiny presets with 200-300 token prompts on a CPU; margins leave room for
longer prompts and real models. The bugs the harness must catch move logits by far more: the
reference's dt clamp alone moves them by over 100x the fp32 tolerance on every preset (asserted in
tests/test_models.py::test_reference_dt_clamp_is_observable_and_explained).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tol:
    value: float
    reason: str


TOLERANCES: dict[tuple[str, str], Tol] = {
    ("logits_rel_max_abs", "float64"): Tol(
        1e-12, "fp64 rounding (eps 2.2e-16) over O(1e3)-term reductions; measured <= 1.4e-15 vs the oracle"),
    ("logits_rel_max_abs", "float32"): Tol(
        2e-5, "fp32 eps 1.2e-7 times reduction depth and layer count; measured <= 8.7e-7 vs the fp64 oracle and "
              "<= 4.3e-7 vs transformers fp32 (its dt clamp removed); 20x margin"),
    ("logits_top1", "float64"): Tol(1.0, "exact arithmetic up to 1e-15: every argmax agrees"),
    ("logits_top1", "float32"): Tol(0.999, "only exact near-ties may flip; measured 1.000 on every preset"),
    ("logits_top1", "bfloat16"): Tol(
        0.90, "bf16 keeps 8 mantissa bits; one rounding-induced expert flip moves a token's logits by O(1); "
              "measured 0.933-0.987 vs the fp64 oracle"),
    ("logits_top1", "float16"): Tol(0.97, "fp16 keeps 11 mantissa bits; measured 0.990-0.997 vs the fp64 oracle"),
    ("equiv_rel_max_abs", "float64"): Tol(1e-12, "fp64 rounding only; measured <= 1.4e-15"),
    ("equiv_rel_max_abs", "float32"): Tol(
        2e-5, "different chunking / batch shapes reorder fp32 sums; measured <= 7.0e-7"),
    ("equiv_rel_max_abs", "bfloat16"): Tol(
        2e-2, "decode uses the single-step update where prefill uses chunked SSD; fp32 differences cross bf16 "
              "rounding boundaries; measured <= 5.0e-3 (about 2.5 bf16 ulps at the logit scale)"),
    ("equiv_rel_max_abs", "float16"): Tol(5e-3, "as bf16 with 3 more mantissa bits; measured <= 1.0e-3"),
}


def tol(metric: str, dtype: str) -> float:
    return TOLERANCES[(metric, dtype)].value


def rel_max_abs(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (in fp64; 0 when both are all zeros)."""
    out, ref = out.double(), ref.double()
    denom = ref.abs().max().item()
    err = (out - ref).abs().max().item() if out.numel() else 0.0
    return err / denom if denom else err


def top1_agreement(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.argmax(-1) == ref.argmax(-1)).double().mean().item()

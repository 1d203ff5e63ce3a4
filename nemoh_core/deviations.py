"""Probes for the known reference deviations (suites/known_deviations.toml): each measures, on the
model under test, whether the deviation shows and what it changes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import oracle
from .tolerances import rel_max_abs, top1_agreement


class Unavailable(Exception):
    """The probe cannot run here (e.g. transformers missing)."""


def _hf(ref, dtype: str, intended: bool = True):
    m = ref.hf(dtype, intended)
    if m is None:
        raise Unavailable(ref.hf_unavailable)
    return m


def dt_clamp(ref, ids: torch.Tensor) -> dict:
    """Share of dt below time_step_min on the probe prompt; shipped vs corrected reference logits."""
    g, p = ref.graph64, ref.params
    trace: dict[str, torch.Tensor] = {}
    intended = oracle.run(g, p, ids, trace=trace)
    below, total = 0, 0
    tmin = ref.config.time_step_min
    for layer in g.layers:
        if layer.kind != "mamba":
            continue
        pre = f"layers.{layer.index}.mixer."
        H = ref.config.mamba_num_heads
        dt = F.softplus(trace[pre + "in_proj"][..., -H:] + p[pre + "dt_bias"])
        below += int((dt < tmin).sum())
        total += dt.numel()
    clamped = oracle.run(g, p, ids, dt_clamp_min=tmin)
    out = {"time_step_min": tmin, "dt_below_min_fraction": below / max(total, 1),
           "oracle_clamped_vs_intended_rel_max_abs": rel_max_abs(clamped, intended),
           "oracle_clamped_vs_intended_top1_agreement": top1_agreement(clamped, intended)}
    with torch.inference_mode():
        shipped = _hf(ref, "float64", intended=False)(input_ids=ids).logits
        corrected = _hf(ref, "float64", intended=True)(input_ids=ids).logits
    out.update(shipped_vs_corrected_rel_max_abs=rel_max_abs(shipped, corrected),
               shipped_vs_corrected_top1_agreement=top1_agreement(shipped, corrected),
               shipped_vs_oracle_clamped_rel_max_abs=rel_max_abs(shipped, clamped))
    return out


def hf_fp64_precision(ref, ids: torch.Tensor) -> dict:
    with torch.inference_mode():
        hf = _hf(ref, "float64")(input_ids=ids).logits
    return {"transformers_fp64_vs_oracle_fp64_rel_max_abs": rel_max_abs(hf, ref.oracle_logits(ids))}


def hf_eager_fp64_padding(ref, ids: torch.Tensor) -> dict:
    _hf(ref, "float64")  # raises Unavailable without transformers
    from transformers import NemotronHForCausalLM

    mask = torch.ones_like(ids)
    mask[-1, : ids.shape[1] // 3] = 0
    out = {}
    for attn in ("eager", "sdpa"):
        m = NemotronHForCausalLM.from_pretrained(str(ref.path), dtype=torch.float64, attn_implementation=attn,
                                                 experts_implementation="eager", local_files_only=True).eval()
        with torch.inference_mode():
            logits = m(input_ids=ids, attention_mask=mask).logits
        out[f"{attn}_nan_at_real_tokens"] = bool(torch.isnan(logits[mask.bool()]).any())
    return out

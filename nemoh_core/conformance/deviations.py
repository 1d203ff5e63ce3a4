"""The known ways the transformers reference departs from Nemotron-H's intended math: each entry
says what it is, the evidence, how the suites treat it, and names the probe right above it that
measures, on the model under test, whether the deviation shows and what it changes. The conformance
JSON and HTML report show each entry with that measurement.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from nemoh import oracle
from nemoh.conformance.tolerances import rel_max_abs, top1_agreement


@dataclass(frozen=True)
class Deviation:
    id: str
    title: str
    reference: str  # where in the reference's code it comes from
    description: str
    evidence: str
    treatment: str  # how the suites deal with it
    probe: Callable[[Any, torch.Tensor], dict]  # (nemoh.conformance.runner.Reference, prompt) -> measurements


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


#: every known deviation, in the order reports list them
DEVIATIONS: tuple[Deviation, ...] = (
    Deviation(
        id='hf-dt-clamp-prefill-only',
        title='transformers clamps dt at time_step_min in its chunked (prefill) path only',
        reference='transformers 5.x NemotronHMamba2Mixer.__init__: self.time_step_limit = (config.time_step_min, inf)',
        description="""\
The mixer passes dt_limit=(time_step_min, inf) to its chunked scan, so every dt below time_step_min
(0.001 in releases) is raised to it during prefill; its single-token decode path
(selective_state_update) never clamps. The config's time_step_limit (default (0, inf), i.e. no clamp) is
the intended semantics; time_step_min/max/floor are init-time settings. Released checkpoints have dt
values below 0.001, so transformers' prefill and its own decode disagree on them.""",
        evidence="""\
tests/backends/test_torch_backend.py::test_reference_dt_clamp_is_observable_and_explained: on every
preset the shipped reference moves the logits by more than 100x the fp32 tolerance, and nemoh's oracle
run with the same clamp (oracle.run(..., dt_clamp_min=time_step_min)) reproduces the shipped reference
within the fp32 tolerance: the deviation is exactly the clamp.""",
        treatment="""\
Every comparison against transformers uses nemoh.oracle.reference.load_reference(intended=True), which
sets each mixer's time_step_limit back to the config's value. An executor that clamps like the shipped
reference FAILs the logits suite against the oracle and against the corrected reference. The probe
reports, for this model, the share of dt values below time_step_min and how far the shipped reference's
logits move.""",
        probe=dt_clamp,
    ),
    Deviation(
        id='hf-fp64-scan-in-fp32',
        title='transformers computes the Mamba scan in fp32 even in a float64 model',
        reference=("transformers 5.x mamba2_chunk_scan: hidden_states.float(), B.float(), C.float(); "
                   "selective_state_update: exp(dt.float() * A.float())"),
        description="""\
A float64 transformers model is not an fp64 reference: its chunked scan casts x, B, C and dt*A to fp32,
and its decode path computes exp(dt*A) in fp32. It agrees with an fp64 computation to about 1e-7 of the
logits' scale, not to 1e-15.""",
        evidence="""\
The probe measures transformers fp64 (clamp removed) against nemoh's fp64 oracle on this model;
tests/backends/test_torch_backend.py::test_oracle_equals_transformers_fp64 bounds it at the fp32
tolerance.""",
        treatment="""\
nemoh's own fp64 oracle is the precise reference. Comparisons with transformers in float64 are judged at
the float32 tolerances, never tighter.""",
        probe=hf_fp64_precision,
    ),
    Deviation(
        id='hf-eager-fp64-padded-nan',
        title='transformers with eager attention in float64 turns a left-padded row into NaN',
        reference=("transformers 5.x eager_attention_forward with a float64 padding mask; "
                   "the Mamba layers then carry the NaN"),
        description="""\
With attn_implementation="eager" in float64, the fully masked query rows of the padding produce NaN; the
next Mamba layer multiplies padding by zero (NaN * 0 = NaN) and its scan carries the NaN into the real
tokens of that row. SDPA attention, and float32, do not show it.""",
        evidence="""\
Observed with transformers 5.23 on the tiny presets; the probe re-checks it on this model.""",
        treatment="""\
nemoh.oracle.reference loads transformers with SDPA attention. The probe reports whether the eager fp64
reference would have produced NaN on a left-padded batch of this model.""",
        probe=hf_eager_fp64_padding,
    ),
)


def measure_all(ref, prompt: torch.Tensor) -> list[dict[str, Any]]:
    """Every deviation with what its probe measured on this model (or why it could not)."""
    out = []
    for d in DEVIATIONS:
        entry = {k: getattr(d, k) for k in ("id", "title", "reference", "description", "evidence", "treatment")}
        try:
            entry["measured"], entry["status"] = d.probe(ref, prompt), "measured"
        except Unavailable as e:
            entry["measured"], entry["status"] = {}, f"not measured: {e}"
        out.append(entry)
    return out

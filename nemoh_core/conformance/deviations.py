"""The known ways the transformers reference departs from Nemotron-H's intended math.

A known deviation is a fact about particular versions of the reference, so each entry says:
  affects      which versions have it (a version specifier, read against the installed package),
  present      how its probe's measurements tell whether the installed version shows it,
  description  what it is (shown when the installed reference has it), and `absent` (shown when not),
  evidence     how it was established, and `treatment`, how the suites deal with it.
The probe right above each entry measures it on the model under test, in every run. The report shows
the text that follows the measurement, the versions the registry expects it in, and whether the two
agree (`consistent`): a reference that gains or loses a quirk the registry did not expect is named
in the report, and tests assert that consistency rather than the quirk itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from nemoh import oracle
from nemoh.conformance.tolerances import rel_max_abs, tol, top1_agreement


@dataclass(frozen=True)
class Deviation:
    id: str
    title: str
    reference: str  # where in the reference's code it comes from
    affects: str  # the versions that have it: "PACKAGE" plus a PEP 440 specifier, e.g. "transformers>=5.15,<5.25"
    description: str  # what it is, shown when the installed reference has it
    absent: str  # shown when the probe finds the installed reference without it
    evidence: str
    treatment: str  # how the suites deal with it
    probe: Callable[[Any, torch.Tensor], dict]  # (nemoh.conformance.runner.Reference, prompt) -> measurements
    present: Callable[[dict], bool]  # the probe's measurements -> does the installed reference show it

    @property
    def package(self) -> str:
        return split_requirement(self.affects)[0]

    def expected(self, version: str) -> bool:
        """Does the registry say that `version` of the package has this deviation?"""
        from packaging.specifiers import SpecifierSet  # packaging comes with transformers, which the probes need
        from packaging.version import Version

        return Version(version) in SpecifierSet(split_requirement(self.affects)[1], prereleases=True)


def split_requirement(text: str) -> tuple[str, str]:
    """'transformers>=5.15,<5.25' -> ('transformers', '>=5.15,<5.25')."""
    i = next((k for k, ch in enumerate(text) if ch in "<>=!~"), len(text))
    return text[:i].strip(), text[i:].strip()


class Unavailable(Exception):
    """The probe cannot run here (e.g. transformers missing)."""


def _hf(ref, dtype: str, intended: bool = True):
    m = ref.hf(dtype, intended)
    if m is None:
        raise Unavailable(ref.hf_unavailable)
    return m


def dt_clamp(ref, ids: torch.Tensor) -> dict:
    """The dt limit the installed reference's prefill applies, the share of dt below time_step_min on the
    probe prompt, and how far the shipped reference's logits sit from the corrected ones."""
    shipped_model = _hf(ref, "float64", intended=False)  # first: without it, no oracle pass is spent
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
    limits = {tuple(float(x) for x in layer.mixer.time_step_limit) for layer in shipped_model.model.layers
              if hasattr(layer.mixer, "time_step_limit")}
    shipped_low = max((lo for lo, _ in limits), default=float("nan"))
    out = {"time_step_min": tmin, "config_time_step_limit_low": float(ref.config.time_step_limit[0]),
           "shipped_dt_limit_low": shipped_low, "dt_below_min_fraction": below / max(total, 1),
           "oracle_clamped_vs_intended_rel_max_abs": rel_max_abs(clamped, intended),
           "oracle_clamped_vs_intended_top1_agreement": top1_agreement(clamped, intended)}
    with torch.inference_mode():
        shipped = shipped_model(input_ids=ids).logits
        corrected = _hf(ref, "float64", intended=True)(input_ids=ids).logits
    out.update(shipped_vs_corrected_rel_max_abs=rel_max_abs(shipped, corrected),
               shipped_vs_corrected_top1_agreement=top1_agreement(shipped, corrected),
               shipped_vs_oracle_clamped_rel_max_abs=rel_max_abs(shipped, clamped),
               shipped_vs_oracle_intended_rel_max_abs=rel_max_abs(shipped, intended))
    return out


def dt_clamp_present(m: dict) -> bool:
    """The shipped prefill raises dt to a floor above the config's own limit."""
    return m["shipped_dt_limit_low"] > m["config_time_step_limit_low"]


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


def fp64_scan_present(m: dict) -> bool:
    """transformers' fp64 model is further from the fp64 oracle than fp64 rounding allows."""
    return m["transformers_fp64_vs_oracle_fp64_rel_max_abs"] > (tol("logits_rel_max_abs", "float64") or 0.0)


def eager_nan_present(m: dict) -> bool:
    return bool(m["eager_nan_at_real_tokens"])


#: every known deviation, in the order reports list them. `affects` was read off transformers' sources
#: (modeling_nemotron_h.py of every release from 5.3.0, the first with Nemotron-H, to 5.25.0) and is
#: re-measured by each probe on the installed version: tests/core/test_conformance.py asserts the two agree.
DEVIATIONS: tuple[Deviation, ...] = (
    Deviation(
        id='hf-dt-clamp-prefill-only',
        title='transformers clamps dt at time_step_min in its chunked (prefill) path only',
        reference=('transformers 5.15-5.24 NemotronHMamba2Mixer.__init__: '
                   'self.time_step_limit = (config.time_step_min, float("inf"))'),
        affects="transformers>=5.15,<5.25",
        description="""\
The installed transformers' mixer passes dt_limit=(time_step_min, inf) to its chunked scan, so every dt below
time_step_min (0.001 in releases) is raised to it during prefill; its single-token decode path
(selective_state_update) never clamps. The config's time_step_limit (default (0, inf), i.e. no clamp) is
the intended semantics; time_step_min/max/floor are init-time settings. Released checkpoints have dt
values below 0.001, so this reference's prefill and its own decode disagree on them.""",
        absent="""\
The installed transformers takes the mixer's dt limit from the config's time_step_limit (as 5.3-5.14 and
5.25 on do), so its prefill does not clamp dt at time_step_min: the shipped and the corrected reference
are the same model here. transformers 5.15 to 5.24 did clamp; a port checked against one of those
versions as shipped inherits that clamp.""",
        evidence="""\
Read off transformers' sources: 5.3.0-5.14.1 set self.time_step_limit = config.time_step_limit, 5.15.0-5.24.0
set (config.time_step_min, inf), 5.25.0 returns to the config's. The probe reads the limit the installed
reference's mixers use, and measures the shipped reference against the corrected one and against nemoh's
oracle run with the same clamp (oracle.run(..., dt_clamp_min=time_step_min)); with the clamp present on a
model with dt on both sides of the minimum, the shipped reference moves the logits by far more than the fp32
tolerance and the clamped oracle reproduces it within that tolerance
(tests/backends/test_torch_backend.py::test_reference_dt_clamp_is_exactly_the_clamp).""",
        treatment="""\
Every comparison against transformers uses nemoh.oracle.reference.load_reference(intended=True), which
sets each mixer's time_step_limit back to the config's value (a no-op on a version without the clamp). An
executor that clamps like the 5.15-5.24 reference FAILs the logits suite against the oracle, whatever the
installed transformers. The probe reports, for this model, the share of dt values below time_step_min and
how far the shipped reference's logits move.""",
        probe=dt_clamp,
        present=dt_clamp_present,
    ),
    Deviation(
        id='hf-fp64-scan-in-fp32',
        title='transformers computes the Mamba scan in fp32 even in a float64 model',
        reference=("transformers 5.x mamba2_chunk_scan: hidden_states.float(), B.float(), C.float(); "
                   "selective_state_update: exp(dt.float() * A.float())"),
        affects="transformers>=5.3",
        description="""\
A float64 transformers model is not an fp64 reference: its chunked scan casts x, B, C and dt*A to fp32,
and its decode path computes exp(dt*A) in fp32. It agrees with an fp64 computation to about 1e-7 of the
logits' scale, not to 1e-15.""",
        absent="""\
The installed transformers' float64 model agrees with nemoh's fp64 oracle within fp64 rounding on this
model: its scan no longer drops to fp32.""",
        evidence="""\
The probe measures transformers fp64 (clamp removed) against nemoh's fp64 oracle on this model;
tests/backends/test_torch_backend.py::test_oracle_equals_transformers_fp64 bounds it at the fp32
tolerance.""",
        treatment="""\
nemoh's own fp64 oracle is the precise reference. Comparisons with transformers in float64 are judged at
the float32 tolerances, never tighter.""",
        probe=hf_fp64_precision,
        present=fp64_scan_present,
    ),
    Deviation(
        id='hf-eager-fp64-padded-nan',
        title='transformers with eager attention in float64 turns a left-padded row into NaN',
        reference=("transformers 5.x eager_attention_forward with a float64 padding mask; "
                   "the Mamba layers then carry the NaN"),
        affects="transformers>=5.3",
        description="""\
With attn_implementation="eager" in float64, the fully masked query rows of the padding produce NaN; the
next Mamba layer multiplies padding by zero (NaN * 0 = NaN) and its scan carries the NaN into the real
tokens of that row. SDPA attention, and float32, do not show it.""",
        absent="""\
The installed transformers' eager float64 attention keeps a left-padded row finite on this model.""",
        evidence="""\
Observed with transformers 5.23 and 5.25 on the tiny presets; the probe re-checks it on this model.""",
        treatment="""\
nemoh.oracle.reference loads transformers with SDPA attention. The probe reports whether the eager fp64
reference would have produced NaN on a left-padded batch of this model.""",
        probe=hf_eager_fp64_padding,
        present=eager_nan_present,
    ),
)


def installed_version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def measure_all(ref, prompt: torch.Tensor) -> list[dict[str, Any]]:
    """Every deviation with what its probe measured on this model (or why it could not), whether the
    installed reference shows it, whether the registry expected that, and the text that follows."""
    out = []
    for d in DEVIATIONS:
        entry: dict[str, Any] = {k: getattr(d, k) for k in ("id", "title", "reference", "affects", "evidence",
                                                            "treatment")}
        version = installed_version(d.package)
        entry["installed"] = f"{d.package} {version}" if version else f"{d.package} not installed"
        entry["expected"] = d.expected(version) if version else None
        try:
            entry["measured"], entry["status"] = d.probe(ref, prompt), "measured"
        except Unavailable as e:
            entry["measured"], entry["status"] = {}, f"not measured: {e}"
        if entry["measured"]:
            present = bool(d.present(entry["measured"]))
            entry["present"], entry["consistent"] = present, present == entry["expected"]
            entry["description"] = d.description if present else d.absent
        else:  # not measured: say what it is, and what the registry expects of the installed version
            entry["present"], entry["consistent"] = None, None
            entry["description"] = d.description
        out.append(entry)
    return out

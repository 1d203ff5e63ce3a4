"""The independent reference: transformers' own NemotronHForCausalLM, loaded offline.

transformers departs from the model's intended math in one known way (see model-facts):
its Mamba mixer sets `time_step_limit = (time_step_min, inf)`, so its chunked (prefill) path clamps
dt at time_step_min while its single-token decode path does not clamp. `load_reference(...,
intended=True)` removes that clamp (sets each mixer's limit back to the config's
`time_step_limit`), giving the intended semantics that nemoh's oracle and executors implement;
`intended=False` keeps transformers exactly as shipped.

A second quirk, seen with transformers 5.23: in float64 with `attn_implementation="eager"`, a
left-padded row comes out NaN at its real tokens too (the fully masked padding queries produce NaN,
and the Mamba layers carry it forward since NaN * 0 = NaN). SDPA attention does not; this loader
uses SDPA.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from nemoh import dtypes


def quiet_transformers() -> None:
    """Silence transformers' load progress bars and kernel-fallback notes (for the CLI's output)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_reference(path: str | Path, dtype: str = "float32", *, intended: bool = True):
    """transformers' model for the checkpoint at `path`, in eval mode, never touching the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import NemotronHForCausalLM

    # eager experts: the grouped-mm kernel has no fp64 path
    model = NemotronHForCausalLM.from_pretrained(
        str(path), dtype=dtypes.torch_dtype(dtype), experts_implementation="eager", attn_implementation="sdpa",
        trust_remote_code=False, local_files_only=True).eval()
    return remove_dt_clamp(model) if intended else model


def remove_dt_clamp(model):
    """Set each Mamba mixer's dt limit back to the config's time_step_limit (the intended math). Records in
    `model.nemoh_dt_note` what that changed: transformers 5.15-5.24 clamp dt at time_step_min in prefill,
    other versions take the config's limit already (nemoh.conformance.deviations)."""
    import transformers

    limit = tuple(float(x) for x in model.config.time_step_limit)
    changed = False
    for layer in model.model.layers:
        if hasattr(layer.mixer, "time_step_limit"):
            changed |= tuple(float(x) for x in layer.mixer.time_step_limit) != limit
            layer.mixer.time_step_limit = limit
    version = transformers.__version__
    model.nemoh_dt_note = (f"dt clamp of transformers {version} removed (intended semantics)" if changed else
                           f"no dt clamp in transformers {version} (its prefill takes the config's limit)")
    return model


@torch.inference_mode()
def reference_logits(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask).logits

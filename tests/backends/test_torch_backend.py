"""The PyTorch executor against transformers, the second opinion (the oracle and the equivalences every
backend holds are in test_equivalences.py), and the reference's own quirks it must not inherit."""

from __future__ import annotations

import pytest
import torch
from model_checks import assert_close, open_cached, oracle_logits, prompt

from nemoh import oracle
from nemoh.conformance.tolerances import rel_max_abs, tol, top1_agreement
from nemoh.model.presets import PRESETS, resolve_model
from nemoh.oracle.reference import load_reference, reference_logits
from nemoh.runtime.session import greedy_generate

NAMES = sorted(PRESETS)


def model(name: str, dtype: str):
    return open_cached(name, dtype, "torch")


@pytest.mark.parametrize("name", NAMES)
def test_fp32_executor_vs_oracle_and_transformers(name):
    out = model(name, "float32").session(2).forward(prompt())
    assert_close(out, oracle_logits(name), "logits_rel_max_abs", "float32", f"{name} vs oracle")
    assert top1_agreement(out, oracle_logits(name)) >= tol("logits_top1", "float32")
    hf = load_reference(resolve_model(name), "float32", intended=True)
    ref = reference_logits(hf, prompt())
    assert_close(out, ref, "logits_rel_max_abs", "float32", f"{name} vs transformers")


@pytest.mark.parametrize("name", NAMES)
def test_oracle_equals_transformers_fp64(name):
    """Both references agree once the reference's dt clamp is aligned; the rest is transformers
    computing its scan in fp32 even in an fp64 model (its chunked path calls .float())."""
    hf = load_reference(resolve_model(name), "float64", intended=True)
    assert_close(reference_logits(hf, prompt()), oracle_logits(name), "logits_rel_max_abs", "float32", name)


@pytest.mark.parametrize("name", NAMES)
def test_reference_dt_clamp_is_observable_and_explained(name):
    """transformers as shipped clamps dt at time_step_min in prefill. On these presets (dt on both
    sides of time_step_min) that moves the logits far outside tolerance, and the oracle with the
    same clamp reproduces it: the deviation is exactly the clamp."""
    m = model(name, "float64")
    hf = load_reference(resolve_model(name), "float64", intended=False)
    shipped = reference_logits(hf, prompt())
    assert rel_max_abs(shipped, oracle_logits(name)) > 100 * tol("logits_rel_max_abs", "float32")
    clamped = oracle.run(m.graph, m.checkpoint.load(m.graph), prompt(), dt_clamp_min=m.config.time_step_min)
    assert_close(shipped, clamped, "logits_rel_max_abs", "float32", name)


@pytest.mark.parametrize("name", NAMES)
def test_greedy_generation_matches_transformers(name):
    m = model(name, "float32")
    ids = prompt(1, 24, seed=3)
    toks, _ = greedy_generate(m, ids, 12)
    hf = load_reference(resolve_model(name), "float32", intended=True)
    with torch.inference_mode():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    assert toks[0].tolist() == ref[0, 24:].tolist()


@pytest.mark.parametrize("name", NAMES)
def test_left_padded_batch_matches_transformers(name):
    ids = prompt(2, 64, seed=7).clone()
    mask = torch.ones_like(ids)
    mask[1, :20] = 0
    ids[1, :20] = 0
    out = model(name, "float32").session(2).forward(ids, mask)
    ref = reference_logits(load_reference(resolve_model(name), "float32", intended=True), ids, mask)
    real = mask.bool()
    assert_close(out[real], ref[real], "logits_rel_max_abs", "float32", f"{name} padded batch vs transformers")

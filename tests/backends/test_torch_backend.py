"""The PyTorch executor against transformers, the second opinion (the oracle and the equivalences every
backend holds are in test_equivalences.py), and the reference's own quirks it must not inherit."""

from __future__ import annotations

import pytest
import torch
from model_checks import assert_close, open_cached, oracle_logits, prompt

from nemoh import oracle
from nemoh.conformance.tolerances import rel_max_abs, tol, top1_agreement
from nemoh.model.presets import PRESETS, resolve_model
from nemoh.oracle.reference import load_reference, reference_logits, remove_dt_clamp
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
def test_reference_dt_clamp_is_exactly_the_clamp(name):
    """transformers 5.15-5.24 as shipped clamp dt at time_step_min in prefill; other versions take the
    config's limit. Whatever is installed, the shipped reference equals nemoh's oracle with the clamp the
    installed version's mixers apply, the corrected reference equals the oracle's intended math, and on these
    presets (dt on both sides of time_step_min) a clamp moves the logits by over 100x the fp32 tolerance, so
    a reference or an executor with it cannot pass for one without it."""
    m = model(name, "float64")
    params = m.checkpoint.load(m.graph)
    hf = load_reference(resolve_model(name), "float64", intended=False)
    low = max(float(layer.mixer.time_step_limit[0]) for layer in hf.model.layers
              if hasattr(layer.mixer, "time_step_limit"))
    assert low in (m.config.time_step_limit[0], m.config.time_step_min)  # no clamp, or the 5.15-5.24 one
    clamped = oracle.run(m.graph, params, prompt(), dt_clamp_min=m.config.time_step_min)
    assert rel_max_abs(clamped, oracle_logits(name)) > 100 * tol("logits_rel_max_abs", "float32")
    shipped = reference_logits(hf, prompt())
    expect = clamped if low == m.config.time_step_min else oracle_logits(name)
    assert_close(shipped, expect, "logits_rel_max_abs", "float32", f"{name}: shipped reference (dt limit {low})")
    # force the 5.15-5.24 clamp onto the installed version: reproduced by the clamped oracle, and removed again
    # by remove_dt_clamp, the loader's correction
    for layer in hf.model.layers:
        if hasattr(layer.mixer, "time_step_limit"):
            layer.mixer.time_step_limit = (m.config.time_step_min, float("inf"))
    assert_close(reference_logits(hf, prompt()), clamped, "logits_rel_max_abs", "float32", f"{name} forced clamp")
    assert_close(reference_logits(remove_dt_clamp(hf), prompt()), oracle_logits(name), "logits_rel_max_abs",
                 "float32", f"{name} corrected")


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

"""Whole-model checks on every preset: the PyTorch executor against the fp64 oracle and against
transformers, and the equivalences every backend must hold (chunking, decode, padding)."""

from __future__ import annotations


import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nemoh import oracle
from nemoh.errors import InputError
from nemoh.presets import PRESETS, resolve_model
from nemoh.reference import load_reference, reference_logits
from nemoh.runtime import greedy_generate
from nemoh.tolerances import rel_max_abs, tol, top1_agreement

from model_checks import T, assert_close, assert_states_close, open_cached, oracle_logits, prompt, run_chunks

NAMES = sorted(PRESETS)


def model(name: str, dtype: str):
    return open_cached(name, dtype, "torch")


@pytest.mark.parametrize("name", NAMES)
def test_fp64_executor_equals_oracle(name):
    out = model(name, "float64").session(2).forward(prompt())
    assert_close(out, oracle_logits(name), "logits_rel_max_abs", "float64", name)


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
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_dtypes(name, dtype):
    out = model(name, dtype).session(2).forward(prompt())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert top1_agreement(out, oracle_logits(name)) >= tol("logits_top1", dtype)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_prefill_chunk_edge_splits(name, dtype):
    m = model(name, dtype)
    ids = prompt()
    whole, st_whole = run_chunks(m, ids, None)
    c, K = m.config.chunk_size, m.config.conv_kernel
    for chunks in ([1, T - 1], [K - 1, T - K + 1], [K - 2, 1, T - K + 1], [c - 1, T - c + 1], [c + 1, T - c - 1],
                   [c, c, T - 2 * c], [1] * 5 + [T - 5]):
        logits, st_ = run_chunks(m, ids, chunks)
        assert_close(logits, whole, "equiv_rel_max_abs", dtype, f"{name} chunks {chunks}")
        assert_states_close(st_, st_whole, dtype, f"{name} chunks {chunks}")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(NAMES), cuts=st.lists(st.integers(1, T - 1), min_size=1, max_size=6, unique=True))
def test_prefill_random_splits(name, cuts):
    m = model(name, "float32")
    bounds = [0, *sorted(cuts), T]
    chunks = [b - a for a, b in zip(bounds, bounds[1:])]
    whole, st_whole = run_chunks(m, prompt(), None)
    logits, st_ = run_chunks(m, prompt(), chunks)
    assert_close(logits, whole, "equiv_rel_max_abs", "float32", f"{name} chunks {chunks}")
    assert_states_close(st_, st_whole, "float32", f"{name} chunks {chunks}")


@pytest.mark.parametrize("name", NAMES)
def test_decode_equals_prefill(name):
    m = model(name, "float32")
    ids = prompt()
    whole, st_whole = run_chunks(m, ids, None)
    s = m.session(2)
    s.prefill(ids[:, :200])
    steps = torch.cat([s.forward(ids[:, t:t + 1]) for t in range(200, T)], dim=1)
    assert_close(steps, whole[:, 200:], "equiv_rel_max_abs", "float32", f"{name} decode")
    assert_states_close(m.backend.export_state(s.state), st_whole, "float32", f"{name} decode")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_left_padded_batch_equals_each_sequence_alone(name, dtype):
    m = model(name, dtype)
    lengths = [T, 190, 37, 5]
    ids = torch.zeros(len(lengths), T, dtype=torch.int64)
    mask = torch.zeros(len(lengths), T, dtype=torch.int64)
    for b, n in enumerate(lengths):
        ids[b, T - n:] = prompt(1, n, seed=10 + b)[0]
        mask[b, T - n:] = 1
    s = m.session(len(lengths))
    batch = s.prefill(ids, mask, chunks=[100, T - 100])  # padding spanning a whole chunk, too
    nxt = prompt(len(lengths), 3, seed=99)
    steps = torch.cat([s.forward(nxt[:, t:t + 1]) for t in range(3)], 1)
    for b, n in enumerate(lengths):
        alone = m.session(1)
        one = alone.prefill(ids[b:b + 1, T - n:])
        one_steps = torch.cat([alone.forward(nxt[b:b + 1, t:t + 1]) for t in range(3)], 1)
        assert_close(batch[b, T - n:], one[0], "equiv_rel_max_abs", dtype, f"{name} row {b}")
        assert_close(steps[b], one_steps[0], "equiv_rel_max_abs", dtype, f"{name} row {b} decode")


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


def test_repeated_runs_are_bit_identical():
    m = model("tiny-latent-moe", "float32")
    a = m.session(2).prefill(prompt(), chunks=[100, 160])
    b = m.session(2).prefill(prompt(), chunks=[100, 160])
    assert torch.equal(a, b)


def test_snapshot_restore_and_state_import():
    m = model("tiny-moe", "float32")
    s = m.session(1)
    s.prefill(prompt(1, 50))
    snap = s.snapshot()
    first = s.forward(prompt(1, 3, seed=5))
    s.restore(snap)
    assert torch.equal(s.forward(prompt(1, 3, seed=5)), first)
    # export -> import round trip continues identically
    s.restore(snap)
    exported = m.backend.export_state(s.state)
    s.state = m.backend.import_state(exported)
    assert torch.equal(s.forward(prompt(1, 3, seed=5)), first)


def test_weights_on_the_backend_are_bit_equal_to_the_file():
    for dtype in ("float32", "bfloat16"):
        m = model("tiny-latent-moe", dtype)
        loaded = {t.name: m.backend.read_param(t.name) for t in m.graph.params}
        assert m.checkpoint.mismatches(loaded) == []
        name = "layers.0.mixer.dt_bias"
        loaded[name] = loaded[name].clone()
        loaded[name].view(torch.int16 if dtype == "bfloat16" else torch.int32)[0] ^= 1  # one bit
        assert m.checkpoint.mismatches(loaded) == [name]


@pytest.mark.parametrize("bad,match", [
    (torch.tensor([[1, 2, 512]]), r"token id 512 at \[0, 2\] is out of range \[0, 512\)"),
    (torch.tensor([[1, -1]]), r"token id -1 at \[0, 1\]"),
    (torch.tensor([[1.0, 2.0]]), "must be integers"),
    (torch.zeros(1, 0, dtype=torch.int64), "tokens >= 1"),
    (torch.ones(2, 3, 4, dtype=torch.int64), "shape"),
])
def test_bad_token_ids(bad, match):
    with pytest.raises(InputError, match=match):
        model("tiny-dense", "float32").session(bad.shape[0] if bad.dim() == 2 else 1).forward(bad)


def test_bad_masks():
    s = model("tiny-dense", "float32").session(1)
    with pytest.raises(InputError, match="shape"):
        s.forward(torch.ones(1, 4, dtype=torch.int64), torch.ones(1, 3))
    with pytest.raises(InputError, match="only 0"):
        s.forward(torch.ones(1, 3, dtype=torch.int64), torch.tensor([[0, 2, 1]]))
    with pytest.raises(InputError, match="left padding"):
        s.forward(torch.ones(1, 3, dtype=torch.int64), torch.tensor([[1, 0, 1]]))
    s.forward(torch.ones(1, 2, dtype=torch.int64), torch.tensor([[0, 1]]))
    with pytest.raises(InputError, match="left padding"):  # padding after real tokens, across chunks
        s.forward(torch.ones(1, 2, dtype=torch.int64), torch.tensor([[0, 1]]))


def test_cli_out_of_range_ids_exit_2(capsys):
    from nemoh.cli import main

    assert main(["generate", "tiny-dense", "--ids", "1,2,9999", "-n", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "9999" in err and "vocab_size 512" in err


def test_cli_generate_text_round_trip(capsys):
    from nemoh.cli import main

    assert main(["generate", "tiny-moe", "--prompt", "Two plus two is", "-n", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Two plus two is") and len(out) > len("Two plus two is")


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

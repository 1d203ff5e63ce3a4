"""What every backend must hold, run on every registered backend that can run here (the CuPy one
skips without CUDA; a new backend joins by registering): logits against the fp64 oracle, and the
equivalences for logits and carried state: one-shot prefill == any split == token-by-token decode,
a left-padded batch == each sequence alone, repeated runs bit-identical, snapshots independent,
weights bit-equal to the file.

Backend-specific checks (the exported ONNX file, transformers as second opinion for the PyTorch
executor, the CUDA kernels) live in this folder's per-backend files.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_checks import T, assert_close, assert_states_close, open_cached, oracle_logits, prompt, run_chunks

from nemoh.conformance.tolerances import tol, top1_agreement
from nemoh.model.config import load_config
from nemoh.model.ir import build_graph
from nemoh.model.presets import PRESETS, resolve_model
from nemoh.runtime.backend import capability, unsupported_reason
from nemoh.runtime.registry import available_backends, get_backend
from nemoh.runtime.session import greedy_generate

NAMES = sorted(PRESETS)
#: backends whose full equivalence run takes far longer than the default test run allows: the CUDA kernels
#: on the CPU emulator (every launch twice, threads as fibers; `nox -s cupy-emulated` runs its suites) and
#: llama.cpp in its worker (`nox -s llamacpp`); `pytest -m slow` runs them here too
SLOW = ("cupy-emulated", "llamacpp")
BACKENDS = [pytest.param(b, marks=pytest.mark.slow) if b.startswith(SLOW) else b for b in sorted(available_backends())]


def model(backend: str, name: str, dtype: str):
    """The cached model, or a skip saying why this backend can't run it here."""
    be = get_backend(backend)
    ok = be.available()
    if not ok.ok:
        pytest.skip(f"{backend}: {ok.reason}")
    graph = build_graph(load_config(resolve_model(name)), dtype)
    why = unsupported_reason(be, graph)
    if why:
        pytest.skip(why)
    exact = capability(be, "param_bit_equal", dtype)
    if not exact.ok:  # quantized weights: judged by the quant suite, not by these exact equivalences
        pytest.skip(f"{backend} at {dtype}: {exact.reason}")
    return open_cached(name, dtype, backend)


def needs(m, name: str) -> None:
    """Skip what a backend cannot do (its carried state stays inside, e.g. llama.cpp's), with its reason."""
    ok = capability(m.backend, name, m.graph.dtype)
    if not ok.ok:
        pytest.skip(f"{m.backend.name}: {ok.reason}")


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


# -- against the oracle --------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_logits_vs_oracle(backend, name, dtype):
    out = model(backend, name, dtype).session(2).prefill(prompt(), chunks=[100, T - 100])
    assert out.shape == (2, T, 512) and out.dtype == (torch.float64 if dtype == "float64" else torch.float32)
    assert_close(out, oracle_logits(name), "logits_rel_max_abs", dtype, f"{backend} {name} vs oracle")
    assert top1_agreement(out, oracle_logits(name)) >= tol("logits_top1", dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_top1(backend, dtype):
    for name in NAMES:
        m = model(backend, name, dtype)
        out = m.session(2).forward(prompt())
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        assert top1_agreement(out, oracle_logits(name)) >= tol("logits_top1", dtype), name
        st_ = m.backend.export_state(m.session(1).state)
        assert st_["layers.0.ssm"].dtype == torch.float32, "the SSM state stays fp32 at every dtype"


# -- equivalences ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_prefill_chunk_edge_splits(backend, name, dtype):
    m = model(backend, name, dtype)
    needs(m, "state_export")
    ids = prompt()
    whole, st_whole = run_chunks(m, ids, None)
    c, K = m.config.chunk_size, m.config.conv_kernel
    for chunks in ([1, T - 1], [K - 1, T - K + 1], [K - 2, 1, T - K + 1], [c - 1, T - c + 1], [c + 1, T - c - 1],
                   [c, c, T - 2 * c], [1] * 5 + [T - 5], [40, 2, T - 42]):  # last: short chunk after tokens
        logits, st_ = run_chunks(m, ids, chunks)
        assert_close(logits, whole, "equiv_rel_max_abs", dtype, f"{backend} {name} chunks {chunks}")
        assert_states_close(st_, st_whole, dtype, f"{backend} {name} chunks {chunks}")


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(NAMES), cuts=st.lists(st.integers(1, T - 1), min_size=1, max_size=6, unique=True))
def test_prefill_random_splits(backend, name, cuts):
    m = model(backend, name, "float32")
    needs(m, "state_export")
    bounds = [0, *sorted(cuts), T]
    chunks = [b - a for a, b in zip(bounds, bounds[1:])]
    whole, st_whole = run_chunks(m, prompt(), None)
    logits, st_ = run_chunks(m, prompt(), chunks)
    assert_close(logits, whole, "equiv_rel_max_abs", "float32", f"{backend} {name} chunks {chunks}")
    assert_states_close(st_, st_whole, "float32", f"{backend} {name} chunks {chunks}")


@pytest.mark.parametrize("name", NAMES)
def test_decode_equals_prefill(backend, name):
    m = model(backend, name, "float32")
    needs(m, "state_export")
    ids = prompt()
    whole, st_whole = run_chunks(m, ids, None)
    s = m.session(2)
    s.prefill(ids[:, :T - 24])
    steps = torch.cat([s.forward(ids[:, t:t + 1]) for t in range(T - 24, T)], dim=1)
    assert_close(steps, whole[:, T - 24:], "equiv_rel_max_abs", "float32", f"{backend} {name} decode")
    assert_states_close(m.backend.export_state(s.state), st_whole, "float32", f"{backend} {name} decode")


def test_decode_from_the_first_token(backend):
    """Every token a decode step from an empty state: conv state shorter than K-1, S = 0 at first."""
    m = model(backend, "tiny-moe", "float32")
    needs(m, "state_export")
    ids = prompt(2, 12, seed=4)
    whole, st_whole = run_chunks(m, ids, None)
    steps, st_steps = run_chunks(m, ids, [1] * 12)
    assert_close(steps, whole, "equiv_rel_max_abs", "float32", "decode from token 0")
    assert_states_close(st_steps, st_whole, "float32", "decode from token 0")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_left_padded_batch_equals_each_sequence_alone(backend, name, dtype):
    m = model(backend, name, dtype)
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
    assert torch.isfinite(batch).all()  # padded rows have no visible key: zeros, not NaN
    for b, n in enumerate(lengths):
        alone = m.session(1)
        one = alone.prefill(ids[b:b + 1, T - n:])
        one_steps = torch.cat([alone.forward(nxt[b:b + 1, t:t + 1]) for t in range(3)], 1)
        assert_close(batch[b, T - n:], one[0], "equiv_rel_max_abs", dtype, f"{backend} {name} row {b}")
        assert_close(steps[b], one_steps[0], "equiv_rel_max_abs", dtype, f"{backend} {name} row {b} decode")


def test_repeated_runs_are_bit_identical_and_snapshots_are_independent(backend):
    m = model(backend, "tiny-latent-moe", "float32")
    a = m.session(2).prefill(prompt(), chunks=[100, 160])
    b = m.session(2).prefill(prompt(), chunks=[100, 160])
    assert torch.equal(a, b)
    s = m.session(1)
    s.prefill(prompt(1, 50))
    snap = s.snapshot()
    first = s.forward(prompt(1, 3, seed=5))
    s.forward(prompt(1, 2, seed=6))  # moves on; the snapshot must not
    s.restore(snap)
    assert torch.equal(s.forward(prompt(1, 3, seed=5)), first)
    needs(m, "state_export")
    s.restore(snap)
    exported = m.backend.export_state(s.state)
    exported["layers.0.conv"].add_(1.0)  # an exported copy is the caller's: changing it changes nothing here
    s.restore(snap)
    s.state = m.backend.import_state(m.backend.export_state(s.state))  # export -> import continues identically
    assert torch.equal(s.forward(prompt(1, 3, seed=5)), first)


def test_last_only_runs_the_head_on_the_last_position(backend):
    m = model(backend, "tiny-list", "float32")
    ids = prompt(2, 40, seed=9)
    full, last = m.session(2).forward(ids), m.session(2).forward(ids, last_only=True)
    assert last.shape == (2, 1, 512)
    assert_close(last, full[:, -1:], "equiv_rel_max_abs", "float32", "last_only")


def test_greedy_generation_matches_the_oracle(backend):
    m = model(backend, "tiny-moe", "float32")
    ids = prompt(1, 24, seed=3)
    toks, _ = greedy_generate(m, ids, 12)
    seq = ids
    for _ in range(12):  # the oracle's own greedy continuation, one full forward per token
        from nemoh import oracle

        ref = open_cached("tiny-moe", "float64", "torch")
        nxt = oracle.run(ref.graph, ref.checkpoint.load(ref.graph), seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert toks[0].tolist() == seq[0, 24:].tolist()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_weights_are_bit_equal_to_the_file(backend, dtype):
    m = model(backend, "tiny-latent-moe", dtype)
    if hasattr(m.backend, "param_transform"):
        pytest.skip(f"{backend} holds parameters in its own form; the weights suite compares them there")
    loaded = {t.name: m.backend.read_param(t.name) for t in m.graph.params}
    assert m.checkpoint.mismatches(loaded) == []
    assert loaded["layers.1.mixer.gate.e_score_correction_bias"].dtype == torch.float32  # never rounded
    name = "layers.0.mixer.dt_bias"
    loaded[name] = loaded[name].clone()
    loaded[name].view(torch.int32 if loaded[name].dtype == torch.float32 else torch.int16)[0] ^= 1  # one bit
    assert m.checkpoint.mismatches(loaded) == [name]


def test_trace_gives_per_layer_and_per_op_outputs(backend):
    m, t = model(backend, "tiny-latent-moe", "float32"), open_cached("tiny-latent-moe", "float32", "torch")
    ids = prompt(2, 40, seed=8)
    tr_b, tr_t = {}, {}
    out = m.session(2).forward(ids, trace=tr_b)
    t.session(2).forward(ids, trace=tr_t)
    assert torch.equal(out, m.session(2).forward(ids))  # tracing does not change the result
    for i in range(m.config.num_layers):
        assert_close(tr_b[f"layers.{i}"], tr_t[f"layers.{i}"], "logits_rel_max_abs", "float32", f"layer {i}")
    names = ("layers.0.mixer.ssd", "layers.2.mixer.attention", "layers.1.mixer.experts", "norm_f")
    ops = [n for n in names if n in tr_b]
    for name in ops:  # per-op outputs where the engine exposes them (llama.cpp's graph names layers only)
        assert_close(tr_b[name].reshape(tr_t[name].shape), tr_t[name], "logits_rel_max_abs", "float32", name)

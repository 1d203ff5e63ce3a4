"""The CuPy backend on a GPU: each kernel against nemoh.oracle, the whole backend against the
torch executor on the tiny presets, and the equivalences every backend must hold.

Every test here skips, with the reason, where the backend is not available (no cupy, no driver,
no GPU). On a GPU machine: `pip install -e '.[test,gpu]'` (or an image with cupy) and
`python -m pytest -q tests/test_cupy_gpu.py`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nemoh import oracle
from nemoh.backends import cupy_backend as cb
from nemoh.tolerances import rel_max_abs, tol, top1_agreement

_AVAIL = cb.CupyBackend().available()
pytestmark = pytest.mark.skipif(not _AVAIL.ok, reason=f"cupy backend not available: {_AVAIL.reason}")

PRESETS = ("tiny-dense", "tiny-moe", "tiny-latent-moe", "tiny-list")
FP32 = 1e-5  # one fp32 kernel vs the fp64 oracle op: rounding over reductions of <= a few hundred terms
BF16 = 2e-2  # bf16 inputs/outputs: a few bf16 ulps


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def kb(request):
    """A backend with its kernels loaded and no model: drives single kernels."""
    be = cb.CupyBackend()
    be.init_device(request.param)
    return be


def up(be, t: torch.Tensor):
    return be._upload(t.to(torch.bfloat16 if be.dtype == "bfloat16" else torch.float32))


def down(be, a, dtype: str | None = None) -> torch.Tensor:
    return be._download(a, dtype or be.dtype).double()


def tdt(be) -> torch.dtype:
    return torch.bfloat16 if be.dtype == "bfloat16" else torch.float32


def lim(be) -> float:
    return BF16 if be.dtype == "bfloat16" else FP32


def poison(be, shape, dtype=None):
    """An output buffer full of NaN, so an element the kernel never writes fails the comparison."""
    a = be._empty(shape, dtype or be.dtype)
    a.fill(0x7FC0 if (dtype or be.dtype) == "bfloat16" else np.nan)
    return a


# ----------------------------------------------------------------------------------------------
# Kernels vs the oracle
# ----------------------------------------------------------------------------------------------

def test_embedding(kb):
    W = torch.randn(300, 72, generator=gen(1)).to(tdt(kb))
    ids = torch.randint(0, 300, (2, 9), generator=gen(2))
    out = poison(kb, (18, 72))
    with kb.stream:
        kb._run(kb._k("embedding"), cb._l((18,), (256,), "e"), kb._cp.asarray(ids.int().numpy()), up(kb, W), out, 72,
                300)
    assert torch.equal(down(kb, out).view(2, 9, 72), oracle.embedding(ids, W).double())


@pytest.mark.parametrize("D", [64, 4480])
def test_add_rmsnorm(kb, D):
    x = torch.randn(5, D, generator=gen(3)).to(tdt(kb))
    dl = torch.randn(5, D, generator=gen(4)).to(tdt(kb))
    w = (1 + 0.1 * torch.randn(D, generator=gen(5))).to(tdt(kb))
    xd, h = up(kb, x), poison(kb, (5, D))
    with kb.stream:
        kb._run(kb._k("add_rmsnorm"), cb.launch_rows(5, D), xd, up(kb, dl), up(kb, w), h, None, D, 1e-5)
    xs = (x + dl)
    assert torch.equal(down(kb, xd), xs.double())  # residual rounded once to the dtype, as torch
    ref = oracle.rmsnorm(xs.double(), w.double(), 1e-5)
    assert rel_max_abs(down(kb, h), ref) < lim(kb)


def test_gated_rmsnorm(kb):
    M, G, gs = 4, 4, 40
    y = torch.randn(M, G * gs, generator=gen(6))
    z = torch.randn(M, 3 * G * gs, generator=gen(7)).to(tdt(kb))  # z = first G*gs columns of a wider row
    w = torch.randn(G * gs, generator=gen(8)).to(tdt(kb))
    out = poison(kb, (M, G * gs))
    with kb.stream:
        kb._run(kb._k("gated_rmsnorm"), cb.launch_gated_norm(M, G), kb._cp.asarray(y.numpy()), up(kb, z),
                3 * G * gs, up(kb, w), out, G * gs, gs, 1e-5)
    ref = oracle.gated_rmsnorm(y.double(), z[:, :G * gs].double(), w.double(), gs, 1e-5)
    assert rel_max_abs(down(kb, out), ref) < lim(kb)


@pytest.mark.parametrize("T", [1, 2, 3, 70])
def test_conv1d_prefill_and_state(kb, T):
    B, C, K, ld, off = 2, 50, 4, 130, 17
    xbc = torch.randn(B, T, ld, generator=gen(9)).to(tdt(kb))
    w = torch.randn(C, 1, K, generator=gen(10)).to(tdt(kb))
    bias = torch.randn(C, generator=gen(11)).to(tdt(kb))
    s0 = torch.randn(B, C, K - 1, generator=gen(12)).to(tdt(kb))
    mask = torch.ones(B, T, dtype=torch.int32)
    mask[1, : T // 2] = 0
    st, out = up(kb, s0), poison(kb, (B * T, C))
    xd, md = up(kb, xbc), kb._cp.asarray(mask.numpy())
    with kb.stream:
        kb._run(kb._k("conv1d_prefill"), cb.launch_conv_prefill(B, T, C), kb._ptr(xd, off), ld, up(kb, w),
                up(kb, bias), st, md, out, T, C, K, cb.CONV_TT)
        kb._run(kb._k("conv1d_state_update"), cb.launch_flat(B * C, 256, "u"), kb._ptr(xd, off), ld, st, md, B, T, C,
                K)
    x = xbc[:, :, off:off + C].double() * mask[..., None]
    y, s = oracle.causal_conv1d(x, w.double(), bias.double(), s0.double())
    y = y * mask[..., None]
    assert rel_max_abs(down(kb, out).view(B, T, C), y) < lim(kb)
    assert torch.equal(down(kb, st), s)  # the state is the last K-1 raw (masked) inputs, exactly


def test_conv1d_step_equals_prefill(kb):
    B, C, K = 3, 40, 4
    xs = torch.randn(6, B, C, generator=gen(13)).to(tdt(kb))
    w, bias = torch.randn(C, 1, K, generator=gen(14)).to(tdt(kb)), torch.randn(C, generator=gen(15)).to(tdt(kb))
    st, ref_state = kb._zeros((B, C, K - 1), kb.dtype), None
    outs = []
    for t in range(6):
        out = poison(kb, (B, C))
        with kb.stream:
            kb._run(kb._k("conv1d_step"), cb.launch_flat(B * C, 256, "s"), up(kb, xs[t]), C, up(kb, w), up(kb, bias),
                    st, None, out, B, C, K)
        outs.append(down(kb, out))
    y, ref_state = oracle.causal_conv1d(xs.transpose(0, 1).double(), w.double(), bias.double(), None)
    assert rel_max_abs(torch.stack(outs, 1), y) < lim(kb)
    assert torch.equal(down(kb, st), ref_state)


def _ssd_inputs(B, T, H, P, G, N, seed):
    g = gen(seed)
    C = H * P + 2 * G * N
    xbc = torch.randn(B, T, C, generator=g) * 0.5
    dt = torch.randn(B, T, H, generator=g)
    A_log = torch.log(torch.empty(H).uniform_(1, 16, generator=g))
    D = torch.empty(H).uniform_(0.5, 1.5, generator=g)
    dt_bias = torch.log(torch.expm1(torch.empty(H).uniform_(1e-3, 5e-2, generator=g)))
    s0 = torch.randn(B, H, P, N, generator=g)
    return xbc, dt, A_log, D, dt_bias, s0


def _oracle_ssd(xbc, dt, A_log, D, dt_bias, s0, H, P, G, N, dt_min=0.0):
    B, T, _ = xbc.shape
    x, Bm, Cm = torch.split(xbc.double(), [H * P, G * N, G * N], dim=-1)
    return oracle.ssd_recurrent(x.reshape(B, T, H, P), dt.double(), A_log.double(), Bm.reshape(B, T, G, N),
                                Cm.reshape(B, T, G, N), D.double(), dt_bias.double(), s0.double(), dt_min=dt_min)


@pytest.mark.parametrize("T,chunk", [(1, 128), (37, 32), (128, 128), (300, 128), (300, 64)])
def test_ssd_chunked_scan_vs_recurrence(kb, T, chunk):
    B, H, P, G, N = 2, 8, 24, 2, 16
    xbc, dt, A_log, D, dt_bias, s0 = _ssd_inputs(B, T, H, P, G, N, 20 + T)
    xbc, dt, D, dt_bias = (t.to(tdt(kb)) for t in (xbc, dt, D, dt_bias))
    cp = kb._cp
    nc = math.ceil(T / chunk)
    L = cb.ssd_launches(B, T, H, P, N, chunk)
    dtd, cum = kb._empty((B, H, T), "float32"), kb._empty((B, H, T), "float64")
    states, y = kb._empty((B, nc, H, P, N), "float32"), poison(kb, (B * T, H * P), "float32")
    ssm = cp.asarray(s0.numpy())
    A = cp.asarray((-torch.exp(A_log)).numpy())
    xd, dtd_raw = up(kb, xbc), up(kb, dt)
    with kb.stream:
        kb._run(kb._k("ssd_dt_cumsum"), L["ssd_dt_cumsum"], dtd_raw, H, up(kb, dt_bias), A, dtd, cum, B, T, H, chunk,
                1e-3, float("inf"))
        kb._run(kb._k("ssd_chunk_state"), L["ssd_chunk_state"], xd, dtd, cum, states, T, H, P, G, N, chunk)
        kb._run(kb.kernels["ssd_state_passing"], L["ssd_state_passing"], states, ssm, cum, B, T, H, P * N, chunk)
        kb._run(kb._k("ssd_chunk_scan"), L["ssd_chunk_scan"], xd, dtd, cum, states, up(kb, D), y, T, H, P, G, N,
                chunk)
    y_ref, s_ref = _oracle_ssd(xbc, dt, A_log, D, dt_bias, s0, H, P, G, N, dt_min=1e-3)
    # inputs are exact in both paths (the oracle reads the same dtype-rounded values): fp32 arithmetic only
    assert rel_max_abs(down(kb, y, "float32").view(B, T, H, P), y_ref) < 1e-5
    assert rel_max_abs(down(kb, ssm, "float32"), s_ref) < 1e-5


def test_ssd_step_vs_recurrence(kb):
    B, H, P, G, N = 3, 8, 24, 4, 16
    xbc, dt, A_log, D, dt_bias, s0 = _ssd_inputs(B, 1, H, P, G, N, 40)
    xbc, dt, D, dt_bias = (t.to(tdt(kb)) for t in (xbc, dt, D, dt_bias))
    cp = kb._cp
    ssm, y = cp.asarray(s0.numpy()), poison(kb, (B, H * P), "float32")
    with kb.stream:
        kb._run(kb._k("ssd_step"), cb._l((H, B), (128,), "s"), up(kb, xbc[:, 0]), H * P + 2 * G * N, up(kb, dt[:, 0]),
                H, up(kb, dt_bias), cp.asarray((-torch.exp(A_log)).numpy()), up(kb, D), ssm, y, H, P, G, N, 0.0,
                float("inf"))
    y_ref, s_ref = _oracle_ssd(xbc, dt, A_log, D, dt_bias, s0, H, P, G, N)
    assert rel_max_abs(down(kb, y, "float32").view(B, 1, H, P), y_ref) < 1e-5
    assert rel_max_abs(down(kb, ssm, "float32"), s_ref) < 1e-5


def _kv_state(kb, B, S, Smax, KV, Dh, seed):
    g = gen(seed)
    k = torch.randn(B, S, KV, Dh, generator=g).to(tdt(kb))
    v = torch.randn(B, S, KV, Dh, generator=g).to(tdt(kb))
    kc, vc = kb._zeros((B, Smax, KV, Dh), kb.dtype), kb._zeros((B, Smax, KV, Dh), kb.dtype)
    kc[:, :S], vc[:, :S] = up(kb, k), up(kb, v)
    km = torch.ones(B, S, dtype=torch.int32)
    km[1, :5] = 0  # row 1 was left padded
    kmask = kb._zeros((B, Smax), "int32")
    kmask[:, :S] = kb._cp.asarray(km.numpy())
    return k, v, km, kc, vc, kmask


@pytest.mark.parametrize("S,T", [(0, 21), (13, 7)])
def test_attention_prefill(kb, S, T):
    B, Q, KV, Dh, Smax = 2, 4, 2, 24, 64
    k, v, km, kc, vc, kmask = _kv_state(kb, B, S, Smax, KV, Dh, 50)
    g = gen(51)
    q, kn, vn = (torch.randn(B, T, n, Dh, generator=g).to(tdt(kb)) for n in (Q, KV, KV))
    m = torch.ones(B, T, dtype=torch.int32)
    if S == 0:
        m[1, :5] = 0
        km = torch.zeros(B, 0, dtype=torch.int32)
    ctrl = kb._cp.asarray(np.array([S], np.int32))
    out = poison(kb, (B * T, Q * Dh))
    with kb.stream:
        kb._run(kb._k("kv_append"), cb._l((B * T,), (128,), "a"), up(kb, kn), up(kb, vn), KV * Dh, kc, vc, kmask,
                kb._cp.asarray(m.numpy()), ctrl, T, Smax, KV * Dh)
        kb._run(kb._k("attn_prefill"), cb.launch_attn_prefill(B, T, Q), up(kb, q), Q * Dh, kc, vc, kmask, ctrl, out,
                T, Q, KV, Dh, Smax, Dh ** -0.5)
    kall, vall = torch.cat([k, kn], 1).double(), torch.cat([v, vn], 1).double()
    ref = oracle.attention(q.double(), kall, vall, torch.cat([km, m], 1))
    assert rel_max_abs(down(kb, out).view(B, T, Q, Dh), ref) < lim(kb)


@pytest.mark.parametrize("S,splits", [(0, 1), (40, 1), (40, 3), (300, 8)])
def test_attention_decode(kb, S, splits):
    B, Q, KV, Dh, Smax = 2, 8, 2, 40, 512
    k, v, km, kc, vc, kmask = _kv_state(kb, B, S, Smax, KV, Dh, 60)
    g = gen(61)
    q, kn, vn = (torch.randn(B, 1, n, Dh, generator=g).to(tdt(kb)) for n in (Q, KV, KV))
    ctrl = kb._cp.asarray(np.array([S], np.int32))
    part, out = kb._empty((B, Q, splits, Dh + 2), "float32"), poison(kb, (B, Q * Dh))
    with kb.stream:
        kb._run(kb._k("kv_append"), cb._l((B,), (128,), "a"), up(kb, kn), up(kb, vn), KV * Dh, kc, vc, kmask, None,
                ctrl, 1, Smax, KV * Dh)
        kb._run(kb._k("attn_decode_split"), cb._l((splits, KV, B), (128,), "d"), up(kb, q), kc, vc, kmask, ctrl, part,
                Q, KV, Dh, Smax, splits, Dh ** -0.5)
        kb._run(kb._k("attn_decode_combine"), cb._l((Q, B), (64,), "c"), part, out, Q, Dh, splits)
    ref = oracle.attention(q.double(), torch.cat([k, kn], 1).double(), torch.cat([v, vn], 1).double(),
                           torch.cat([km if S else torch.zeros(B, 0, dtype=torch.int32),
                                      torch.ones(B, 1, dtype=torch.int32)], 1))
    assert rel_max_abs(down(kb, out).view(B, 1, Q, Dh), ref) < lim(kb)


@pytest.mark.parametrize("n_group,topk_group,k", [(1, 1, 2), (4, 2, 4)])
def test_moe_router_and_experts(kb, n_group, topk_group, k):
    M, D, E, I = 7, 48, 16, 40
    g = gen(70)
    h = torch.randn(M, D, generator=g).to(tdt(kb))
    Wg = (torch.randn(E, D, generator=g) * 0.2).to(tdt(kb))
    bias = 4.0 + 5e-3 * torch.randn(E, generator=g)  # fp32, large mean, tiny spread
    upw = (torch.randn(E, I, D, generator=g) * 0.2).to(tdt(kb))
    dnw = (torch.randn(E, D, I, generator=g) * 0.2).to(tdt(kb))
    cp = kb._cp
    w_d, idx_d = kb._empty((M, k), "float32"), kb._empty((M, k), "int32")
    eup, edn, out = kb._empty((M * k, I), kb.dtype), kb._empty((M * k, D), kb.dtype), poison(kb, (M, D))
    hd = up(kb, h)
    with kb.stream:
        kb._run(kb._k("moe_router"), cb._l((M,), (256,), "r"), hd, up(kb, Wg), cp.asarray(bias.numpy()), w_d, idx_d,
                D, E, k, n_group, topk_group, 1, 2.5)
        kb._run(kb._k("moe_gemv"), cb.launch_gemv(I, M * k), up(kb, upw), idx_d, hd, D, k, eup, I, D, 1, 0)
        kb._run(kb._k("moe_gemv"), cb.launch_gemv(D, M * k), up(kb, dnw), idx_d, eup, I, 1, edn, D, I, 0, 0)
        kb._run(kb._k("moe_combine"), cb._l((M,), (256,), "c"), w_d, edn, None, out, D, k)
    w_ref, idx_ref = oracle.moe_router(h.double(), Wg.double(), bias.double(), top_k=k, n_group=n_group,
                                       topk_group=topk_group, norm_topk_prob=True, routed_scaling_factor=2.5)
    idx = torch.from_numpy(idx_d.get()).long()
    assert torch.equal(idx, idx_ref)  # same experts, same (descending choice) order
    assert rel_max_abs(torch.from_numpy(w_d.get()).double(), w_ref) < 1e-5
    ref = oracle.moe_experts(h.double(), w_ref, idx_ref, upw.double(), dnw.double())
    assert rel_max_abs(down(kb, out), ref) < lim(kb) * 2


@pytest.mark.parametrize("M", [1, 3, 8, 11])
def test_gemv_and_cublas_linear(kb, M):
    R, Cc = 200, 96
    g = gen(80)
    W, x = torch.randn(R, Cc, generator=g).to(tdt(kb)), torch.randn(M, Cc, generator=g).to(tdt(kb))
    kb.p = {"t.weight": up(kb, W)}
    y = poison(kb, (M, R))
    with kb.stream:
        kb._linear("t", kb._ptr(up(kb, x)), Cc, kb._ptr(y), R, M, act=True)  # M <= 8: GEMV; 11: cuBLAS + relu2
    ref = torch.relu(x.double() @ W.double().T).square()
    assert rel_max_abs(down(kb, y), ref) < lim(kb) * 2


# ----------------------------------------------------------------------------------------------
# The whole backend vs the torch executor, and the equivalences
# ----------------------------------------------------------------------------------------------

def _models(name: str, dtype: str, **kw):
    from nemoh.runtime import open_model

    return open_model(name, cb.CupyBackend(**kw), dtype), open_model(name, "torch", dtype, device="cpu")


def _prompt(model, B=2, T=150, seed=0):
    return torch.randint(4, model.config.vocab_size, (B, T), generator=gen(seed))


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_backend_matches_torch(name, dtype):
    cu, th = _models(name, dtype)
    ids = _prompt(cu)
    a, b = cu.session(2).prefill(ids), th.session(2).prefill(ids)
    if dtype == "float32":
        assert rel_max_abs(a, b) < tol("logits_rel_max_abs", "float32")
    else:
        assert top1_agreement(a, b) >= tol("logits_top1", "bfloat16")
    # and against the fp64 oracle, the precise reference
    from nemoh.ir import build_graph

    g64 = build_graph(cu.config, "float64")
    ref = oracle.run(g64, cu.checkpoint.load(g64), ids)
    if dtype == "float32":
        assert rel_max_abs(a, ref) < tol("logits_rel_max_abs", "float32")
    else:
        assert top1_agreement(a, ref) >= tol("logits_top1", "bfloat16")


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("graphs", [True, False])
def test_prefill_chunks_and_decode_agree(name, graphs):
    cu, _ = _models(name, "float32", cuda_graphs=graphs)
    ids = _prompt(cu, T=90, seed=1)
    one = cu.session(2)
    full = one.prefill(ids)
    chunked = cu.session(2)
    parts = chunked.prefill(ids, chunks=[1, 31, 33, 25])
    dec = cu.session(2)
    steps = torch.cat([dec.forward(ids[:, t:t + 1]) for t in range(ids.shape[1])], 1)
    eq = tol("equiv_rel_max_abs", "float32")
    assert rel_max_abs(parts, full) < eq and rel_max_abs(steps, full) < eq
    s_full, s_dec = cu.backend.export_state(one.state), cu.backend.export_state(dec.state)
    assert set(s_full) == set(s_dec)
    for key in s_full:
        assert s_full[key].shape == s_dec[key].shape, key
        assert rel_max_abs(s_dec[key], s_full[key]) < eq, key
    if graphs:
        assert dec.state.graph.captures == 1 and dec.state.graph.replays == ids.shape[1] - 1  # 1 warm-up step


def test_graph_replay_is_bit_identical_to_eager():
    eager, _ = _models("tiny-moe", "bfloat16", cuda_graphs=False)
    graph, _ = _models("tiny-moe", "bfloat16", cuda_graphs=True)
    ids = _prompt(eager, T=40, seed=2)
    outs = []
    for m in (eager, graph, graph):  # graph twice: repeated runs are bit-identical too
        s = m.session(2)
        s.prefill(ids[:, :30])
        outs.append(torch.cat([s.forward(ids[:, t:t + 1]) for t in range(30, 40)], 1))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])


def test_state_layout_matches_torch_and_round_trips():
    cu, th = _models("tiny-dense", "float32")
    ids = _prompt(cu, T=20, seed=3)
    a, b = cu.session(2), th.session(2)
    a.prefill(ids)
    b.prefill(ids)
    sa, sb = cu.backend.export_state(a.state), th.backend.export_state(b.state)
    assert set(sa) == set(sb)
    for key in sa:
        assert sa[key].shape == sb[key].shape and sa[key].dtype == sb[key].dtype, key
    st = cu.backend.import_state(sa)
    again = cu.backend.export_state(st)
    assert all(torch.equal(again[k], sa[k]) for k in sa)
    # an imported torch state continues exactly like the cupy one
    nxt = ids[:, -1:]
    x = cu.backend.forward(cu.backend.import_state(sb), nxt)
    y = cu.backend.forward(cu.backend.copy_state(a.state), nxt)
    assert rel_max_abs(x, y) < tol("equiv_rel_max_abs", "float32")


def test_copy_state_is_independent_and_cache_grows():
    cu, _ = _models("tiny-list", "float32", max_len=32)  # forces KV-cache growth and graph recapture
    ids = _prompt(cu, B=1, T=70, seed=4)
    s = cu.session(1)
    s.prefill(ids[:, :20])
    snap = s.snapshot()
    tail = torch.cat([s.forward(ids[:, t:t + 1]) for t in range(20, 70)], 1)
    assert s.state.max_len >= 70 and s.state.graph.captures >= 2
    s.restore(snap)
    again = torch.cat([s.forward(ids[:, t:t + 1]) for t in range(20, 70)], 1)
    assert torch.equal(tail, again)
    ref = cu.session(1).prefill(ids)[:, 20:]
    assert rel_max_abs(tail, ref) < tol("equiv_rel_max_abs", "float32")


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-latent-moe"])
def test_left_padded_batch_equals_alone(name):
    cu, _ = _models(name, "float32")
    ids = _prompt(cu, B=2, T=40, seed=5)
    mask = torch.ones(2, 40, dtype=torch.int64)
    mask[1, :15] = 0
    both = cu.session(2).prefill(ids, mask)
    alone = cu.session(1).prefill(ids[1:, 15:])
    assert rel_max_abs(both[1, 15:], alone[0]) < tol("equiv_rel_max_abs", "float32")


def test_trace_and_params():
    cu, th = _models("tiny-moe", "float32")
    ids = _prompt(cu, T=12, seed=6)
    tr_c, tr_t = {}, {}
    cu.backend.forward(cu.backend.new_state(2), ids, trace=tr_c)
    th.backend.forward(th.backend.new_state(2), ids, trace=tr_t)
    for key in ("embeddings", "layers.0.mixer.ssd", "layers.1.mixer.router", "layers.3.mixer.attention", "layers.6",
                "lm_head"):
        assert rel_max_abs(tr_c[key].reshape(tr_t[key].shape), tr_t[key]) < 1e-4, key
    loaded = {t.name: cu.backend.read_param(t.name) for t in cu.graph.params}
    assert cu.checkpoint.mismatches(loaded) == []
    d = cu.backend.describe()
    assert d["device"].startswith("cuda") and d["compiler"] and d["cuda_graphs"] is True

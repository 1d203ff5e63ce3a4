"""The oracle's ops, pinned to their definitions (the whole model is pinned in test_models.py)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nemoh import oracle

f64 = torch.float64


def ssd_inputs(seed, b, T, H, G, P, N, with_state):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=f64)  # noqa: E731
    return dict(x=r(b, T, H, P), dt=r(b, T, H) - 2.0, A_log=torch.log(torch.rand(H, generator=g, dtype=f64) * 15 + 1),
                B=r(b, T, G, N), C=r(b, T, G, N), D=r(H), dt_bias=r(H) * 0.5,
                state=r(b, H, P, N) if with_state else None)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), b=st.integers(1, 2), T=st.integers(1, 40), G=st.sampled_from([1, 2, 3]),
       heads_per_group=st.integers(1, 3), P=st.integers(1, 5), N=st.integers(1, 6),
       chunk=st.integers(1, 17), with_state=st.booleans())
def test_chunked_ssd_equals_recurrence(seed, b, T, G, heads_per_group, P, N, chunk, with_state):
    kw = ssd_inputs(seed, b, T, G * heads_per_group, G, P, N, with_state)
    y_r, s_r = oracle.ssd_recurrent(**kw)
    y_c, s_c = oracle.ssd_chunked(**kw, chunk_size=chunk)
    assert torch.allclose(y_c, y_r, rtol=1e-10, atol=1e-10)
    assert torch.allclose(s_c, s_r, rtol=1e-10, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), T=st.integers(2, 40), cut=st.floats(0.01, 0.99), chunk=st.integers(1, 16))
def test_ssd_state_handoff(seed, T, cut, chunk):
    """Scanning [0, t) then [t, T) from the carried state equals scanning [0, T)."""
    kw = ssd_inputs(seed, 1, T, 4, 2, 3, 4, False)
    t = max(1, min(T - 1, int(cut * T)))
    y, s = oracle.ssd_chunked(**kw, chunk_size=chunk)
    first = {k: (v[:, :t] if k in ("x", "dt", "B", "C") else v) for k, v in kw.items()}
    y1, s1 = oracle.ssd_chunked(**first, chunk_size=chunk)
    second = {k: (v[:, t:] if k in ("x", "dt", "B", "C") else v) for k, v in kw.items()} | {"state": s1}
    y2, s2 = oracle.ssd_chunked(**second, chunk_size=chunk)
    assert torch.allclose(torch.cat([y1, y2], 1), y, rtol=1e-10, atol=1e-10)
    assert torch.allclose(s2, s, rtol=1e-10, atol=1e-10)


def test_group_mapping_is_contiguous_not_tiled():
    B = torch.arange(2 * 3, dtype=f64).view(1, 1, 2, 3)  # G=2 groups
    e = oracle.expand_groups(B, 4)  # H=4: heads 0,1 -> group 0; heads 2,3 -> group 1
    assert torch.equal(e[0, 0, :, 0], torch.tensor([0, 0, 3, 3], dtype=f64))
    # and it matters: a tiled mapping gives a different scan
    kw = ssd_inputs(1, 1, 9, 4, 2, 2, 3, False)
    y, _ = oracle.ssd_recurrent(**kw)
    tiled = {**kw, "B": kw["B"][:, :, [0, 1, 0, 1]], "C": kw["C"][:, :, [0, 1, 0, 1]]}
    y_tiled, _ = oracle.ssd_recurrent(**tiled)  # G'=H: head h reads group h % 2
    assert not torch.allclose(y, y_tiled)


def test_dt_clamp_and_limit():
    dt = torch.tensor([[[-20.0, 0.0, 20.0]]], dtype=f64)
    d = oracle.discretize_dt(dt, torch.zeros(3, dtype=f64), 0.0, None)
    assert torch.allclose(d, torch.nn.functional.softplus(dt))  # default limit (0, inf): a no-op
    d = oracle.discretize_dt(dt, torch.zeros(3, dtype=f64), 1e-3, 5.0)
    assert d[0, 0, 0] == 1e-3 and d[0, 0, 2] == 5.0


def test_conv_state_is_the_last_inputs_before_the_conv():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 7, 5, generator=g, dtype=f64)
    w, bias = torch.randn(5, 1, 4, generator=g, dtype=f64), torch.randn(5, generator=g, dtype=f64)
    y, s = oracle.causal_conv1d(x, w, bias, None)
    assert torch.equal(s, x[:, -3:].transpose(1, 2))  # pre-conv inputs
    # a 2-token prompt (< K-1) keeps one zero of the initial padding inside the state
    _, s2 = oracle.causal_conv1d(x[:, :2], w, bias, None)
    assert torch.equal(s2[:, :, 0], torch.zeros(1, 5, dtype=f64)) and torch.equal(s2[:, :, 1:], x[:, :2].mT)
    # continuing from the state equals the one-shot conv, token by token
    st_, ys = None, []
    for t in range(7):
        yt, st_ = oracle.causal_conv1d(x[:, t:t + 1], w, bias, st_)
        ys.append(yt)
    assert torch.allclose(torch.cat(ys, 1), y, rtol=0, atol=1e-12)
    # against torch's own conv1d
    ref = torch.nn.functional.conv1d(x.mT, w, bias, padding=3, groups=5)[..., :7]
    assert torch.allclose(y, torch.nn.functional.silu(ref).mT, atol=1e-12)


def test_gated_norm_is_per_group():
    g = torch.Generator().manual_seed(0)
    y, z = torch.randn(2, 3, 8, generator=g, dtype=f64), torch.randn(2, 3, 8, generator=g, dtype=f64)
    y[..., 4:] *= 10  # groups with different scales
    w = torch.ones(8, dtype=f64)
    out = oracle.gated_rmsnorm(y, z, w, group_size=4, eps=1e-6)
    v = y * torch.nn.functional.silu(z)
    for sl in (slice(0, 4), slice(4, 8)):
        part = v[..., sl]
        assert torch.allclose(out[..., sl], part / part.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt())
    assert not torch.allclose(out, oracle.gated_rmsnorm(y, z, w, group_size=8, eps=1e-6))


def test_attention_gqa_mapping_causality_and_no_positions():
    g = torch.Generator().manual_seed(0)
    Bn, T, Q, KV, Dh = 1, 5, 4, 2, 3
    q, k, v = (torch.randn(Bn, T, h, Dh, generator=g, dtype=f64) for h in (Q, KV, KV))
    out = oracle.attention(q, k, v, torch.ones(Bn, T))
    for h in range(Q):
        kv = h // (Q // KV)  # consecutive query heads share a KV head
        for t in range(T):
            p = torch.softmax(q[0, t, h] @ k[0, :t + 1, kv].T * Dh ** -0.5, -1)
            assert torch.allclose(out[0, t, h], p @ v[0, :t + 1, kv])
    # no positional encoding: the last token's output ignores the order of earlier keys
    perm = torch.tensor([2, 0, 3, 1, 4])
    last = oracle.attention(q[:, -1:], k[:, perm], v[:, perm], torch.ones(Bn, T))
    assert torch.allclose(last, out[:, -1:])
    # a padded key is invisible
    m = torch.ones(Bn, T)
    m[0, 0] = 0
    masked = oracle.attention(q, k, v, m)
    assert torch.allclose(masked[:, 1:], oracle.attention(q[:, 1:], k[:, 1:], v[:, 1:], torch.ones(Bn, T - 1)))
    assert torch.equal(masked[:, 0], torch.zeros_like(masked[:, 0]))  # nothing visible -> zeros


def test_router_bias_chooses_but_does_not_weigh():
    h = torch.tensor([[1.0, 0.0]], dtype=f64)
    W = torch.tensor([[2.0, 0], [1.0, 0], [0.5, 0], [0.0, 0]], dtype=f64)  # scores descending
    bias = torch.tensor([0.0, 0.0, 0.0, 1.0])
    w, idx = oracle.moe_router(h, W, bias, top_k=2, n_group=1, topk_group=1, norm_topk_prob=False,
                               routed_scaling_factor=2.0)
    assert set(idx[0].tolist()) == {3, 0}  # the bias promotes expert 3
    s = torch.sigmoid(h @ W.T)[0]
    weights = dict(zip(idx[0].tolist(), w[0].tolist()))
    assert abs(weights[3] - 2 * s[3].item()) < 1e-12 and abs(weights[0] - 2 * s[0].item()) < 1e-12  # raw scores
    wn, _ = oracle.moe_router(h, W, bias, top_k=2, n_group=1, topk_group=1, norm_topk_prob=True,
                              routed_scaling_factor=2.5)
    assert abs(wn.sum().item() - 2.5) < 1e-12


def test_router_group_limit_and_bf16_bias():
    h = torch.eye(8, dtype=f64)[:1]
    W = torch.zeros(8, 8, dtype=f64)
    W[:, 0] = torch.tensor([3.0, 0, 0, 0, 2.0, 1.9, 0, 0])  # group 1 (experts 4..7) has the better top-2 sum
    _, idx = oracle.moe_router(h, W, torch.zeros(8), top_k=2, n_group=2, topk_group=1, norm_topk_prob=True,
                               routed_scaling_factor=1.0)
    assert set(idx[0].tolist()) == {4, 5}  # expert 0 has the best score but its group loses
    # a large bias with a tiny spread: bf16 rounding erases the spread and flips the choice
    W = torch.zeros(4, 1, dtype=f64)
    bias = torch.tensor([4.0, 4.001, 4.002, 4.003])
    _, i32 = oracle.moe_router(torch.ones(1, 1, dtype=f64), W, bias, top_k=1, n_group=1, topk_group=1,
                               norm_topk_prob=True, routed_scaling_factor=1.0)
    _, i16 = oracle.moe_router(torch.ones(1, 1, dtype=f64), W, bias.bfloat16().float(), top_k=1, n_group=1,
                               topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0)
    assert i32.item() == 3 and i16.item() != 3


def test_moe_experts_dense_equivalent():
    g = torch.Generator().manual_seed(0)
    M, L, I, E, k = 5, 4, 6, 3, 2
    x = torch.randn(M, L, generator=g, dtype=f64)
    up, down = torch.randn(E, I, L, generator=g, dtype=f64), torch.randn(E, L, I, generator=g, dtype=f64)
    idx = torch.tensor([[0, 1], [2, 0], [1, 2], [0, 2], [1, 0]])
    w = torch.rand(M, k, generator=g, dtype=f64)
    dense = torch.stack([torch.relu(x @ up[e].T).square() @ down[e].T for e in range(E)], 1)  # [M, E, L]
    gate = torch.zeros(M, E, dtype=f64).scatter(1, idx, w)
    assert torch.allclose(oracle.moe_experts(x, w, idx, up, down), (gate[..., None] * dense).sum(1))


def test_rmsnorm_upcasts_and_casts_back():
    x = torch.randn(3, 8).bfloat16()
    w = torch.rand(8).bfloat16()
    out = oracle.rmsnorm(x, w, 1e-5)
    assert out.dtype == torch.bfloat16
    ref = (w.float() * (x.float() / x.float().pow(2).mean(-1, keepdim=True).add(1e-5).sqrt())).bfloat16()
    assert torch.equal(out, ref)

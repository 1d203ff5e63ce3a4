"""The CuPy backend on a GPU: each kernel against nemoh.oracle, the whole backend against the torch
executor on the tiny presets, and the equivalences every backend must hold.

Every test here skips, with the reason, where the backend is not available (no cupy, no driver,
no GPU). On a GPU machine: `pip install -e '.[test,gpu]'` (or an image with cupy) and
`python -m pytest -q tests/backends/test_cupy_gpu.py`.

The per-kernel checks (`check_*`, listed in KERNEL_CASES) take a *device*: `CupyDev` here (the real
GPU), `EmuDev` in tests/backends/test_cupy_emulated.py (the same .cu sources run by the CPU emulator,
backends/cuda_emu.py), so every kernel check also runs on machines without a GPU.

Why one file: the kernel and backend checks are shared by two devices (this file's CupyDev and
test_cupy_emulated.py's EmuDev) and must stay one list, so that both run exactly the same checks.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from quant_kernel_checks import QUANT_KERNEL_CASES

from nemoh import oracle
from nemoh.backends import cupy_backend as cb
from nemoh.backends import cupy_compile as cc
from nemoh.conformance.tolerances import rel_max_abs, tol, top1_agreement

_AVAIL = cb.CupyBackend().available()
pytestmark = pytest.mark.skipif(not _AVAIL.ok, reason=f"cupy backend not available: {_AVAIL.reason}")

PRESETS = ("tiny-dense", "tiny-moe", "tiny-latent-moe", "tiny-list")
FP32 = 1e-5  # one fp32 kernel vs the fp64 oracle op: rounding over reductions of <= a few hundred terms
BF16 = 2e-2  # bf16 inputs/outputs: a few bf16 ulps


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Devices the kernel checks run on
# ----------------------------------------------------------------------------------------------

class CupyDev:
    """The kernel-check device on a GPU: buffers are CuPy arrays (bf16 as uint16)."""

    def __init__(self, be: cb.CupyBackend):
        self.be, self.dtype = be, be.dtype

    def run(self, stem: str, launch: cb.Launch, *args) -> None:
        with self.be.dev.scope():
            self.be._run(self.be.kernels[kname(self, stem)], launch, *args)

    def up(self, t: torch.Tensor):
        return self.be._upload(t)

    def arr(self, a: np.ndarray):
        return self.be.dev.upload(a)

    def down(self, a, dtype: str | None = None) -> torch.Tensor:
        return self.be._download(a, dtype or self.dtype).double()

    def host(self, a) -> np.ndarray:
        return self.be.dev.download(a)

    def empty(self, shape, dtype: str):
        return self.be._empty(shape, dtype)

    def zeros(self, shape, dtype: str):
        return self.be._zeros(shape, dtype)

    def at(self, a, elem_offset: int):
        return self.be._ptr(a, elem_offset)

    def addr(self, a) -> int:
        return self.be.dev.addr(a)

    def scope(self):
        return self.be.dev.scope()


def kname(dev, stem: str) -> str:
    """The entry point of kernel `stem` for the device's dtype (dtype-free kernels keep their name)."""
    plain = {k for _, ks in cc.KERNELS.values() for k in ks}
    return stem if stem in plain else cc.kernel_name(stem, dev.dtype)


def tdt(dev) -> torch.dtype:
    return torch.bfloat16 if dev.dtype == "bfloat16" else torch.float32


def up(dev, t: torch.Tensor):
    """Upload `t` rounded to the compute dtype."""
    return dev.up(t.to(tdt(dev)))


def lim(dev) -> float:
    return BF16 if dev.dtype == "bfloat16" else FP32


def poison(dev, shape, dtype=None):
    """An output buffer full of NaN, so an element the kernel never writes fails the comparison."""
    a = dev.empty(shape, dtype or dev.dtype)
    with dev.scope():  # on the stream the kernel will run on: the legacy stream would race with it
        a.fill(0x7FC0 if (dtype or dev.dtype) == "bfloat16" else np.nan)
    return a


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def kb(request):
    """A backend with its kernels loaded and no model: drives single kernels."""
    be = cb.CupyBackend()
    be.init_device(request.param)
    return be


@pytest.fixture(scope="module")
def dev(kb):
    return CupyDev(kb)


# ----------------------------------------------------------------------------------------------
# Kernels vs the oracle (device-independent checks)
# ----------------------------------------------------------------------------------------------

def check_embedding(dev, D):
    W = torch.randn(300, D, generator=gen(1)).to(tdt(dev))
    ids = torch.randint(0, 300, (2, 9), generator=gen(2))
    ids[1, 4] = 300  # out of range (validated upstream): the kernel writes a zero row, never reads out of bounds
    out = poison(dev, (18, D))
    dev.run("embedding", cb._l((18,), (256,), "e"), dev.arr(ids.int().numpy()), dev.up(W), out, D, 300)
    ref = oracle.embedding(ids.clamp(max=299), W).double()
    ref[1, 4] = 0
    assert torch.equal(dev.down(out).view(2, 9, D), ref)


def check_add_rmsnorm(dev, D, masked=False):
    x = torch.randn(5, D, generator=gen(3)).to(tdt(dev))
    dl = torch.randn(5, D, generator=gen(4)).to(tdt(dev))
    w = (1 + 0.1 * torch.randn(D, generator=gen(5))).to(tdt(dev))
    xd, h = dev.up(x), poison(dev, (5, D))
    rowmask = np.array([1, 1, 0, 1, 1], np.int32)
    dev.run("add_rmsnorm", cb.launch_rows(5, D), xd, dev.up(dl), dev.up(w), h, dev.arr(rowmask) if masked else None,
            D, 1e-5)
    xs = (x + dl)
    assert torch.equal(dev.down(xd), xs.double())  # residual rounded once to the dtype, as torch
    ref = oracle.rmsnorm(xs.double(), w.double(), 1e-5)
    if masked:
        ref[2] = 0  # a padding row entering a Mamba mixer is zeroed
    assert rel_max_abs(dev.down(h), ref) < lim(dev)


def check_gated_rmsnorm(dev, M=4, G=4, gs=40):
    y = torch.randn(M, G * gs, generator=gen(6))
    z = torch.randn(M, 3 * G * gs, generator=gen(7)).to(tdt(dev))  # z = first G*gs columns of a wider row
    w = torch.randn(G * gs, generator=gen(8)).to(tdt(dev))
    out = poison(dev, (M, G * gs))
    dev.run("gated_rmsnorm", cb.launch_gated_norm(M, G), dev.arr(y.numpy()), dev.up(z), 3 * G * gs, dev.up(w), out,
            G * gs, gs, 1e-5)
    ref = oracle.gated_rmsnorm(y.double(), z[:, :G * gs].double(), w.double(), gs, 1e-5)
    assert rel_max_abs(dev.down(out), ref) < lim(dev)


def check_conv1d_prefill_and_state(dev, T, K=4):
    B, C, ld, off = 2, 50, 130, 17
    xbc = torch.randn(B, T, ld, generator=gen(9)).to(tdt(dev))
    w = torch.randn(C, 1, K, generator=gen(10)).to(tdt(dev))
    bias = torch.randn(C, generator=gen(11)).to(tdt(dev))
    s0 = torch.randn(B, C, K - 1, generator=gen(12)).to(tdt(dev))
    mask = torch.ones(B, T, dtype=torch.int32)
    mask[1, : T // 2] = 0
    st, out = dev.up(s0), poison(dev, (B * T, C))
    xd, md = dev.up(xbc), dev.arr(mask.numpy())
    dev.run("conv1d_prefill", cb.launch_conv_prefill(B, T, C), dev.at(xd, off), ld, dev.up(w), dev.up(bias), st, md,
            out, T, C, K, cb.CONV_TT)
    dev.run("conv1d_state_update", cb.launch_flat(B * C, 256, "u"), dev.at(xd, off), ld, st, md, B, T, C, K)
    x = xbc[:, :, off:off + C].double() * mask[..., None]
    y, s = oracle.causal_conv1d(x, w.double(), bias.double(), s0.double())
    y = y * mask[..., None]
    assert rel_max_abs(dev.down(out).view(B, T, C), y) < lim(dev)
    assert torch.equal(dev.down(st), s)  # the state is the last K-1 raw (masked) inputs, exactly


def check_conv1d_step_equals_prefill(dev, K=4):
    B, C = 3, 40
    xs = torch.randn(6, B, C, generator=gen(13)).to(tdt(dev))
    w, bias = torch.randn(C, 1, K, generator=gen(14)).to(tdt(dev)), torch.randn(C, generator=gen(15)).to(tdt(dev))
    st = dev.zeros((B, C, K - 1), dev.dtype)
    outs = []
    for t in range(6):
        out = poison(dev, (B, C))
        dev.run("conv1d_step", cb.launch_flat(B * C, 256, "s"), dev.up(xs[t]), C, dev.up(w), dev.up(bias), st, None,
                out, B, C, K)
        outs.append(dev.down(out))
    y, ref_state = oracle.causal_conv1d(xs.transpose(0, 1).double(), w.double(), bias.double(), None)
    assert rel_max_abs(torch.stack(outs, 1), y) < lim(dev)
    assert torch.equal(dev.down(st), ref_state)


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


def check_ssd_chunked_scan_vs_recurrence(dev, T, chunk, B=2, H=8, P=24, G=2, N=16):
    xbc, dt, A_log, D, dt_bias, s0 = _ssd_inputs(B, T, H, P, G, N, 20 + T)
    xbc, dt, D, dt_bias = (t.to(tdt(dev)) for t in (xbc, dt, D, dt_bias))
    nc = math.ceil(T / chunk)
    L = cb.ssd_launches(B, T, H, P, N, chunk)
    dtd, cum = dev.empty((B, H, T), "float32"), dev.empty((B, H, T), "float64")
    states, y = dev.empty((B, nc, H, P, N), "float32"), poison(dev, (B * T, H * P), "float32")
    ssm = dev.arr(s0.numpy())
    A = dev.arr((-torch.exp(A_log)).numpy())
    xd, dtd_raw = dev.up(xbc), dev.up(dt)
    dev.run("ssd_dt_cumsum", L["ssd_dt_cumsum"], dtd_raw, H, dev.up(dt_bias), A, dtd, cum, B, T, H, chunk, 1e-3,
            float("inf"))
    dev.run("ssd_chunk_state", L["ssd_chunk_state"], xd, dtd, cum, states, T, H, P, G, N, chunk)
    dev.run("ssd_state_passing", L["ssd_state_passing"], states, ssm, cum, B, T, H, P * N, chunk)
    dev.run("ssd_chunk_scan", L["ssd_chunk_scan"], xd, dtd, cum, states, dev.up(D), y, T, H, P, G, N, chunk)
    y_ref, s_ref = _oracle_ssd(xbc, dt, A_log, D, dt_bias, s0, H, P, G, N, dt_min=1e-3)
    # inputs are exact in both paths (the oracle reads the same dtype-rounded values): fp32 arithmetic only
    assert rel_max_abs(dev.down(y, "float32").view(B, T, H, P), y_ref) < 1e-5
    assert rel_max_abs(dev.down(ssm, "float32"), s_ref) < 1e-5


def check_ssd_step_vs_recurrence(dev, B=3, H=8, P=24, G=4, N=16):
    xbc, dt, A_log, D, dt_bias, s0 = _ssd_inputs(B, 1, H, P, G, N, 40)
    xbc, dt, D, dt_bias = (t.to(tdt(dev)) for t in (xbc, dt, D, dt_bias))
    ssm, y = dev.arr(s0.numpy()), poison(dev, (B, H * P), "float32")
    dev.run("ssd_step", cb._l((H, B), (128,), "s"), dev.up(xbc[:, 0].contiguous()), H * P + 2 * G * N,
            dev.up(dt[:, 0].contiguous()), H, dev.up(dt_bias), dev.arr((-torch.exp(A_log)).numpy()), dev.up(D), ssm, y,
            H, P, G, N, 0.0, float("inf"))
    y_ref, s_ref = _oracle_ssd(xbc, dt, A_log, D, dt_bias, s0, H, P, G, N)
    assert rel_max_abs(dev.down(y, "float32").view(B, 1, H, P), y_ref) < 1e-5
    assert rel_max_abs(dev.down(ssm, "float32"), s_ref) < 1e-5


def _kv_state(dev, B, S, Smax, KV, Dh, seed):
    g = gen(seed)
    k = torch.randn(B, S, KV, Dh, generator=g).to(tdt(dev))
    v = torch.randn(B, S, KV, Dh, generator=g).to(tdt(dev))
    kc, vc = dev.zeros((B, Smax, KV, Dh), dev.dtype), dev.zeros((B, Smax, KV, Dh), dev.dtype)
    km = torch.ones(B, S, dtype=torch.int32)
    km[1, :5] = 0  # row 1 was left padded
    kmask = dev.zeros((B, Smax), "int32")
    with dev.scope():  # the copies on the stream that zeroed the buffers (the legacy stream would race with it)
        kc[:, :S], vc[:, :S] = dev.up(k), dev.up(v)
        kmask[:, :S] = dev.arr(km.numpy())
    return k, v, km, kc, vc, kmask


def check_attention_prefill(dev, S, T, Q=4, KV=2, Dh=24):
    B, Smax = 2, 64
    k, v, km, kc, vc, kmask = _kv_state(dev, B, S, Smax, KV, Dh, 50)
    g = gen(51)
    q, kn, vn = (torch.randn(B, T, n, Dh, generator=g).to(tdt(dev)) for n in (Q, KV, KV))
    m = torch.ones(B, T, dtype=torch.int32)
    if S == 0:
        m[1, :5] = 0
        km = torch.zeros(B, 0, dtype=torch.int32)
    ctrl = dev.arr(np.array([S], np.int32))
    out = poison(dev, (B * T, Q * Dh))
    dev.run("kv_append", cb._l((B * T,), (128,), "a"), dev.up(kn), dev.up(vn), KV * Dh, kc, vc, kmask,
            dev.arr(m.numpy()), ctrl, T, Smax, KV * Dh)
    dev.run("attn_prefill", cb.launch_attn_prefill(B, T, Q), dev.up(q), Q * Dh, kc, vc, kmask, ctrl, out, T, Q, KV,
            Dh, Smax, Dh ** -0.5)
    kall, vall = torch.cat([k, kn], 1).double(), torch.cat([v, vn], 1).double()
    ref = oracle.attention(q.double(), kall, vall, torch.cat([km, m], 1))
    assert rel_max_abs(dev.down(out).view(B, T, Q, Dh), ref) < lim(dev)


def check_attention_decode(dev, S, splits, Smax=512, Q=8, KV=2, Dh=40):
    B = 2
    k, v, km, kc, vc, kmask = _kv_state(dev, B, S, Smax, KV, Dh, 60)
    g = gen(61)
    q, kn, vn = (torch.randn(B, 1, n, Dh, generator=g).to(tdt(dev)) for n in (Q, KV, KV))
    ctrl = dev.arr(np.array([S], np.int32))
    part, out = dev.empty((B, Q, splits, Dh + 2), "float32"), poison(dev, (B, Q * Dh))
    dev.run("kv_append", cb._l((B,), (128,), "a"), dev.up(kn), dev.up(vn), KV * Dh, kc, vc, kmask, None, ctrl, 1,
            Smax, KV * Dh)
    dev.run("attn_decode_split", cb._l((splits, KV, B), (128,), "d"), dev.up(q), kc, vc, kmask, ctrl, part, Q, KV,
            Dh, Smax, splits, Dh ** -0.5)
    # block >= Dh (thread d owns output dim d), as the backend launches it
    dev.run("attn_decode_combine", cb._l((Q, B), (cb.cdiv(Dh, 32) * 32,), "c"), part, out, Q, Dh, splits)
    ref = oracle.attention(q.double(), torch.cat([k, kn], 1).double(), torch.cat([v, vn], 1).double(),
                           torch.cat([km if S else torch.zeros(B, 0, dtype=torch.int32),
                                      torch.ones(B, 1, dtype=torch.int32)], 1))
    assert rel_max_abs(dev.down(out).view(B, 1, Q, Dh), ref) < lim(dev)


def check_moe_router_and_experts(dev, n_group, topk_group, k, E=16):
    M, D, I = 7, 48, 40
    g = gen(70)
    h = torch.randn(M, D, generator=g).to(tdt(dev))
    Wg = (torch.randn(E, D, generator=g) * 0.2).to(tdt(dev))
    bias = 4.0 + 5e-3 * torch.randn(E, generator=g)  # fp32, large mean, tiny spread
    upw = (torch.randn(E, I, D, generator=g) * 0.2).to(tdt(dev))
    dnw = (torch.randn(E, D, I, generator=g) * 0.2).to(tdt(dev))
    w_d, idx_d = dev.empty((M, k), "float32"), dev.empty((M, k), "int32")
    eup, edn, out = dev.empty((M * k, I), dev.dtype), dev.empty((M * k, D), dev.dtype), poison(dev, (M, D))
    hd = dev.up(h)
    dev.run("moe_router", cb._l((M,), (256,), "r"), hd, dev.up(Wg), dev.arr(bias.numpy()), w_d, idx_d, D, E, k,
            n_group, topk_group, 1, 2.5)
    dev.run("moe_gemv", cb.launch_gemv(I, M * k), dev.up(upw), idx_d, hd, D, k, eup, I, D, 1, 0)
    dev.run("moe_gemv", cb.launch_gemv(D, M * k), dev.up(dnw), idx_d, eup, I, 1, edn, D, I, 0, 0)
    dev.run("moe_combine", cb._l((M,), (256,), "c"), w_d, edn, None, out, D, k)
    w_ref, idx_ref = oracle.moe_router(h.double(), Wg.double(), bias.double(), top_k=k, n_group=n_group,
                                       topk_group=topk_group, norm_topk_prob=True, routed_scaling_factor=2.5)
    idx = torch.from_numpy(dev.host(idx_d)).long()
    assert torch.equal(idx, idx_ref)  # same experts, same (descending choice) order
    assert rel_max_abs(torch.from_numpy(dev.host(w_d)).double(), w_ref) < 1e-5
    ref = oracle.moe_experts(h.double(), w_ref, idx_ref, upw.double(), dnw.double())
    assert rel_max_abs(dev.down(out), ref) < lim(dev) * 2


def check_moe_combine_sorted(dev):
    # prefill: pair rows sorted by expert, found through the position map
    M, k, L = 5, 3, 24
    g = gen(71)
    w = torch.rand(M, k, generator=g)
    y = torch.randn(M * k, L, generator=g).to(tdt(dev))
    perm = torch.randperm(M * k, generator=g)  # pair i lives at row perm[i] of the sorted rows
    ys = torch.empty_like(y)
    ys[perm] = y
    out = poison(dev, (M, L))
    dev.run("moe_combine", cb._l((M,), (256,), "c"), dev.arr(w.numpy()), dev.up(ys), dev.arr(perm.int().numpy()), out,
            L, k)
    ref = (w.double()[..., None] * y.double().view(M, k, L)).sum(1)
    assert rel_max_abs(dev.down(out), ref) < lim(dev)


def check_gemv(dev, M, act):
    R, Cc = 203, 96  # R not a multiple of the 8 rows a block computes: the tail warps must not write
    g = gen(80)
    W, x = torch.randn(R, Cc, generator=g).to(tdt(dev)), torch.randn(M, Cc, generator=g).to(tdt(dev))
    Wd, xd, y = dev.up(W), dev.up(x), poison(dev, (M, R))
    isz = 2 if dev.dtype == "bfloat16" else 4
    vec = cb.vec_ok(Cc, isz, dev.addr(Wd), Cc, dev.addr(xd), Cc)
    assert vec  # 16-byte loads: both vector and scalar paths are checked (the second below)
    for v in (vec, False):
        dev.run("gemv", cb.launch_gemv(R), Wd, xd, Cc, y, R, R, Cc, M, int(act), int(v))
        ref = x.double() @ W.double().T
        ref = torch.relu(ref).square() if act else ref
        assert rel_max_abs(dev.down(y), ref) < lim(dev) * 2


def check_relu2_add_gather(dev):
    n = 3 * 1000 + 7  # not a multiple of the block: the grid-stride tail
    g = gen(81)
    a, b = torch.randn(n, generator=g).to(tdt(dev)), torch.randn(n, generator=g).to(tdt(dev))
    x = dev.up(a)
    dev.run("relu2", cb.launch_grid_stride(n, "relu2"), x, np.int64(n))
    assert torch.equal(dev.down(x), oracle.relu2(a).double())  # one rounding, as torch in the dtype
    out = poison(dev, (n,))
    dev.run("add", cb._l((3,), (256,), "add"), dev.up(a), dev.up(b), out, np.int64(n))  # 3 blocks stride over n
    assert torch.equal(dev.down(out), (a + b).double())
    src = torch.randn(9, 40, generator=g).to(tdt(dev))
    rows = torch.tensor([3, 3, 0, 8, 5], dtype=torch.int32)
    out = poison(dev, (5, 40))
    dev.run("gather_rows", cb._l((5,), (256,), "g"), dev.up(src), dev.arr(rows.numpy()), out, 40)
    assert torch.equal(dev.down(out), src[rows.long()].double())


#: (check, keyword arguments): every kernel entry point of cupy_kernels/*.cu is exercised here
KERNEL_CASES = [
    (check_embedding, dict(D=72)),  # 16-byte copies
    (check_embedding, dict(D=70)),  # element copies
    (check_add_rmsnorm, dict(D=64)),
    (check_add_rmsnorm, dict(D=64, masked=True)),
    (check_add_rmsnorm, dict(D=4480)),
    (check_gated_rmsnorm, {}),
    *[(check_conv1d_prefill_and_state, dict(T=T)) for T in (1, 2, 3, 70)],
    (check_conv1d_step_equals_prefill, {}),
    *[(check_ssd_chunked_scan_vs_recurrence, dict(T=T, chunk=c)) for T, c in
      [(1, 128), (37, 32), (128, 128), (300, 128), (300, 64)]],
    # the largest head dim and state size the kernels take: every lane and every 32-wide slice in use
    (check_ssd_chunked_scan_vs_recurrence, dict(T=70, chunk=64, B=1, H=2, P=128, G=1, N=128)),
    (check_ssd_step_vs_recurrence, {}),
    (check_attention_prefill, dict(S=0, T=21)),
    (check_attention_prefill, dict(S=13, T=7)),
    (check_attention_prefill, dict(S=40, T=7)),  # two key tiles
    *[(check_attention_decode, dict(S=S, splits=n)) for S, n in [(0, 1), (40, 1), (40, 3), (300, 8)]],
    (check_moe_router_and_experts, dict(n_group=1, topk_group=1, k=2)),
    (check_moe_router_and_experts, dict(n_group=4, topk_group=2, k=4)),
    (check_moe_combine_sorted, {}),
    *[(check_gemv, dict(M=M, act=act)) for M, act in [(1, True), (3, False), (8, True)]],
    (check_relu2_add_gather, {}),
    # edge shapes: the largest head sizes and groups the kernels take, short conv kernels
    (check_gated_rmsnorm, dict(M=2, G=2, gs=640)),  # groups wider than the block
    *[(check_conv1d_prefill_and_state, dict(T=T, K=K)) for T, K in [(1, 3), (3, 2), (70, 3)]],
    *[(check_conv1d_step_equals_prefill, dict(K=K)) for K in (2, 3)],
    (check_ssd_step_vs_recurrence, dict(B=1, H=2, P=128, G=1, N=128)),
    (check_attention_prefill, dict(S=40, T=20, Q=16, KV=1, Dh=128)),
    (check_attention_decode, dict(S=70, splits=2, Smax=128, Q=16, KV=1, Dh=128)),
    (check_moe_router_and_experts, dict(n_group=8, topk_group=4, k=6, E=128)),
    *QUANT_KERNEL_CASES,  # quant.cu: tests/backends/quant_kernel_checks.py
]


def case_id(case) -> str:
    check, kw = case
    return check.__name__.removeprefix("check_") + "".join(f"-{k}{v}" for k, v in kw.items())


@pytest.mark.parametrize("case", KERNEL_CASES, ids=case_id)
def test_kernel(dev, case):
    check, kw = case
    check(dev, **kw)


@pytest.mark.parametrize("M", [1, 3, 8, 11])
def test_gemv_and_cublas_linear(kb, M):
    R, Cc = 200, 96
    g = gen(80)
    W, x = torch.randn(R, Cc, generator=g).to(tdt(kb)), torch.randn(M, Cc, generator=g).to(tdt(kb))
    kb.p = {"t.weight": kb._upload(W)}
    y = poison(CupyDev(kb), (M, R))
    with kb.dev.scope():
        xd = kb._upload(x)  # held: a raw pointer into a temporary would point into freed memory at the launch
        kb._linear("t", kb._ptr(xd), Cc, kb._ptr(y), R, M, act=True)  # M <= 8: GEMV; 11: cuBLAS + relu2
    ref = torch.relu(x.double() @ W.double().T).square()
    assert rel_max_abs(kb._download(y, kb.dtype).double(), ref) < lim(kb) * 2


# ----------------------------------------------------------------------------------------------
# The whole backend vs the torch executor, and the equivalences
# ----------------------------------------------------------------------------------------------

def _models(make, name: str, dtype: str, **kw):
    """(the backend made by `make(**kw)`, the torch executor), both with `name` loaded."""
    from nemoh.runtime.session import open_model

    return open_model(name, make(**kw), dtype), open_model(name, "torch", dtype, device="cpu")


def _prompt(model, B=2, T=150, seed=0):
    return torch.randint(4, model.config.vocab_size, (B, T), generator=gen(seed))


# Whole-backend checks, parametrised over `make` (a backend class: CupyBackend here,
# CupyEmulatedBackend in tests/backends/test_cupy_emulated.py) and over sizes (the emulator is slow).

def check_backend_matches_torch(make, name, dtype, T=150):
    cu, th = _models(make, name, dtype)
    ids = _prompt(cu, T=T)
    a, b = cu.session(2).prefill(ids), th.session(2).prefill(ids)
    if dtype == "float32":
        assert rel_max_abs(a, b) < tol("logits_rel_max_abs", "float32")
    else:
        assert top1_agreement(a, b) >= tol("logits_top1", "bfloat16")
    # and against the fp64 oracle, the precise reference
    from nemoh.model.ir import build_graph

    g64 = build_graph(cu.config, "float64")
    ref = oracle.run(g64, cu.checkpoint.load(g64), ids)
    if dtype == "float32":
        assert rel_max_abs(a, ref) < tol("logits_rel_max_abs", "float32")
    else:
        assert top1_agreement(a, ref) >= tol("logits_top1", "bfloat16")


def check_prefill_chunks_and_decode_agree(make, name, graphs, T=90, chunks=(1, 31, 33, 25)):
    cu, _ = _models(make, name, "float32", cuda_graphs=graphs)
    ids = _prompt(cu, T=T, seed=1)
    one = cu.session(2)
    full = one.prefill(ids)
    chunked = cu.session(2)
    parts = chunked.prefill(ids, chunks=list(chunks))
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


def check_graph_replay_is_bit_identical_to_eager(make, P=30, T=40):
    eager, _ = _models(make, "tiny-moe", "bfloat16", cuda_graphs=False)
    graph, _ = _models(make, "tiny-moe", "bfloat16", cuda_graphs=True)
    ids = _prompt(eager, T=T, seed=2)
    outs = []
    for m in (eager, graph, graph):  # graph twice: repeated runs are bit-identical too
        s = m.session(2)
        s.prefill(ids[:, :P])
        outs.append(torch.cat([s.forward(ids[:, t:t + 1]) for t in range(P, T)], 1))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])


def check_state_layout_matches_torch_and_round_trips(make):
    cu, th = _models(make, "tiny-dense", "float32")
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


def check_copy_state_is_independent_and_cache_grows(make, max_len=32, P=20, T=70):
    cu, _ = _models(make, "tiny-list", "float32", max_len=max_len)  # forces KV-cache growth and graph recapture
    ids = _prompt(cu, B=1, T=T, seed=4)
    s = cu.session(1)
    s.prefill(ids[:, :P])
    snap = s.snapshot()
    tail = torch.cat([s.forward(ids[:, t:t + 1]) for t in range(P, T)], 1)
    assert s.state.max_len >= T and s.state.graph.captures >= 2
    s.restore(snap)
    again = torch.cat([s.forward(ids[:, t:t + 1]) for t in range(P, T)], 1)
    assert torch.equal(tail, again)
    ref = cu.session(1).prefill(ids)[:, P:]
    assert rel_max_abs(tail, ref) < tol("equiv_rel_max_abs", "float32")


def check_left_padded_batch_equals_alone(make, name, T=40, pad=15):
    cu, _ = _models(make, name, "float32")
    ids = _prompt(cu, B=2, T=T, seed=5)
    mask = torch.ones(2, T, dtype=torch.int64)
    mask[1, :pad] = 0
    both = cu.session(2).prefill(ids, mask)
    alone = cu.session(1).prefill(ids[1:, pad:])
    assert rel_max_abs(both[1, pad:], alone[0]) < tol("equiv_rel_max_abs", "float32")


def check_trace_and_params(make, device_prefix="cuda"):
    cu, th = _models(make, "tiny-moe", "float32")
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
    assert d["device"].startswith(device_prefix) and d["compiler"] and d["cuda_graphs"] is True


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_backend_matches_torch(name, dtype):
    check_backend_matches_torch(cb.CupyBackend, name, dtype)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("graphs", [True, False])
def test_prefill_chunks_and_decode_agree(name, graphs):
    check_prefill_chunks_and_decode_agree(cb.CupyBackend, name, graphs)


def test_graph_replay_is_bit_identical_to_eager():
    check_graph_replay_is_bit_identical_to_eager(cb.CupyBackend)


def test_state_layout_matches_torch_and_round_trips():
    check_state_layout_matches_torch_and_round_trips(cb.CupyBackend)


def test_copy_state_is_independent_and_cache_grows():
    check_copy_state_is_independent_and_cache_grows(cb.CupyBackend)


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-latent-moe"])
def test_left_padded_batch_equals_alone(name):
    check_left_padded_batch_equals_alone(cb.CupyBackend, name)


def test_trace_and_params():
    check_trace_and_params(cb.CupyBackend)

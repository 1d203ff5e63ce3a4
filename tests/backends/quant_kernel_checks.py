"""Kernel checks of cupy_kernels/quant.cu (the NVFP4 GEMV and dequantization, the FP8/NVFP4 activation
quantizers), on any kernel-check device (`CupyDev` on a GPU, `EmuDev` on the CPU emulator).

The GEMV and the dequantization are judged against the oracle's exact fp64 `dequant_nvfp4`; the activation
quantizers must be BIT-EQUAL to the torch executor's `_act_nvfp4` / `_act_fp8` (same fp32 operations in the
same order), on inputs that hit every edge: a block whose amax is 0, block scales saturating at 448, subnormal
block scales, e4m3 and e2m1 values exactly at a tie, FP8 saturation and FP8 subnormals.

Listed in test_cupy_gpu.KERNEL_CASES (QUANT_KERNEL_CASES), so both devices run them.
"""

from __future__ import annotations

import numpy as np
import torch

from nemoh.backends import cupy_backend as cb
from nemoh.backends.torch_backend import TorchBackend
from nemoh.conformance.tolerances import rel_max_abs
from nemoh.oracle import ops


def _tdt(dev) -> torch.dtype:
    return torch.bfloat16 if dev.dtype == "bfloat16" else torch.float32


def _poison(dev, shape):
    a = dev.empty(shape, dev.dtype)
    with dev.scope():
        a.fill(0x7FC0 if dev.dtype == "bfloat16" else np.nan)
    return a


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


def _down(dev, a, shape) -> torch.Tensor:
    """A device buffer back at the compute dtype, bit for bit."""
    h = dev.host(a) if not isinstance(a, np.ndarray) else a
    h = np.asarray(h).reshape(shape)
    if dev.dtype == "bfloat16":
        return torch.from_numpy(h.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(h.copy())


def nvfp4_weight(R: int, C: int, seed: int):
    """Random packed codes, e4m3 block scales (every finite non-negative byte value, subnormals included)
    and a global scale."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (R, C // 2), generator=g, dtype=torch.int64).to(torch.uint8)
    scales = torch.randint(0, 0x7F, (R, C // 16), generator=g, dtype=torch.int64).to(torch.uint8)  # 0x7f: NaN
    return codes, scales, torch.tensor(0.00731, dtype=torch.float32)


def check_gemv_nvfp4(dev, M, act, C=640):
    R = 203  # not a multiple of 8 rows a block; C = 640: 40 blocks of 16, more than one per lane
    codes, scales, gs = nvfp4_weight(R, C, 90)
    W = ops.dequant_nvfp4(codes, scales.view(torch.float8_e4m3fn), gs)  # fp64, exact
    x = (torch.randn(M, C, generator=torch.Generator().manual_seed(91)) * 30).to(_tdt(dev))
    q, s, xd, y = dev.up(codes), dev.up(scales), dev.up(x), _poison(dev, (M, R))
    isz = 2 if dev.dtype == "bfloat16" else 4
    vec = dev.addr(q) % 8 == 0 and cb.vec_ok(C, isz, dev.addr(xd), C)
    assert vec  # both the vector and the scalar paths run (the second below)
    ref = x.double() @ W.T
    ref = torch.relu(ref).square() if act else ref
    for v in (vec, False):
        dev.run("gemv_nvfp4", cb.launch_gemv(R), q, s, float(gs), xd, C, y, R, R, C, M, int(act), int(v))
        assert rel_max_abs(_down(dev, y, (M, R)).double(), ref) < (4e-2 if dev.dtype == "bfloat16" else 2e-5)


def check_nvfp4_dequant(dev):
    R, C = 37, 48
    codes, scales, gs = nvfp4_weight(R, C, 92)
    out = _poison(dev, (R, C))
    dev.run("nvfp4_dequant", cb.launch_grid_stride(R * C // 16, "nvfp4_dequant"), dev.up(codes), dev.up(scales),
            float(gs), out, np.int64(R * C // 16))
    exact = ops.dequant_nvfp4(codes, scales.view(torch.float8_e4m3fn), gs)
    # fp32: e2m1 x scale is exact, one rounding by the global scale = the exact value rounded once. bf16: through
    # fp32 first (a double rounding that can differ from the direct one at a bf16 tie)
    assert torch.equal(_bits(_down(dev, out, (R, C))), _bits(exact.float().to(_tdt(dev))))


def _edge_rows(C: int, seed: int) -> torch.Tensor:
    """[4, C] activations, input scale 1 (g = 1): block 0 all zero; block 1 exact e2m1 ties (scale 1);
    block 2 a block scale at an e4m3 tie (6.375 / 6 = 1.0625 -> 1); block 3 a subnormal block scale at a tie
    (3 * 2^-10 -> 2^-8); block 4 saturating the block scale (g * amax / 6 > 448); the rest random at several
    magnitudes, with a row of tiny values (subnormal scales throughout)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, C, generator=g, dtype=torch.float64)
    x[1] *= 1e3
    x[2] *= 1e-4
    x[:, 0:16] = 0.0
    x[:, 16:32] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5,
                                -3.5, -5.0, 0.5], dtype=torch.float64)
    x[:, 32:48] = torch.tensor([6.375] + [0.75 * 1.0625, 1.75 * 1.0625] + [1.0] * 13, dtype=torch.float64)
    x[:, 48:64] = 6 * 3 * 2.0 ** -10 * torch.linspace(-1, 1, 16, dtype=torch.float64)
    x[:, 64:80] = 5000.0 * torch.linspace(-1, 1, 16, dtype=torch.float64)
    return x


def _act_ref(dev, fmt: str, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    tb = TorchBackend()
    tb.acc = torch.float32
    return tb._act_fp8(x, s) if fmt == "fp8" else tb._act_nvfp4(x, s)


def check_act_quant_bit_equal(dev, fmt):
    """Rows of three tokens x two slots (MoE pairs: xdiv = 2, per-expert scales), then in place."""
    C = 16 * 40
    x = _edge_rows(C, 93)[:3].to(_tdt(dev))
    if fmt == "fp8":  # x / s beyond 448 (saturates), below 2^-6 (subnormal e4m3), at e4m3 ties
        x[:, 96:104] = torch.tensor([460.0, -1e4, 1.0625, 1.1875, 3 * 2.0 ** -10, 2.0 ** -10, 5 * 2.0 ** -10,
                                     -2.0 ** -12]).to(x.dtype)
    scales = torch.tensor([1.0, 0.0173, 2.5], dtype=torch.float32)  # input_scale per expert
    kern, sc = ("act_fp8", scales) if fmt == "fp8" else ("act_nvfp4", (1.0 / scales).to(torch.float32))
    idx = torch.tensor([0, 1, 2, 1, 0, 2], dtype=torch.int32)  # pair i: token i // 2, expert idx[i]
    out = _poison(dev, (6, C))
    dev.run(kern, cb._l((6,), (256,), kern), dev.up(x), C, 2, dev.arr(idx.numpy()), dev.arr(sc.numpy()), out, C, C)
    got = _down(dev, out, (6, C))
    for i in range(6):
        ref = _act_ref(dev, fmt, x[i // 2], scales[idx[i]])
        assert torch.equal(_bits(got[i]), _bits(ref)), (fmt, i)
    # one scale for every row (idx null), in place, on 4 rows at several magnitudes
    x4 = _edge_rows(C, 94).to(_tdt(dev))
    if fmt == "fp8":
        x4[:, 96:104] = x[0, 96:104]
    xd = dev.up(x4)
    dev.run(kern, cb._l((4,), (256,), kern), xd, C, 1, None, dev.arr(sc[1:2].numpy()), xd, C, C)
    assert torch.equal(_bits(_down(dev, xd, (4, C))), _bits(_act_ref(dev, fmt, x4, scales[1])))
    # and the meaning: the oracle's fp64 quantizer on the same (fp32 / bf16) input, within rounding
    ref = (ops.quant_act_fp8 if fmt == "fp8" else ops.quant_act_nvfp4)(x4.double(), scales[1])
    assert rel_max_abs(_down(dev, xd, (4, C)).double(), ref) < (1e-2 if dev.dtype == "bfloat16" else 1e-6)


QUANT_KERNEL_CASES = [
    *[(check_gemv_nvfp4, dict(M=M, act=act)) for M, act in [(1, False), (3, True), (8, False)]],
    (check_nvfp4_dequant, {}),
    (check_act_quant_bit_equal, dict(fmt="nvfp4")),
    (check_act_quant_bit_equal, dict(fmt="fp8")),
]

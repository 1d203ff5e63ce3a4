"""The CuPy backend's CUDA kernels on the CPU emulator (backends/cuda_emu.py), no GPU needed.

Every kernel check of tests/backends/test_cupy_gpu.py (KERNEL_CASES: every entry point, f32 and bf16,
against nemoh.oracle) runs here on `EmuDev`; each launch also runs under two thread schedules
compared bit for bit, with guard bytes around every buffer. The rest proves those checks can fail:
a kernel missing a __syncthreads, a barrier some threads never reach, a write out of bounds, a
read of never-written shared memory, a misaligned vector load. Needs g++ (C++17).

The last part runs the whole CuPy backend (its host code unchanged) on the emulated device,
`CupyEmulatedBackend` (backend `cupy-emulated`), through the checks test_cupy_gpu.py runs on a GPU,
at smaller sizes.

Why one file: the emulator's own checks (signature table, detectors, self-test kernels) and the
runs of test_cupy_gpu.py's shared checks on it belong to one device, the emulator.
"""

from __future__ import annotations

import contextlib

import re
import shutil
import time

import numpy as np
import pytest
import torch
from test_cupy_gpu import (
    KERNEL_CASES,
    PRESETS,
    case_id,
    check_backend_matches_torch,
    check_copy_state_is_independent_and_cache_grows,
    check_graph_replay_is_bit_identical_to_eager,
    check_left_padded_batch_equals_alone,
    check_prefill_chunks_and_decode_agree,
    check_state_layout_matches_torch_and_round_trips,
    check_trace_and_params,
    kname,
)

from nemoh.backends import cuda_emu
from nemoh.backends import cupy_backend as cb
from nemoh.backends import cupy_compile as cc

if shutil.which(cuda_emu.CXX) is None:
    pytest.fail(f"the CUDA emulator needs {cuda_emu.CXX} (apt-get install g++)", pytrace=False)

_NP = {"float32": np.float32, "bfloat16": np.uint16, "int32": np.int32, "float64": np.float64}


class EmuDev:
    """The kernel-check device on the CPU: buffers are numpy arrays (bf16 as uint16), kernels run
    through cuda_emu.launch."""

    def __init__(self, dtype: str):
        self.dtype = dtype

    def run(self, stem: str, launch: cb.Launch, *args) -> None:
        cuda_emu.launch(kname(self, stem), launch.grid, launch.block, launch.shared_mem, args)

    def up(self, t: torch.Tensor) -> np.ndarray:
        t = t.detach().contiguous()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(np.uint16).copy()
        return t.numpy().copy()

    def arr(self, a: np.ndarray) -> np.ndarray:
        return np.array(a, copy=True, order="C")

    def down(self, a: np.ndarray, dtype: str | None = None) -> torch.Tensor:
        if (dtype or self.dtype) == "bfloat16":
            return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16).double()
        return torch.from_numpy(a.copy()).double()

    def host(self, a: np.ndarray) -> np.ndarray:
        return a

    def empty(self, shape, dtype: str) -> np.ndarray:
        a = np.empty(shape, _NP[dtype])
        a.reshape(-1).view(np.uint8).fill(0xFF)  # never-written bytes are NaN / -1, not zeros, as garbage would be
        return a

    def zeros(self, shape, dtype: str) -> np.ndarray:
        return np.zeros(shape, _NP[dtype])

    def at(self, a: np.ndarray, elem_offset: int) -> np.ndarray:
        return a.reshape(-1)[elem_offset:]

    def addr(self, a: np.ndarray) -> int:
        return a.__array_interface__["data"][0]

    def scope(self):
        return contextlib.nullcontext()  # one host thread: nothing to order


@pytest.fixture(scope="module", autouse=True)
def built():
    """Build every kernel file once (in parallel; cached on disk by content)."""
    t0 = time.perf_counter()
    times = cuda_emu.build_all()
    return time.perf_counter() - t0, times


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def dev(request):
    return EmuDev(request.param)


# ----------------------------------------------------------------------------------------------
# Every kernel vs the oracle
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", KERNEL_CASES, ids=case_id)
def test_kernel(dev, case):
    check, kw = case
    check(dev, **kw)


def test_every_entry_point_is_checked():
    # the checks name kernels by stem: every stem of every file appears in some check's source
    import inspect

    import test_cupy_gpu

    src = "".join(inspect.getsource(check) for check, _ in KERNEL_CASES)
    src += inspect.getsource(test_cupy_gpu)  # helpers the checks call
    stems = {s for t, p in cc.KERNELS.values() for s in (*t, *p)}
    missing = sorted(s for s in stems if f'"{s}"' not in src)
    assert not missing, f"kernels without an emulated oracle check: {missing}"


# ----------------------------------------------------------------------------------------------
# The signature table and the build
# ----------------------------------------------------------------------------------------------

_DECL = re.compile(r'extern "C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(?!__launch_bounds__)'
                   r'(\w+?)(_##S)?\s*\(([^)]*)\)')


def test_signature_table_matches_the_sources():
    found = {}
    for file in cc.KERNELS:
        src = re.sub(r"\\\n", " ", cc.source(file))
        for m in _DECL.finditer(src):
            found[m.group(1)] = cuda_emu.parse_params(m.group(3))
    table = {k: cuda_emu.parse_params(v) for k, v in cc.SIGNATURES.items()}
    assert set(found) == set(table)
    for k in table:
        assert found[k] == table[k], k
    assert cuda_emu.parse_params("const T* __restrict__ x, i64 n") != cuda_emu.parse_params("const T* x, i64 n")


def test_parse_params():
    assert cuda_emu.parse_params("const T *x, int  n, double* c") == [
        cuda_emu.Param("const T*", "x"), cuda_emu.Param("int", "n"), cuda_emu.Param("double*", "c")]


def test_a_wrong_signature_does_not_compile(tmp_path, monkeypatch):
    # the generated launcher passes exactly the declared types: int for a long long is an error
    monkeypatch.setenv("NEMOH_EMU_CACHE", str(tmp_path))
    src = 'extern "C" __global__ void k(float* x, long long n) { if (threadIdx.x < n) x[threadIdx.x] = 1.f; }'
    cuda_emu.Module.from_source("ok.cu", src, {"k": "float* x, long long n"})
    with pytest.raises(cuda_emu.EmulatorError, match=r"bad\.cu.*does not compile"):
        cuda_emu.Module.from_source("bad.cu", src, {"k": "float* x, int n"})


def test_build_is_cached_and_fast(built):
    seconds, times = built
    assert set(times) == set(cc.KERNELS)
    assert seconds < 120, f"building the emulated kernels took {seconds:.1f} s"
    again = cuda_emu.Module(  # same content: a cache hit, no compiler run
        "norm.cu", cc.source("norm.cu"), cuda_emu.module("norm.cu").kernels)
    assert again.compile_s == 0.0 and again.path == cuda_emu.module("norm.cu").path


def test_launch_checks_arguments():
    x = np.zeros(8, np.float32)
    with pytest.raises(cuda_emu.EmulatorError, match="must be uint16 or int16"):
        cuda_emu.launch("relu2_bf16", (1,), (32,), 0, [x, 8])
    with pytest.raises(cuda_emu.EmulatorError, match="2 parameters"):
        cuda_emu.launch("relu2_f32", (1,), (32,), 0, [x])
    with pytest.raises(cuda_emu.EmulatorError, match="takes an integer"):
        cuda_emu.launch("relu2_f32", (1,), (32,), 0, [x, 8.0])
    with pytest.raises(cuda_emu.EmulatorError, match="unknown kernel"):
        cuda_emu.launch("relu3_f32", (1,), (32,), 0, [x, 8])
    with pytest.raises(cuda_emu.EmulatorError, match=r"512 threads per block, more than the kernel's "
                                                     r"__launch_bounds__\(256\)"):
        cuda_emu.launch("relu2_f32", (1,), (512,), 0, [x, 8])
    with pytest.raises(cuda_emu.EmulatorError, match="invalid launch"):
        cuda_emu.Module.from_source("nobounds.cu", 'extern "C" __global__ void k(float* x) { x[0] = 1.f; }',
                                    {"k": "float* x"}).launch("k", (1,), (2048,), 0, [x])


def test_every_kernel_declares_launch_bounds():
    for file in cc.KERNELS:
        bounds = cuda_emu.module(file).bounds
        assert set(bounds) == set(cc.entry_points(file)), file
    assert cuda_emu.module("norm.cu").bounds["add_rmsnorm_bf16"] == 1024
    assert cuda_emu.module("ssd.cu").bounds["ssd_state_passing"] == 256


# ----------------------------------------------------------------------------------------------
# The checks can fail
# ----------------------------------------------------------------------------------------------

_BAD = r'''
// block of n threads: out[i] = s[(i + 1) % n] after every thread wrote s[i] = in[i]
extern "C" __global__ void rotate_nosync(const float* in, float* out) {
    __shared__ float s[256];
    const int i = threadIdx.x, n = blockDim.x;
    s[i] = in[i];
    out[i] = s[(i + 1) % n];  // BUG: no __syncthreads between the write and the read
}
extern "C" __global__ void rotate(const float* in, float* out) {
    __shared__ float s[256];
    const int i = threadIdx.x, n = blockDim.x;
    s[i] = in[i];
    __syncthreads();
    out[i] = s[(i + 1) % n];
}
extern "C" __global__ void early_exit_barrier(float* out) {
    __shared__ float s[256];
    if (threadIdx.x >= 64) return;  // BUG: threads 64.. never reach the barrier below
    s[threadIdx.x] = 1.f;
    __syncthreads();
    out[threadIdx.x] = s[63 - threadIdx.x];
}
extern "C" __global__ void divergent_barriers(float* out) {
    __shared__ float s[256];
    s[threadIdx.x] = threadIdx.x;
    if (threadIdx.x < 32) {
        __syncthreads();  // BUG: two different barriers in the two branches
        out[threadIdx.x] = s[threadIdx.x + 32];
    } else {
        __syncthreads();
        out[threadIdx.x] = s[threadIdx.x - 32];
    }
}
extern "C" __global__ void half_warp_shuffle(float* out) {
    float v = threadIdx.x;
    if ((threadIdx.x & 31) < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);  // BUG: half the warp shuffles
    out[threadIdx.x] = v;
}
extern "C" __global__ void write_past_end(float* out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) out[i] = 1.f;  // BUG: <= writes one element past the end
}
extern "C" __global__ void uninit_shared(float* out) {
    __shared__ float s[64];
    if (threadIdx.x < 32) s[threadIdx.x] = 1.f;
    __syncthreads();
    out[threadIdx.x] = s[threadIdx.x];  // BUG: s[32..63] is never written
}
extern "C" __global__ void blocks_race(float* x) {
    // block b reads what block b - 1 writes: depends on the block order, undefined on a GPU
    if (threadIdx.x == 0) x[blockIdx.x + 1] = x[blockIdx.x] + 1.f;
}
extern "C" __global__ void warp_reduce(const float* in, float* out) {
    float v = in[threadIdx.x];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const float first = __shfl_sync(0xffffffffu, in[threadIdx.x], 0);
    const float below = __shfl_down_sync(0xffffffffu, in[threadIdx.x], 1);
    out[threadIdx.x] = v + 1000.f * first + 1e6f * below;
}
extern "C" __global__ void dyn_shared(const float* in, float* out) {
    extern __shared__ float buf[];
    buf[blockDim.x - 1 - threadIdx.x] = in[threadIdx.x];
    __syncthreads();
    out[threadIdx.x] = buf[threadIdx.x];
}
extern "C" __global__ void misaligned_ldg(const float* in, float* out) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(in + 1));  // BUG: 4-byte aligned 16-byte load
    out[threadIdx.x] = (float)v.x;
}
extern "C" __global__ void bf16_round(const float* in, __nv_bfloat16* out) {
    out[threadIdx.x] = __float2bfloat16_rn(in[threadIdx.x]);
}
'''
_BAD_SIGS = {
    "rotate_nosync": "const float* in, float* out", "rotate": "const float* in, float* out",
    "early_exit_barrier": "float* out", "divergent_barriers": "float* out", "half_warp_shuffle": "float* out",
    "write_past_end": "float* out, int n",
    "uninit_shared": "float* out", "blocks_race": "float* x", "warp_reduce": "const float* in, float* out",
    "dyn_shared": "const float* in, float* out", "misaligned_ldg": "const float* in, float* out",
    "bf16_round": "const float* in, __nv_bfloat16* out",
}


@pytest.fixture(scope="module")
def bad():
    return cuda_emu.Module.from_source("emu_selftest.cu", _BAD, _BAD_SIGS)


def test_missing_syncthreads_is_caught(bad):
    x = np.arange(128, dtype=np.float32)
    out = np.zeros(128, np.float32)
    bad.launch("rotate", (1,), (128,), 0, [x, out])
    assert np.array_equal(out, np.roll(x, -1))  # with the barrier: right, and the same in both schedules
    with pytest.raises(cuda_emu.EmulatorError, match=r"rotate_nosync<<<.*differ between two thread schedules.*"
                                                     r"buffer out \(argument 1\)"):
        bad.launch("rotate_nosync", (1,), (128,), 0, [x, np.zeros(128, np.float32)])


def test_unreached_barrier_is_reported_not_hung(bad):
    with pytest.raises(cuda_emu.EmulatorError, match=r"early_exit_barrier.*__syncthreads\(\) at emu_selftest\.cu:\d+ "
                                                     r"reached by 64 of 128 threads; threads 64-127 exited"):
        bad.launch("early_exit_barrier", (1,), (128,), 0, [np.zeros(128, np.float32)])


def test_divergent_barriers_are_reported(bad):
    at = r"emu_selftest\.cu:"
    with pytest.raises(cuda_emu.EmulatorError, match=rf"divergent_barriers.*different __syncthreads\(\): thread 0 at "
                                                     rf"{at}(\d+), threads 32-63 at {at}(?!\1)"):
        bad.launch("divergent_barriers", (1,), (64,), 0, [np.zeros(64, np.float32)])


def test_partial_warp_shuffle_is_reported(bad):
    with pytest.raises(cuda_emu.EmulatorError, match=r"half_warp_shuffle.*warp 0 is never reached by threads 16-31"):
        bad.launch("half_warp_shuffle", (1,), (64,), 0, [np.zeros(64, np.float32)])


def test_out_of_bounds_write_is_caught(bad):
    out = np.zeros((2, 50), np.float32)
    with pytest.raises(cuda_emu.EmulatorError, match=r"write_past_end.*4 bytes past the end of buffer out "
                                                     r"\(argument 0, float32 \(2, 50\)\)"):
        bad.launch("write_past_end", (4,), (32,), 0, [out, 100])
    assert not out.any()  # a failed launch leaves the caller's buffers untouched
    bad.launch("write_past_end", (4,), (32,), 0, [out.reshape(-1)[:99], 98])  # in bounds of the view: fine
    assert out.reshape(-1)[:99].all() and out.reshape(-1)[99] == 0


def test_never_written_shared_memory_is_caught(bad):
    with pytest.raises(cuda_emu.EmulatorError, match="uninit_shared.*differ between two thread schedules"):
        bad.launch("uninit_shared", (1,), (64,), 0, [np.zeros(64, np.float32)])


def test_blocks_depending_on_each_other_are_caught(bad):
    with pytest.raises(cuda_emu.EmulatorError, match="blocks_race.*differ between two thread schedules"):
        bad.launch("blocks_race", (8,), (32,), 0, [np.zeros(9, np.float32)])


def test_misaligned_vector_load_is_reported(bad):
    with pytest.raises(cuda_emu.EmulatorError, match="misaligned_ldg.*misaligned __ldg of 16 bytes"):
        bad.launch("misaligned_ldg", (1,), (32,), 0, [np.zeros(64, np.float32), np.zeros(32, np.float32)])


def test_shuffles_exchange_lanes(bad):
    x = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    out = np.zeros(64, np.float32)
    bad.launch("warp_reduce", (1,), (64,), 0, [x, out])
    for w in range(2):
        xs = x[32 * w:32 * w + 32].astype(np.float64)
        below = np.append(xs[1:], xs[-1])  # shfl_down: the last lane keeps its own value
        ref = xs.sum() + 1000 * xs[0] + 1e6 * below
        np.testing.assert_allclose(out[32 * w:32 * w + 32], ref, rtol=1e-6)


def test_dynamic_shared_memory_and_aliasing(bad):
    x = np.arange(96, dtype=np.float32)
    out = np.zeros(96, np.float32)
    bad.launch("dyn_shared", (1,), (96,), 96 * 4, [x, out])
    assert np.array_equal(out, x[::-1])
    # in and out the same array: one buffer for both, as on a device
    bad.launch("dyn_shared", (1,), (96,), 96 * 4, [x, x])
    assert np.array_equal(x, np.arange(96, dtype=np.float32)[::-1])


def test_bf16_rounds_to_nearest_even(bad):
    vals = [1.0, 1.00390625, 1.01171875, 1.0 + 2 ** -9 + 2 ** -20, -3.14159, 1e-40, 3.4e38, np.inf, -np.inf, np.nan,
            65504.0, 2 ** -133]
    x = np.array(vals + [0.0] * (32 - len(vals)), np.float32)
    out = np.zeros(32, np.uint16)
    bad.launch("bf16_round", (1,), (32,), 0, [x, out])
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    finite = ~np.isnan(x)
    assert np.array_equal(out[finite], ref[finite])
    assert out[~finite][0] & 0x7FFF > 0x7F80  # NaN stays NaN


# ----------------------------------------------------------------------------------------------
# The whole backend on the emulated device (cupy-emulated)
# ----------------------------------------------------------------------------------------------

EMU = cb.CupyEmulatedBackend


# bf16 on one preset only, marked slow: the torch executor's first bf16 conv1d of each shape costs
# seconds on the CPU (oneDNN primitive creation); every kernel runs in bf16 in test_kernel above
@pytest.mark.parametrize("name,dtype", [(n, "float32") for n in PRESETS]
                         + [pytest.param("tiny-moe", "bfloat16", marks=pytest.mark.slow)])
def test_emulated_backend_matches_torch(name, dtype):
    check_backend_matches_torch(EMU, name, dtype, T=24)  # M = 48 rows: the GEMM path, expert-sorted MoE


@pytest.mark.slow
def test_emulated_backend_two_chunks():
    check_backend_matches_torch(EMU, "tiny-dense", "float32", T=136)  # chunk_size 128: a state between chunks


@pytest.mark.parametrize("name,graphs", [("tiny-moe", True), ("tiny-list", False)])
def test_emulated_prefill_chunks_and_decode_agree(name, graphs):
    check_prefill_chunks_and_decode_agree(EMU, name, graphs, T=14, chunks=(1, 5, 8))


def test_emulated_graph_replay_is_bit_identical_to_eager():
    check_graph_replay_is_bit_identical_to_eager(EMU, P=8, T=12)


def test_emulated_state_layout_matches_torch_and_round_trips():
    check_state_layout_matches_torch_and_round_trips(EMU)


def test_emulated_copy_state_is_independent_and_cache_grows():
    check_copy_state_is_independent_and_cache_grows(EMU, max_len=8, P=6, T=12)


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-latent-moe"])
def test_emulated_left_padded_batch_equals_alone(name):
    check_left_padded_batch_equals_alone(EMU, name, T=16, pad=5)


def test_emulated_trace_and_params():
    check_trace_and_params(EMU, device_prefix="cpu-emulated")


def test_emulated_backend_through_the_registry_spec():
    from nemoh.runtime.registry import get_backend

    be = get_backend("nemoh.backends.cupy_backend:CupyEmulatedBackend")
    assert be.name == "cupy-emulated" and be.available().ok
    with pytest.raises(cb.NemohError, match="runs on the CPU"):
        be.init_device("float32", "cuda:0")
    with pytest.raises(cb.NemohError, match="schedules"):
        EMU(schedules=3)


def test_emulated_gemm_rounds_once_with_fp32_accumulation():
    dev = cb.EmulatedDevice(schedules=1)
    g = torch.Generator().manual_seed(9)
    x, w = torch.randn(5, 70, generator=g).to(torch.bfloat16), torch.randn(9, 64, generator=g).to(torch.bfloat16)
    xb = x.view(torch.int16).numpy().view(np.uint16).copy()
    wb = w.view(torch.int16).numpy().view(np.uint16).copy()
    y = np.zeros((5, 12), np.uint16)  # ldy 12 > N 9: the padding columns stay untouched
    dev.gemm("bfloat16", dev.ptr(xb, 3), 70, dev.ptr(wb), dev.ptr(y), 12, 5, 9, 64)  # x columns 3..66
    ref = (x[:, 3:67].float() @ w.float().T).to(torch.bfloat16)
    got = torch.from_numpy(y[:, :9].view(np.int16).copy()).view(torch.bfloat16)
    assert torch.equal(got, ref) and not y[:, 9:].any()


class _MutantDev(EmuDev):
    """EmuDev running one kernel file from a modified copy of its source."""

    def __init__(self, dtype: str, module: cuda_emu.Module):
        super().__init__(dtype)
        self.module = module

    def run(self, stem: str, launch: cb.Launch, *args) -> None:
        name = kname(self, stem)
        if name in self.module.kernels:
            self.module.launch(name, launch.grid, launch.block, launch.shared_mem, args)
        else:
            super().run(stem, launch, *args)


def _mutant(file: str, old: str, new: str) -> cuda_emu.Module:
    """`file` with `old` replaced once by `new` (in the file or in common.cuh, inlined)."""
    src = cc.source(file).replace('#include "common.cuh"', (cc.KERNEL_DIR / "common.cuh").read_text())
    assert src.count(old) >= 1, old
    return cuda_emu.Module(f"mutant-{file}", src.replace(old, new, 1), cuda_emu.module(file).kernels)


@pytest.mark.parametrize("file,old,new,check,kw", [
    # block_sum without its first barrier: warp 0 reads the partial sums before the other warps wrote them
    ("norm.cu", "if (lane == 0) sh[w] = v;\n    __syncthreads();", "if (lane == 0) sh[w] = v;",
     "check_add_rmsnorm", dict(D=4480)),
    # conv1d_prefill writing the carried state itself: a later time tile overwrites what the first one
    # still reads (why conv1d_state_update is a separate launch): a race between blocks
    ("conv1d.cu", "        for (int k = 0; k < KMAX - 1; ++k) win[k] = win[k + 1];\n    }",
     "        for (int k = 0; k < KMAX - 1; ++k) win[k] = win[k + 1];\n    }\n"
     "    if (t1 == T_) for (int j = 0; j < K - 1; ++j) ((T*)state)[((i64)b * C + c) * (K - 1) + j] = "
     "from_f<T>(win[KMAX - K + j]);", "check_conv1d_prefill_and_state", dict(T=70)),
], ids=["block_sum-barrier", "conv1d-state-race"])
def test_a_broken_real_kernel_is_caught(file, old, new, check, kw):
    import test_cupy_gpu

    with pytest.raises(cuda_emu.EmulatorError, match="differ between two thread schedules"):
        getattr(test_cupy_gpu, check)(_MutantDev("float32", _mutant(file, old, new)), **kw)
    getattr(test_cupy_gpu, check)(_MutantDev("float32", _mutant(file, old, old)), **kw)  # unmodified: passes


def test_portable_fiber_switch():
    # the ucontext path (non-x86-64 hosts) runs the same kernels to the same results and errors
    uc = cuda_emu.Module.from_source("emu_selftest_uc.cu", _BAD, _BAD_SIGS, extra_flags=["-DEMU_USE_UCONTEXT"])
    x = np.random.default_rng(1).standard_normal(64).astype(np.float32)
    a, b = np.zeros(64, np.float32), np.zeros(64, np.float32)
    uc.launch("warp_reduce", (1,), (64,), 0, [x, a])
    cuda_emu.Module.from_source("emu_selftest.cu", _BAD, _BAD_SIGS).launch("warp_reduce", (1,), (64,), 0, [x, b])
    assert np.array_equal(a, b) and a.any()
    with pytest.raises(cuda_emu.EmulatorError, match="differ between two thread schedules"):
        uc.launch("rotate_nosync", (1,), (128,), 0, [np.arange(128, dtype=np.float32), np.zeros(128, np.float32)])
    with pytest.raises(cuda_emu.EmulatorError, match="reached by 64 of 128 threads"):
        uc.launch("early_exit_barrier", (1,), (128,), 0, [np.zeros(128, np.float32)])


def test_nemoh_bench_runs_it_and_labels_its_timings_as_the_emulators():
    from nemoh.bench.cli import format_report
    from nemoh.bench.plan import Settings
    from nemoh.bench.run import run_bench

    res = run_bench(Settings(model="tiny-moe", backends=["cupy-emulated"], prompt_lengths=[8], context_depths=[8],
                             decode_tokens=1, repeats=1, warmup=0, reference="none", progress=False,
                             probe_copy_bytes=1 << 20, probe_matmul_n=64))
    (entry,) = res["backends"]
    assert entry["status"] == "UNCHECKED" and entry["prefill"][0]["ttft_seconds"]["n"] == 1
    assert "cupy-emulated: timings are of the CPU emulator" in format_report(res)

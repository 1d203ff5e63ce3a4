"""The CuPy executor: the IR on an NVIDIA GPU through hand-written CUDA kernels.

Kernels: `cupy_kernels/*.cu`, compiled at run time by NVRTC (see nemoh.backends.cupy_compile,
the same code CI uses to prove every kernel compiles) and loaded through `cupy.RawModule`.
Prefill matmuls go to cuBLAS (cublasGemmEx, fp32 accumulation); decode matmuls, up to 8 token
rows, to the kernels' own GEMV, so a decode step is kernels only and is captured once as a CUDA
graph and replayed (`cuda_graphs=True`, the default).

Why one file: the launch shapes, the buffer plans, the executor and its two devices all follow the
kernels' signatures and limits (cupy_kernels/*.cu); a change to one kernel touches each of them,
and keeping them together keeps that change in one place.

Precision follows backends/torch_backend.py: activations and weights at the compute dtype
(float32 or bfloat16; bf16 lives on the device as raw uint16 bits, so CuPy needs no bf16 dtype),
norms, the SSM (state kept in fp32), the router and the attention softmax in fp32, rounding to the
compute dtype exactly where the torch executor rounds.

State crosses the protocol in torch_backend's layout: `layers.{i}.conv` [B, C, K-1],
`layers.{i}.ssm` [B, H, P, N] fp32, `layers.{i}.k`/`.v` [B, S, KV, Dh], `mask` [B, S] int64.
The KV cache is preallocated to `max_len` tokens and grown (copied, graph recaptured) when a
forward needs more.

Every device action (buffers, copies, views at an offset, launches, GEMMs, synchronisation, graph
capture and replay) goes through one small device object: `CupyDevice` (CuPy on a GPU) or
`EmulatedDevice` (the same kernels on the CPU through backends/cuda_emu.py, GEMMs as host matmuls
with fp32 accumulation, a graph = the recorded launches). `CupyEmulatedBackend` (registered as
`cupy-emulated`) is this backend on the emulated device: the whole executor runs, checked for races
and out-of-bounds writes, without a GPU (slow; for tests).

Nothing here imports cupy at module import time: `available()` answers Support.no with the reason
on a machine without cupy, a driver or a GPU. The host-side logic (limits, launch shapes, buffer
sizes, the graph bookkeeping) is plain Python and is tested on the CPU.

Options (constructor arguments, or the environment for the registry's no-argument factory):
  max_len     NEMOH_CUPY_MAX_LEN   initial KV-cache length per sequence (default 4096)
  cuda_graphs NEMOH_CUPY_GRAPHS    0 to run decode steps eagerly (default 1)
  compiler    NEMOH_CUPY_COMPILER  "nemoh" (cupy_compile's NVRTC, cubin loaded by RawModule(path=)),
                                   "cupy" (RawModule(code=) with CuPy's NVRTC), default: nemoh if
                                   its NVRTC is found, else cupy
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from nemoh import dtypes
from nemoh.bench.cost import op_costs
from nemoh.errors import NemohError
from nemoh.model.ir import OP_KINDS, Graph, Layer
from nemoh.model.quant import act_key, kv_key
from nemoh.model.weights import Checkpoint
from nemoh.runtime.backend import Support

from . import cupy_compile as cc
from . import cupy_quant as cq
from .cupy_device import NP_DTYPES, CupyDevice, Device, LaunchShape

DTYPES = ("float32", "bfloat16")

# Compile-time limits of the kernels (the #defines in cupy_kernels/*.cu); check_graph enforces them.
KMAX = 4  # conv1d.cu KMAX
SSD_PMAX = SSD_NMAX = 128  # ssd.cu
ATT_DMAX, ATT_TK, ATT_QROWS, ATT_GROUP_MAX = 128, 32, 16, 16  # attention.cu (16 query heads per KV head)
MOE_EMAX, MOE_GMAX, MOE_KMAX = 1024, 64, 32  # moe.cu
GEMV_MMAX = 8  # linear.cu: token rows per GEMV launch
GRID_YZ_MAX = 65535
SMEM_STATIC_MAX = 48 * 1024
VEC_BYTES = 16



# ----------------------------------------------------------------------------------------------
# Host-side logic (no cupy): limits, launch shapes, buffer sizes, CUDA-graph bookkeeping
# ----------------------------------------------------------------------------------------------

def check_graph(graph: Graph) -> Support:
    """Can the kernels run this graph? Names the config field that is out of their range."""
    c = graph.config
    if graph.dtype not in DTYPES:
        return Support.no(f"compute dtype {graph.dtype}: the CuPy kernels are instantiated for "
                          f"{' and '.join(DTYPES)} only")
    checks = []
    kinds = set(c.layer_types)
    if "mamba" in kinds:
        checks += [("conv_kernel", c.conv_kernel, KMAX), ("mamba_head_dim", c.mamba_head_dim, SSD_PMAX),
                   ("ssm_state_size", c.ssm_state_size, SSD_NMAX)]
        if c.use_bias:
            return Support.no("field 'use_bias' is true: Mamba in_proj/out_proj biases are not implemented "
                              "by the cupy backend (no released Nemotron-H uses them)")
    if "attention" in kinds:
        checks += [("head_dim", c.head_dim, ATT_DMAX),
                   ("num_attention_heads / num_key_value_heads", c.num_attention_heads // c.num_key_value_heads,
                    ATT_GROUP_MAX)]
    if "moe" in kinds:
        checks += [("n_routed_experts", c.n_routed_experts, MOE_EMAX), ("n_group", c.n_group, MOE_GMAX),
                   ("num_experts_per_tok", c.num_experts_per_tok, MOE_KMAX)]
    if kinds & {"mlp", "moe"} and c.mlp_bias:
        return Support.no("field 'mlp_bias' is true: MLP biases are not implemented by the cupy backend "
                          "(no released Nemotron-H uses them)")
    for name, value, limit in checks:
        if value > limit:
            return Support.no(f"field '{name}' is {value}; the cupy kernels support at most {limit}")
    return Support.yes()


class Launch(NamedTuple):
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_mem: int = 0

    def validate(self, what: str) -> Launch:
        gx, gy, gz = self.grid
        if min(self.grid) < 1 or gx >= 2 ** 31 or gy > GRID_YZ_MAX or gz > GRID_YZ_MAX:
            raise NemohError(f"{what}: grid {self.grid} is out of CUDA's range (split the batch or prompt)")
        if self.block[0] * self.block[1] * self.block[2] > 1024:
            raise NemohError(f"{what}: block {self.block} has more than 1024 threads")
        return self


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _l(grid, block, what: str) -> Launch:
    g = tuple(grid) + (1,) * (3 - len(grid))
    b = tuple(block) + (1,) * (3 - len(block))
    return Launch(g, b).validate(what)


def launch_rows(M: int, D: int, what: str = "add_rmsnorm") -> Launch:
    """One block per row; 256 threads, or 1024 for rows of 8192+ values."""
    return _l((M,), (1024 if D >= 8192 else 256,), what)


def launch_gated_norm(M: int, G: int) -> Launch:
    return _l((M, G), (256,), "gated_rmsnorm")


CONV_TT = 64  # time steps per thread in conv1d_prefill


def launch_conv_prefill(B: int, T: int, C: int) -> Launch:
    return _l((cdiv(C, 128), cdiv(T, CONV_TT), B), (128,), "conv1d_prefill")


def launch_flat(n: int, block: int, what: str) -> Launch:
    """One thread per item."""
    return _l((cdiv(n, block),), (block,), what)


def launch_grid_stride(n: int, what: str) -> Launch:
    return _l((max(1, min(cdiv(n, 256), 8192)),), (256,), what)


def ssd_launches(B: int, T: int, H: int, P: int, N: int, chunk: int) -> dict[str, Launch]:
    """The four prefill launches of the chunked scan."""
    nc = cdiv(T, chunk)
    return {
        "ssd_dt_cumsum": launch_flat(B * nc * H, 128, "ssd_dt_cumsum"),
        "ssd_chunk_state": _l((H, B * nc), (256,), "ssd_chunk_state"),
        "ssd_state_passing": launch_flat(B * H * P * N, 256, "ssd_state_passing"),
        "ssd_chunk_scan": _l((cdiv(min(chunk, T), 32), H, B * nc), (256,), "ssd_chunk_scan"),
    }


def launch_attn_prefill(B: int, T: int, Q: int) -> Launch:
    return _l((cdiv(T, ATT_QROWS), Q, B), (128,), "attn_prefill")


def decode_splits(max_len: int, B: int, KV: int, n_sm: int) -> int:
    """Key splits of the decode attention: about two blocks per SM, no split shorter than a tile."""
    want = cdiv(2 * n_sm, max(1, B * KV))
    return max(1, min(want, cdiv(max_len, ATT_TK), 64))


def launch_gemv(R: int, pairs: int = 1, what: str = "gemv") -> Launch:
    """Warp per output row, 8 rows per block; `pairs` (token, expert) slots on grid.y."""
    return _l((cdiv(R, 8), pairs), (256,), what)


def row_chunks(M: int, step: int = GEMV_MMAX) -> list[tuple[int, int]]:
    """(start, rows) pieces of at most `step` rows: the decode GEMV handles 8 token rows at a time."""
    return [(s, min(step, M - s)) for s in range(0, M, step)]


def vec_ok(cols: int, itemsize: int, *ptrs_and_strides: int) -> bool:
    """16-byte loads are legal: the row length, every row stride and every base address align."""
    n = VEC_BYTES // itemsize
    return cols % n == 0 and all(v % (n if i % 2 else VEC_BYTES) == 0 for i, v in enumerate(ptrs_and_strides))


def grow_len(old: int, need: int, step: int = 256) -> int:
    """KV-cache length after growth: at least `need`, at least double, a multiple of `step`."""
    return cdiv(max(need, 2 * old), step) * step


def state_buffers(graph: Graph, batch: int, max_len: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """Device buffers of one carried state: name -> (shape, dtype), from the IR's StateSpecs."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for layer in graph.layers:
        for s in layer.states:
            shape = (batch, max_len, *s.shape) if s.per_token else (batch, *s.shape)
            out[s.name] = (shape, s.dtype)
    out["kmask"] = ((batch, max_len), "int32")
    out["ctrl"] = ((2 * batch + 1,), "int32")  # decode: ids [B] | mask [B] | cached length
    return out


def decode_buffers(graph: Graph, batch: int, splits: int, act_elems: int = 0) -> dict[str, tuple[tuple[int, ...], str]]:
    """The static scratch buffers a captured decode step reads and writes (one token per row); `act_elems`: per
    token, the quantized linear inputs of a ModelOpt checkpoint (cupy_quant.act_elems)."""
    c, B, dt = graph.config, batch, graph.dtype
    D = c.hidden_size
    out: dict[str, tuple[tuple[int, ...], str]] = {
        "x": ((B, D), dt), "h": ((B, D), dt), "out": ((B, D), dt), "logits": ((B, c.vocab_size), dt)}
    kinds = set(c.layer_types)
    if "mamba" in kinds:
        out |= {"zxbcdt": ((B, c.in_proj_dim), dt), "xbc": ((B, c.conv_dim), dt),
                "y": ((B, c.d_inner), "float32"), "yn": ((B, c.d_inner), dt)}
    if "attention" in kinds:
        Q, KV, Dh = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        out |= {"q": ((B, Q * Dh), dt), "k": ((B, KV * Dh), dt), "v": ((B, KV * Dh), dt),
                "att": ((B, Q * Dh), dt), "part": ((B, Q, splits, Dh + 2), "float32")}
    if "mlp" in kinds:
        out["up"] = ((B, c.intermediate_size), dt)
    if "moe" in kinds:
        k, L, I = c.num_experts_per_tok, c.moe_input_size, c.moe_intermediate_size
        out |= {"topk_w": ((B, k), "float32"), "topk_idx": ((B, k), "int32"), "eup": ((B * k, I), dt),
                "edown": ((B * k, L), dt), "routed": ((B, L), dt)}
        if c.moe_latent_size is not None:
            out |= {"lat": ((B, L), dt), "routed_out": ((B, D), dt)}
        if c.n_shared_experts and c.moe_shared_expert_intermediate_size:
            out |= {"sup": ((B, c.moe_shared_expert_intermediate_size), dt), "shared": ((B, D), dt)}
    if act_elems:
        out["aq"] = ((B * act_elems,), dt)
    return out


def buffer_bytes(plan: dict[str, tuple[tuple[int, ...], str]]) -> int:
    return sum(math.prod(shape) * dtypes.ITEMSIZE.get(dt, 4) for shape, dt in plan.values())


class DecodeGraph:
    """Bookkeeping of one state's captured decode step.

    A captured graph bakes in every buffer address, so it may be replayed only while the state's
    buffers are the ones it was captured with: `key` is the state's buffer epoch, bumped on every
    reallocation (KV-cache growth, new decode buffers). `plan()` answers what the next step does:
      eager    graphs off, or a trace was asked for (graph replays record nothing)
      warmup   first step on these buffers: run eagerly (any lazy initialisation happens outside a
               capture), then `warmed(key)`
      capture  warmed, but no graph for these buffers yet
      replay   a graph for these buffers exists
    """

    def __init__(self) -> None:
        self.status = "empty"  # empty | captured | invalid
        self.graph: Any = None
        self.key: Any = None
        self.warm_key: Any = None
        self.captures = 0
        self.replays = 0
        self.reason = ""

    def plan(self, key: Any, *, enabled: bool, trace: bool) -> str:
        if not enabled or trace:
            return "eager"
        if self.status == "captured" and self.key == key:
            return "replay"
        if self.warm_key == key:
            return "capture"
        return "warmup"

    def warmed(self, key: Any) -> None:
        self.warm_key = key

    def captured(self, key: Any, graph: Any) -> None:
        self.status, self.key, self.graph, self.reason = "captured", key, graph, ""
        self.captures += 1

    def replayed(self) -> None:
        if self.status != "captured":
            raise NemohError(f"cupy backend: replay of a decode graph in status {self.status!r}")
        self.replays += 1

    def invalidate(self, reason: str) -> None:
        if self.graph is not None or self.status == "captured":
            self.status, self.graph, self.key, self.reason = "invalid", None, None, reason


# ----------------------------------------------------------------------------------------------
# The backend
# ----------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------
# The device seam: every device action of the backend goes through one of two classes, CupyDevice (CuPy on a
# GPU, backends/cupy_device.py) or EmulatedDevice (the CPU emulator, below)
# ----------------------------------------------------------------------------------------------

def _bf16_bits_to_f32(u: np.ndarray) -> np.ndarray:
    return (u.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16_bits(f: np.ndarray) -> np.ndarray:
    """Round to nearest even, as __float2bfloat16_rn (NaN -> 0x7fff)."""
    u = np.ascontiguousarray(f, np.float32).view(np.uint32)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where((u & 0x7FFFFFFF) > 0x7F800000, np.uint16(0x7FFF), r)


class EmulatedDevice:
    """The CPU: the same .cu kernels through the emulator (backends/cuda_emu.py, every launch
    checked for races and out-of-bounds writes), GEMMs as host matmuls with fp32 accumulation
    (numpy float32 BLAS) rounded once to the dtype, and a "graph" that is the recorded launches,
    replayed in order.

    Buffers are numpy arrays (bf16 as uint16); `ptr` is a flat numpy view at the offset, which the
    emulator resolves back to its buffer (overlapping views stay one buffer)."""

    kind = "cpu-emulated"
    n_sm = 132  # decode_splits as on an H100, so that split decode attention is exercised

    def __init__(self, schedules: int = 2):
        from . import cuda_emu

        self.emu, self.schedules = cuda_emu, schedules
        cuda_emu.build_all()
        self.kernels: dict[str, Any] = {e: e for file in cc.KERNELS for e in cc.entry_points(file)}
        self.route = f"cpu emulator (g++ {cuda_emu.compiler_version()}, {schedules} schedule(s) per launch)"
        self._rec: list | None = None

    def scope(self):
        return contextlib.nullcontext()

    def synchronize(self) -> None:
        pass

    def empty(self, shape, dtype: str) -> np.ndarray:
        a = np.empty(shape, NP_DTYPES[dtype])
        a.reshape(-1).view(np.uint8).fill(0xFF)  # garbage, as device memory would be: NaN / -1
        return a

    def zeros(self, shape, dtype: str) -> np.ndarray:
        return np.zeros(shape, NP_DTYPES[dtype])

    def upload(self, h: np.ndarray) -> np.ndarray:
        return np.array(h, copy=True, order="C")

    def download(self, a: np.ndarray) -> np.ndarray:
        return np.array(a, copy=True, order="C")

    def write(self, a: np.ndarray, h: np.ndarray) -> None:
        np.copyto(a, np.asarray(h).reshape(a.shape))

    def contiguous(self, a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a)

    def ptr(self, a: np.ndarray, elem_offset: int = 0) -> np.ndarray:
        if not a.flags.c_contiguous:
            raise NemohError("emulated device: a kernel pointer into a non-contiguous view")
        return a.reshape(-1)[elem_offset:]

    def advance(self, p: np.ndarray, elems: int, itemsize: int) -> np.ndarray:
        return p[elems:]

    def addr(self, p: np.ndarray) -> int:
        return p.__array_interface__["data"][0]

    def launch(self, kern: str, launch: LaunchShape, args) -> None:
        args = [int(a) if isinstance(a, bool) else a for a in args]
        if self._rec is not None:  # capturing: recorded, run at replay (as a CUDA graph)
            self._rec.append((kern, launch, args))
            return
        self.emu.launch(kern, launch.grid, launch.block, launch.shared_mem, args, schedules=self.schedules)

    def gemm(self, dtype: str, x: np.ndarray, ldx: int, w: np.ndarray, y: np.ndarray, ldy: int, M: int, N: int,
             K: int) -> None:
        if self._rec is not None:
            raise NemohError("emulated device: a GEMM inside a graph capture (decode steps use the GEMV kernel)")
        st = np.lib.stride_tricks.as_strided
        isz = x.itemsize
        xs, ws = st(x, (M, K), (ldx * isz, isz)), st(w, (N, K), (K * isz, isz))
        ys = st(y, (M, N), (ldy * isz, isz))
        if dtype == "bfloat16":
            ys[...] = _f32_to_bf16_bits(_bf16_bits_to_f32(xs) @ _bf16_bits_to_f32(ws).T)
        else:
            ys[...] = np.asarray(xs, np.float32) @ np.asarray(ws, np.float32).T

    def begin_capture(self) -> None:
        self._rec = []

    def end_capture(self) -> list:
        rec, self._rec = self._rec, None
        if rec is None:
            raise NemohError("emulated device: end_capture without begin_capture")
        return rec

    def replay(self, graph: list) -> None:
        for kern, launch, args in graph:
            self.launch(kern, launch, args)

    def describe(self) -> dict[str, Any]:
        return {"device": "cpu-emulated", "device_name": f"CUDA emulator on the CPU ({self.route})"}


class _Trace:
    """Copies op outputs into the caller's trace dict (eager runs only: it synchronises)."""

    def __init__(self, backend: CupyBackend, out: dict[str, torch.Tensor], B: int, T: int):
        self.backend, self.out, self.B, self.T = backend, out, B, T

    def __call__(self, name: str, a, dtype: str | None = None) -> None:
        t = self.backend._download(a, dtype or self.backend.dtype)
        self.out[name] = t.reshape(self.B, self.T, -1)

    def put(self, name: str, t: torch.Tensor) -> None:
        self.out[name] = t


@dataclass
class CupyState:
    batch: int
    max_len: int
    length: int = 0  # cached tokens S
    conv: dict[int, Any] = field(default_factory=dict)  # [B, C, K-1], pre-conv inputs, compute dtype
    ssm: dict[int, Any] = field(default_factory=dict)  # [B, H, P, N] fp32
    k: dict[int, Any] = field(default_factory=dict)  # [B, Smax, KV, Dh]
    v: dict[int, Any] = field(default_factory=dict)
    kmask: Any = None  # [B, Smax] int32
    ctrl: Any = None  # int32 [2B + 1]
    dec: dict[str, Any] | None = None  # decode scratch (static for the graph)
    splits: int = 1
    epoch: int = 0  # bumped on every reallocation of a buffer a graph may have captured
    graph: DecodeGraph = field(default_factory=DecodeGraph)


class CupyBackend:
    """Implements nemoh.runtime.backend.Backend with CuPy and the kernels in cupy_kernels/."""

    name = "cupy"
    optional_capabilities = ("quant_fp8", "quant_nvfp4", "quant_kv_fp8")  # yes at its kernel dtypes

    def __init__(self, max_len: int | None = None, cuda_graphs: bool | None = None, compiler: str | None = None):
        self.max_len = int(max_len if max_len is not None else os.environ.get("NEMOH_CUPY_MAX_LEN", 4096))
        if cuda_graphs is None:
            cuda_graphs = os.environ.get("NEMOH_CUPY_GRAPHS", "1") not in ("0", "false", "no")
        self.cuda_graphs = bool(cuda_graphs)
        self.compiler = compiler or os.environ.get("NEMOH_CUPY_COMPILER") or None
        if self.compiler not in (None, "nemoh", "cupy"):
            raise NemohError(f"cupy backend: compiler must be 'nemoh' or 'cupy', got {self.compiler!r}")
        if self.max_len < 1:
            raise NemohError(f"cupy backend: max_len must be positive, got {self.max_len}")
        self._graph: Graph | None = None
        self.p: dict[str, Any] = {}
        self.kernels: dict[str, Any] = {}
        self._dev: Device | None = None
        # ModelOpt checkpoints (backends/cupy_quant.py): NVFP4 linears kept packed, input quantizers per linear
        self.packed: dict[str, cq.Packed] = {}
        self.aq: dict[str, cq.ActQuant] = {}
        self.kvq: dict[int, tuple[cq.ActQuant, ...]] = {}  # an FP8 KV cache: (k, v) quantizers per attention layer
        self.quant: dict[str, Any] = {}
        self._act_elems = 0
        self._wdense: Any = None  # prefill: one packed linear dequantized for cuBLAS
        self._aq_static: Any = None  # decode: the quantized inputs' static buffer

    @property
    def dev(self) -> Device:
        if self._dev is None:
            raise NemohError(f"{self.name} backend: no device yet (load() or init_device() first)")
        return self._dev

    @property
    def graph(self) -> Graph:
        if self._graph is None:
            raise NemohError(f"{self.name} backend: no model loaded (load() first)")
        return self._graph

    # -- capabilities -------------------------------------------------------------------------
    def available(self) -> Support:
        try:
            import cupy
        except Exception as e:  # ImportError, or a broken install raising anything at import
            return Support.no(f"cupy is not importable ({type(e).__name__}: {e}); install the gpu extra "
                              "(pip install 'nemoh[gpu]')")
        try:
            n = cupy.cuda.runtime.getDeviceCount()
        except Exception as e:  # CUDARuntimeError: no driver, driver too old, no device
            return Support.no(f"no usable CUDA device ({type(e).__name__}: {e})")
        if n < 1:
            return Support.no("no CUDA device")
        try:
            cap = int(cupy.cuda.Device(0).compute_capability)
        except Exception as e:
            return Support.no(f"cannot query the CUDA device ({type(e).__name__}: {e})")
        if cap < 80:
            return Support.no(f"compute capability {cap // 10}.{cap % 10} < 8.0: the bf16 kernels need sm_80+")
        if self.compiler == "nemoh" and not cc.toolchain_candidates():
            return Support.no("compiler 'nemoh' asked for, but no NVRTC found (pip install nvidia-cuda-nvrtc-cu12 "
                              "nvidia-cuda-runtime-cu12)")
        if not cc.toolchain_candidates():
            try:
                cupy.cuda.nvrtc.getVersion()
            except Exception as e:
                return Support.no(f"no NVRTC: neither nemoh's (pip install nvidia-cuda-nvrtc-cu12 "
                                  f"nvidia-cuda-runtime-cu12) nor CuPy's ({type(e).__name__}: {e})")
        return Support.yes()

    def supports_graph(self, graph: Graph, device: str | None = None) -> Support:
        return check_graph(graph)

    def supports(self, op_kind: str, dtype: str) -> Support:
        if op_kind in ("quant_fp8", "quant_nvfp4", "quant_kv_fp8"):  # backends/cupy_quant.py, cupy_kernels/quant.cu
            return Support.yes() if dtype in DTYPES else Support.no(f"dtype {dtype}: not a CuPy kernel dtype")
        if op_kind not in OP_KINDS:
            return Support.no(f"unknown op kind {op_kind!r}")
        if dtype not in DTYPES:
            return Support.no(f"dtype {dtype}: the CuPy kernels are instantiated for {' and '.join(DTYPES)} only")
        return Support.yes()

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"backend": self.name, "cuda_graphs": self.cuda_graphs, "max_len": self.max_len,
                             "compiler": self._dev.route if self._dev is not None else self.compiler or "auto"}
        if self._graph is not None:
            d["dtype"] = self._graph.dtype
        if self._dev is not None:
            d |= self._dev.describe()
        if self.quant:
            d["quantized"] = self.quant
        return d

    # -- loading ------------------------------------------------------------------------------
    def load(self, graph: Graph, checkpoint: Checkpoint, *, device: str | None = None) -> None:
        ok = check_graph(graph)
        if not ok.ok:
            raise NemohError(f"cupy backend cannot run this model: {ok.reason}")
        self.init_device(graph.dtype, device)
        self._graph = graph
        formats = checkpoint.formats(graph)
        packed = cq.packed_names(formats)
        stored = checkpoint.stored(graph) if packed else {}
        tensors = dict(checkpoint.load(graph, [t.name for t in graph.params if t.name not in packed]))
        scales = {n: (f, s) for n, f in formats.items() if (s := tensors.pop(act_key(n, f), None)) is not None}
        scales |= {n: (formats[n], s) for n in packed if (s := checkpoint.read_aux(n, "input_scale")) is not None}
        # an FP8 KV cache (kv_cache_quant_algo): each attention layer's new K and V go through act_fp8 in place
        kv = {key: checkpoint.read_kv(*where) for key, where in checkpoint.kv_scales(graph).items()}
        for key in kv:
            tensors.pop(key, None)
        with self.dev.scope():
            self.p = {k: self._upload(v) for k, v in tensors.items()}
            # derived once: A = -exp(A_log) in fp32, exactly once
            self.A = {l.index: self._upload(-torch.exp(tensors[f"layers.{l.index}.mixer.A_log"].float()))
                      for l in graph.layers if l.kind == "mamba"}
            self.packed = {}
            for n in packed:
                codes, bs, gs = cq.packed_host(stored, n)
                self.packed[n] = cq.Packed(self.dev.upload(codes), self.dev.upload(bs), gs, *graph.param(n).shape)
            self.aq = {n: cq.ActQuant(f, cq.ACT_KERNEL[f], self.dev.upload(cq.act_scale(f, s)))
                       for n, (f, s) in scales.items()}
            self.kvq = {l.index: tuple(cq.ActQuant("fp8", "act_fp8", self.dev.upload(cq.act_scale("fp8", kv[kv_key(
                l.index, w)]))) for w in ("k", "v")) for l in graph.layers if kv_key(l.index, "k") in kv}
            big = max((p.rows * p.cols for p in self.packed.values()), default=0)
            self._wdense = self._empty((big,), self.dtype) if big else None
        self._act_elems = cq.act_elems(graph, list(self.aq))
        self.quant = cq.summary(graph, formats, self.packed, list(self.aq), self.isz) if formats else {}
        self.dev.synchronize()

    def init_device(self, dtype: str, device: str | None = None) -> None:
        """Select the device, make the stream, compile and load every kernel (no model needed:
        tests/backends/test_cupy_gpu.py drives single kernels through this)."""
        if dtype not in DTYPES:
            raise NemohError(f"{self.name} backend: dtype {dtype} is not one of {', '.join(DTYPES)}")
        self._dev = self._make_device(device)
        self.dtype = dtype
        self.isz = dtypes.ITEMSIZE[dtype]
        self.kernels = self.dev.kernels

    def _make_device(self, device: str | None) -> Device:
        return CupyDevice(device, self.compiler)

    def _k(self, stem: str):
        return self.kernels[cc.kernel_name(stem, self.dtype)]

    # -- conversions --------------------------------------------------------------------------
    def _upload(self, t: torch.Tensor):
        t = t.detach().contiguous().cpu()
        if t.dtype == torch.bfloat16:
            return self.dev.upload(t.view(torch.int16).numpy().view(np.uint16))
        return self.dev.upload(t.numpy())

    def _download(self, a, dtype: str) -> torch.Tensor:
        h = self.dev.download(a)
        if dtype == "bfloat16":
            return torch.from_numpy(h.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(h)

    def _empty(self, shape, dtype: str):
        return self.dev.empty(shape, dtype)

    def _zeros(self, shape, dtype: str):
        return self.dev.zeros(shape, dtype)

    def read_param(self, name: str) -> torch.Tensor:
        spec = self.graph.param(name)
        if name in self.packed:  # dequantized by the device's own decoder (nvfp4_dequant)
            pk = self.packed[name]
            with self.dev.scope():
                out = self._empty((pk.rows, pk.cols), self.dtype)
                self._dequant(pk, out)
            self.dev.synchronize()
            return self._download(out, spec.dtype).clone()
        return self._download(self.p[name], spec.dtype).clone()

    # -- kernel launch helpers ----------------------------------------------------------------
    def _run(self, kern, launch: Launch, *args) -> None:
        self.dev.launch(kern, launch, args)

    def _ptr(self, a, elem_offset: int = 0) -> Any:
        """Buffer `a` at element `elem_offset`, as a kernel or GEMM argument."""
        return self.dev.ptr(a, elem_offset)

    def _gemm(self, x: Any, ldx: int, w: Any, y: Any, ldy: int, M: int, N: int, K: int) -> None:
        """y[M, N] = x[M, K] @ w[N, K]^T (row-major), fp32 accumulation, output rounded to the dtype."""
        if M == 0:
            return
        self.dev.gemm(self.dtype, x, ldx, w, y, ldy, M, N, K)

    def _gemv(self, w: Any, x: Any, ldx: int, y: Any, ldy: int, R: int, Cc: int, M: int, act: bool) -> None:
        kern = self._k("gemv")
        for s, n in row_chunks(M):
            xs, ys = self.dev.advance(x, s * ldx, self.isz), self.dev.advance(y, s * ldy, self.isz)
            vec = vec_ok(Cc, self.isz, self.dev.addr(w), Cc, self.dev.addr(xs), ldx)
            self._run(kern, launch_gemv(R), w, xs, ldx, ys, ldy, R, Cc, n, int(act), int(vec))

    def _gemv_nvfp4(self, pk: cq.Packed, x: Any, ldx: int, y: Any, ldy: int, M: int, act: bool) -> None:
        kern, q, s = self._k("gemv_nvfp4"), self._ptr(pk.codes), self._ptr(pk.scales)
        for st, n in row_chunks(M):
            xs, ys = self.dev.advance(x, st * ldx, self.isz), self.dev.advance(y, st * ldy, self.isz)
            vec = self.dev.addr(q) % 8 == 0 and vec_ok(pk.cols, self.isz, self.dev.addr(xs), ldx)
            self._run(kern, launch_gemv(pk.rows), q, s, pk.gs, xs, ldx, ys, ldy, pk.rows, pk.cols, n, int(act),
                      int(vec))

    def _dequant(self, pk: cq.Packed, out: Any) -> Any:
        """NVFP4 linear `pk` dequantized into `out` (dense, row-major), as the GEMV's weights."""
        n16 = pk.rows * pk.cols // 16
        self._run(self._k("nvfp4_dequant"), launch_grid_stride(n16, "nvfp4_dequant"), self._ptr(pk.codes),
                  self._ptr(pk.scales), pk.gs, out, np.int64(n16))
        return self._ptr(out)

    def _act_quant(self, aq: cq.ActQuant, x: Any, ldx: int, xdiv: int, idx: Any, out: Any, ldo: int, rows: int,
                   C: int) -> None:
        """out[i] = the input quantizer of `aq` on row x[i // xdiv], with scale [idx[i]] (idx None: the only
        one); out may be x (in place)."""
        self._run(self._k(aq.kernel), _l((rows,), (256,), aq.kernel), x, ldx, xdiv, idx, aq.scale, out, ldo, C)

    def _kv_quant(self, layer: int, k: Any, v: Any, rows: int, C: int) -> None:
        """An FP8 KV cache: the new K and V rows [rows, C] quantized in place before they are appended."""
        for aq, buf in zip(self.kvq.get(layer, ()), (k, v)):
            self._act_quant(aq, buf, C, 1, None, buf, C, rows, C)

    def _has(self, weight: str) -> bool:
        return weight in self.p or weight in self.packed

    def _linear(self, name: str, x: Any, ldx: int, y: Any, ldy: int, M: int, act: bool = False,
                decode: bool = False) -> None:
        """A linear layer (no bias: check_graph refuses biases). Decode steps and up to 8 rows: the
        GEMV kernel (capturable, 8 rows per launch); more: cuBLAS, then the squared-ReLU epilogue.
        A quantized checkpoint's input quantizer runs first (into a scratch buffer; a decode step's is
        static); a packed NVFP4 weight goes to gemv_nvfp4, or is dequantized for cuBLAS."""
        wname = f"{name}.weight"
        pk, w = self.packed.get(wname), self.p.get(wname)
        R, Cc = (pk.rows, pk.cols) if pk is not None else self.p[wname].shape
        aq = self.aq.get(wname)
        if aq is not None:
            xq = self._aq_static if decode else self._empty((M * Cc,), self.dtype)
            self._act_quant(aq, x, ldx, 1, None, xq, Cc, M, Cc)
            x, ldx = self._ptr(xq), Cc
        if decode or M <= GEMV_MMAX:
            if pk is not None:
                self._gemv_nvfp4(pk, x, ldx, y, ldy, M, act)
            else:
                self._gemv(self._ptr(w), x, ldx, y, ldy, R, Cc, M, act)
            return
        self._gemm(x, ldx, self._dequant(pk, self._wdense) if pk is not None else self._ptr(w), y, ldy, M, R, Cc)
        if act:
            if ldy != R:
                raise NemohError(f"{name}: the squared-ReLU epilogue needs a dense output")
            self._run(self._k("relu2"), launch_grid_stride(M * R, "relu2"), y, np.int64(M * R))

    # -- state --------------------------------------------------------------------------------
    def new_state(self, batch: int) -> CupyState:
        return self._alloc_state(batch, self.max_len)

    def _alloc_state(self, batch: int, max_len: int) -> CupyState:
        st = CupyState(batch=batch, max_len=max_len)
        names = {s.name: (l.index, s.kind) for l in self.graph.layers for s in l.states}
        with self.dev.scope():
            for name, (shape, dt) in state_buffers(self.graph, batch, max_len).items():
                buf = self._zeros(shape, dt)
                if name == "kmask":
                    st.kmask = buf
                elif name == "ctrl":
                    st.ctrl = buf
                else:
                    i, kind = names[name]
                    getattr(st, kind)[i] = buf
        self.dev.synchronize()
        return st

    def copy_state(self, state: CupyState) -> CupyState:
        st = CupyState(batch=state.batch, max_len=state.max_len, length=state.length)
        with self.dev.scope():
            for kind in ("conv", "ssm", "k", "v"):
                getattr(st, kind).update({i: a.copy() for i, a in getattr(state, kind).items()})
            st.kmask, st.ctrl = state.kmask.copy(), state.ctrl.copy()
        self.dev.synchronize()
        return st

    def export_state(self, state: CupyState) -> dict[str, torch.Tensor]:
        S, dt = state.length, self.dtype
        out = {"mask": self._download(state.kmask[:, :S], "int32").to(torch.int64)}
        for i, a in state.conv.items():
            out[f"layers.{i}.conv"] = self._download(a, dt)
        for i, a in state.ssm.items():
            out[f"layers.{i}.ssm"] = self._download(a, "float32")
        for kind in ("k", "v"):
            for i, a in getattr(state, kind).items():
                out[f"layers.{i}.{kind}"] = self._download(a[:, :S], dt)
        return out

    def import_state(self, tensors: dict[str, torch.Tensor]) -> CupyState:
        mask = tensors["mask"]
        B, S = mask.shape
        st = self._alloc_state(B, max(self.max_len, S))
        st.length = S
        with self.dev.scope():
            st.kmask[:, :S] = self.dev.upload(mask.to(torch.int32).numpy())
            for name, t in tensors.items():
                if name == "mask":
                    continue
                _, i, kind = name.split(".")
                dst = getattr(st, kind)[int(i)]
                src = self._upload(t.to(dtypes.torch_dtype("float32" if kind == "ssm" else self.dtype)))
                if kind in ("k", "v"):
                    dst[:, :S] = src
                else:
                    dst[...] = src
        self.dev.synchronize()
        return st

    def _ensure_capacity(self, st: CupyState, need: int) -> None:
        if need <= st.max_len:
            return
        new = grow_len(st.max_len, need)
        S = st.length
        for kind in ("k", "v"):
            d = getattr(st, kind)
            for i, a in d.items():
                b = self._zeros((a.shape[0], new, *a.shape[2:]), self.dtype)
                b[:, :S] = a[:, :S]
                d[i] = b
        km = self._zeros((st.batch, new), "int32")
        km[:, :S] = st.kmask[:, :S]
        st.kmask, st.max_len = km, new
        st.epoch += 1
        st.graph.invalidate(f"KV cache grown to {new} tokens")

    # -- compute ------------------------------------------------------------------------------
    def forward(self, state: CupyState, ids: torch.Tensor, mask: torch.Tensor | None = None, *,
                last_only: bool = False, trace: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        B, T = ids.shape
        if B != state.batch:
            raise NemohError(f"cupy backend: ids have batch {B}, the state holds {state.batch} sequences")
        m = np.ones((B, T), np.int32) if mask is None else np.ascontiguousarray(mask.to(torch.int32).numpy())
        rec = _Trace(self, trace, B, T) if trace is not None else None
        ids = ids.contiguous()
        with self.dev.scope():
            self._ensure_capacity(state, state.length + T)
            if T == 1:
                logits = self._decode(state, ids, m, rec)
            else:
                logits = self._prefill(state, ids, m, last_only, rec)
            # kv_append records the mask for attention; models without attention need it for export
            state.kmask[:, state.length:state.length + T] = self.dev.upload(m)
            self.dev.synchronize()
        state.length += T
        V = self.graph.config.vocab_size
        return logits.reshape(B, -1, V).to(torch.float32)

    # prefill ----------------------------------------------------------------------------------
    def _prefill(self, st: CupyState, ids: torch.Tensor, m: np.ndarray, last_only: bool, rec):
        g, c = self.graph, self.graph.config
        B, T = ids.shape
        M, D = B * T, c.hidden_size
        ids_d = self.dev.upload(ids.to(torch.int32).numpy())
        mask_d = self.dev.upload(m)
        st.ctrl[2 * B:2 * B + 1] = st.length  # cached length before these tokens
        len_p = self._ptr(st.ctrl, 2 * B)
        x, h = self._empty((M, D), self.dtype), self._empty((M, D), self.dtype)
        self._run(self._k("embedding"), _l((M,), (256,), "embedding"), ids_d, self.p["embeddings.weight"], x, D,
                  c.vocab_size)
        if rec:
            rec("embeddings", x)
        delta = None
        for layer in g.layers:
            i = layer.index
            norm = layer.ops[0]
            self._run(self._k("add_rmsnorm"), launch_rows(M, D), x, delta, self.p[f"layers.{i}.norm.weight"], h,
                      mask_d if layer.kind == "mamba" else None, D, float(norm.a["eps"]))
            if rec and i > 0:
                rec(f"layers.{i - 1}", x)
            if rec:
                rec(norm.name, h)
            if layer.kind == "mamba":
                delta = self._mamba_prefill(layer, h, st, mask_d, B, T, rec)
            elif layer.kind == "attention":
                delta = self._attention_prefill(layer, h, st, mask_d, len_p, B, T, rec)
            elif layer.kind == "mlp":
                delta = self._mlp(f"layers.{i}.mixer.", h, M, rec)
            else:
                delta = self._moe(layer, h, M, rec, None)
        self._run(self._k("add_rmsnorm"), launch_rows(M, D), x, delta, self.p["norm_f.weight"], h, None, D,
                  float(g.head.ops[0].a["eps"]))
        if rec:
            rec(f"layers.{g.layers[-1].index}", x)
            rec("norm_f", h)
        if last_only:
            h = self.dev.contiguous(h.reshape(B, T, D)[:, -1])
        rows = h.shape[0]
        logits = self._empty((rows, c.vocab_size), self.dtype)
        self._linear("lm_head", self._ptr(h), D, self._ptr(logits), c.vocab_size, rows)
        out = self._download(logits, self.dtype)
        if rec:
            rec.put("lm_head", out.view(B, -1, c.vocab_size))
        return out

    def _mamba_prefill(self, layer: Layer, h, st: CupyState, mask_d, B: int, T: int, rec):
        c, i, pre = self.graph.config, layer.index, f"layers.{layer.index}.mixer."
        a = next(o for o in layer.ops if o.kind == "ssd_scan").a
        H, P, G, N, chunk = a["heads"], a["head_dim"], a["groups"], a["state_size"], a["chunk_size"]
        K = c.conv_kernel
        M, D, C, di, ind = B * T, c.hidden_size, c.conv_dim, c.d_inner, c.in_proj_dim
        zx = self._empty((M, ind), self.dtype)
        self._linear(pre + "in_proj", self._ptr(h), D, self._ptr(zx), ind, M)
        if rec:
            rec(pre + "in_proj", zx)
        xbc = self._empty((M, C), self.dtype)
        w, bias = self.p[pre + "conv1d.weight"], self.p.get(pre + "conv1d.bias")
        self._run(self._k("conv1d_prefill"), launch_conv_prefill(B, T, C), self._ptr(zx, di), ind, w, bias,
                  st.conv[i], mask_d, xbc, T, C, K, CONV_TT)
        self._run(self._k("conv1d_state_update"), launch_flat(B * C, 256, "conv1d_state_update"),
                  self._ptr(zx, di), ind, st.conv[i], mask_d, B, T, C, K)
        if rec:
            rec(pre + "conv1d", xbc)
        nc = cdiv(T, chunk)
        L = ssd_launches(B, T, H, P, N, chunk)
        dtd, cum = self._empty((B, H, T), "float32"), self._empty((B, H, T), "float64")
        lo = float(a["dt_min"])
        hi = float(a["dt_max"]) if a["dt_max"] is not None else float("inf")
        self._run(self._k("ssd_dt_cumsum"), L["ssd_dt_cumsum"], self._ptr(zx, di + C), ind, self.p[pre + "dt_bias"],
                  self.A[i], dtd, cum, B, T, H, chunk, lo, hi)
        states = self._empty((B, nc, H, P, N), "float32")
        self._run(self._k("ssd_chunk_state"), L["ssd_chunk_state"], xbc, dtd, cum, states, T, H, P, G, N, chunk)
        self._run(self.kernels["ssd_state_passing"], L["ssd_state_passing"], states, st.ssm[i], cum, B, T, H, P * N,
                  chunk)
        y = self._empty((M, di), "float32")
        self._run(self._k("ssd_chunk_scan"), L["ssd_chunk_scan"], xbc, dtd, cum, states, self.p[pre + "D"], y, T, H,
                  P, G, N, chunk)
        if rec:
            rec(pre + "ssd", y, "float32")
        return self._mamba_tail(layer, zx, y, M, rec)

    def _mamba_tail(self, layer: Layer, zx, y, M: int, rec, yn=None, out=None):
        """Gated norm and out_proj; `yn`/`out` given = a decode step's static buffers."""
        c, pre = self.graph.config, f"layers.{layer.index}.mixer."
        decode = yn is not None
        gn = next(o for o in layer.ops if o.kind == "gated_rmsnorm").a
        di, ind, D = c.d_inner, c.in_proj_dim, c.hidden_size
        yn = yn if yn is not None else self._empty((M, di), self.dtype)
        self._run(self._k("gated_rmsnorm"), launch_gated_norm(M, c.n_groups), y, zx, ind, self.p[pre + "norm.weight"],
                  yn, di, gn["group_size"], float(gn["eps"]))
        if rec:
            rec(pre + "gated_norm", yn)
        out = out if out is not None else self._empty((M, D), self.dtype)
        self._linear(pre + "out_proj", self._ptr(yn), di, self._ptr(out), D, M, decode=decode)
        if rec:
            rec(pre + "out_proj", out)
        return out

    def _attention_prefill(self, layer: Layer, h, st: CupyState, mask_d, len_p: Any, B: int, T: int, rec):
        c, i, pre = self.graph.config, layer.index, f"layers.{layer.index}.mixer."
        a = next(o for o in layer.ops if o.kind == "attention").a
        Q, KV, Dh = a["heads"], a["kv_heads"], a["head_dim"]
        M, D = B * T, c.hidden_size
        q, kn, vn = (self._empty((M, n * Dh), self.dtype) for n in (Q, KV, KV))
        for name, buf, n in (("q_proj", q, Q), ("k_proj", kn, KV), ("v_proj", vn, KV)):
            self._linear(pre + name, self._ptr(h), D, self._ptr(buf), n * Dh, M)
        self._kv_quant(i, kn, vn, M, KV * Dh)
        self._run(self._k("kv_append"), _l((B * T,), (128,), "kv_append"), kn, vn, KV * Dh, st.k[i], st.v[i],
                  st.kmask, mask_d, len_p, T, st.max_len, KV * Dh)
        att = self._empty((M, Q * Dh), self.dtype)
        self._run(self._k("attn_prefill"), launch_attn_prefill(B, T, Q), q, Q * Dh, st.k[i], st.v[i], st.kmask,
                  len_p, att, T, Q, KV, Dh, st.max_len, float(a["scale"]))
        if rec:
            rec(pre + "attention", att)
        out = self._empty((M, D), self.dtype)
        self._linear(pre + "o_proj", self._ptr(att), Q * Dh, self._ptr(out), D, M)
        if rec:
            rec(pre + "o_proj", out)
        return out

    def _mlp(self, pre: str, h, M: int, rec, up=None, out=None):
        """Squared-ReLU MLP; `up`/`out` given = a decode step's static buffers."""
        c = self.graph.config
        D = c.hidden_size
        I = self.graph.param(pre + "up_proj.weight").shape[0]
        decode = up is not None
        up = up if up is not None else self._empty((M, I), self.dtype)
        self._linear(pre + "up_proj", self._ptr(h), D, self._ptr(up), I, M, act=True, decode=decode)
        if rec:
            rec(pre + "up_proj", up)
        out = out if out is not None else self._empty((M, D), self.dtype)
        self._linear(pre + "down_proj", self._ptr(up), I, self._ptr(out), D, M, decode=decode)
        if rec:
            rec(pre + "down_proj", out)
        return out

    def _moe(self, layer: Layer, h, M: int, rec, dec: dict | None):
        """MoE for M token rows. Up to 8 rows (and every decode step): gathered expert GEMVs on the
        device, no host sync. More rows: pairs sorted by expert on the host (stable, as the torch
        executor), one cuBLAS matmul pair per used expert, combined in slot order."""
        c, pre = self.graph.config, f"layers.{layer.index}.mixer."
        a = next(o for o in layer.ops if o.kind == "moe_router").a
        E, k, D = a["experts"], a["top_k"], c.hidden_size
        L, I = c.moe_input_size, c.moe_intermediate_size
        buf = (lambda name, shape, dt=self.dtype: dec[name]) if dec is not None else \
            (lambda name, shape, dt=self.dtype: self._empty(shape, dt))
        w_d, idx_d = buf("topk_w", (M, k), "float32"), buf("topk_idx", (M, k), "int32")
        self._run(self._k("moe_router"), _l((M,), (256,), "moe_router"), h, self.p[pre + "gate.weight"],
                  self.p[pre + "gate.e_score_correction_bias"], w_d, idx_d, D, E, k, a["n_group"], a["topk_group"],
                  int(a["norm_topk_prob"]), float(a["routed_scaling_factor"]))
        if rec:
            rec(pre + "router", w_d, "float32")
        xin = h
        if c.moe_latent_size is not None:
            xin = buf("lat", (M, L))
            self._linear(pre + "fc1_latent_proj", self._ptr(h), D, self._ptr(xin), L, M, decode=dec is not None)
        up, down = self.p[pre + "experts.up_proj"], self.p[pre + "experts.down_proj"]
        eup, edn = buf("eup", (M * k, I)), buf("edown", (M * k, L))
        routed = buf("routed", (M, L))
        aq_up, aq_dn = self.aq.get(pre + "experts.up_proj"), self.aq.get(pre + "experts.down_proj")
        if dec is not None or M <= GEMV_MMAX:
            xs, xdiv = xin, k
            if aq_up is not None:  # one quantized row per (token, expert) pair, with that expert's input scale
                xs, xdiv = self._aq_static if dec is not None else self._empty((M * k * L,), self.dtype), 1
                self._act_quant(aq_up, xin, L, k, idx_d, xs, L, M * k, L)
            vu = vec_ok(L, self.isz, self.dev.addr(self._ptr(up)), L, self.dev.addr(self._ptr(xs)), L)
            self._run(self._k("moe_gemv"), launch_gemv(I, M * k, "moe_gemv"), up, idx_d, xs, L, xdiv, eup, I, L, 1,
                      int(vu))
            if aq_dn is not None:
                self._act_quant(aq_dn, eup, I, 1, idx_d, eup, I, M * k, I)
            vd = vec_ok(I, self.isz, self.dev.addr(self._ptr(down)), I, self.dev.addr(self._ptr(eup)), I)
            self._run(self._k("moe_gemv"), launch_gemv(L, M * k, "moe_gemv"), down, idx_d, eup, I, 1, edn, L, I, 0,
                      int(vd))
            pos = None
        else:
            flat = self.dev.download(idx_d).reshape(-1)
            order = np.argsort(flat, kind="stable")
            counts = np.bincount(flat, minlength=E)
            pos_h = np.empty_like(order)
            pos_h[order] = np.arange(order.size)
            rows = self.dev.upload((order // k).astype(np.int32))
            pos = self.dev.upload(pos_h.astype(np.int32))
            xg = self._empty((M * k, L), self.dtype)
            self._run(self._k("gather_rows"), _l((M * k,), (256,), "gather_rows"), xin, rows, xg, L)
            eid = self.dev.upload(flat[order].astype(np.int32)) if aq_up is not None or aq_dn is not None else None
            if aq_up is not None:
                self._act_quant(aq_up, xg, L, 1, eid, xg, L, M * k, L)
            start = 0
            for e, n in enumerate(counts.tolist()):
                if n:
                    self._gemm(self._ptr(xg, start * L), L, self._ptr(up, e * I * L), self._ptr(eup, start * I), I,
                               n, I, L)
                start += n
            self._run(self._k("relu2"), launch_grid_stride(M * k * I, "relu2"), eup, np.int64(M * k * I))
            if aq_dn is not None:
                self._act_quant(aq_dn, eup, I, 1, eid, eup, I, M * k, I)
            start = 0
            for e, n in enumerate(counts.tolist()):
                if n:
                    self._gemm(self._ptr(eup, start * I), I, self._ptr(down, e * L * I), self._ptr(edn, start * L), L,
                               n, L, I)
                start += n
        self._run(self._k("moe_combine"), _l((M,), (256,), "moe_combine"), w_d, edn, pos, routed, L, k)
        if rec:
            rec(pre + "experts", routed)
        out = routed
        if c.moe_latent_size is not None:
            out = buf("routed_out", (M, D))
            self._linear(pre + "fc2_latent_proj", self._ptr(routed), L, self._ptr(out), D, M, decode=dec is not None)
        if self._has(pre + "shared_experts.up_proj.weight"):
            sh = self._mlp(pre + "shared_experts.", h, M, rec, up=dec["sup"] if dec else None,
                           out=dec["shared"] if dec else None)
            total = buf("out", (M, D))
            self._run(self._k("add"), launch_grid_stride(M * D, "add"), out, sh, total, np.int64(M * D))
            out = total
        if rec:
            rec(pre + "combine", out)
        return out

    # decode -----------------------------------------------------------------------------------
    def _decode_buffers(self, st: CupyState) -> None:
        c = self.graph.config
        splits = decode_splits(st.max_len, st.batch, c.num_key_value_heads, self.dev.n_sm)
        if st.dec is not None and st.splits == splits:
            return
        st.dec = {name: self._zeros(shape, dt) for name, (shape, dt) in
                  decode_buffers(self.graph, st.batch, splits, self._act_elems).items()}
        st.splits = splits
        st.epoch += 1

    @staticmethod
    def _dec(st: CupyState) -> dict[str, Any]:
        if st.dec is None:
            raise NemohError("cupy backend: a decode step before its buffers were made")
        return st.dec

    def _decode(self, st: CupyState, ids: torch.Tensor, m: np.ndarray, rec):
        B = st.batch
        self._decode_buffers(st)
        ctrl = np.concatenate([ids.reshape(-1).to(torch.int32).numpy(), m.reshape(-1), [st.length]]).astype(np.int32)
        self.dev.write(st.ctrl, ctrl)
        plan = st.graph.plan(st.epoch, enabled=self.cuda_graphs, trace=rec is not None)
        if plan in ("eager", "warmup"):
            self._decode_kernels(st, rec)
            if plan == "warmup":
                st.graph.warmed(st.epoch)
        else:
            if plan == "capture":
                self.dev.begin_capture()
                try:
                    self._decode_kernels(st, None)
                finally:
                    graph = self.dev.end_capture()
                st.graph.captured(st.epoch, graph)
            graph = st.graph.graph
            self.dev.replay(graph)
            st.graph.replayed()
        out = self._download(self._dec(st)["logits"], self.dtype)
        if rec:
            rec.put("lm_head", out.view(B, 1, -1))
        return out

    def _decode_kernels(self, st: CupyState, rec) -> None:
        """One token for each of the B rows, from st.ctrl (ids | mask | cached length) into
        st.dec["logits"]; only static buffers, so the same launches can be captured as a graph."""
        g, c, d = self.graph, self.graph.config, self._dec(st)
        B, D = st.batch, c.hidden_size
        self._aq_static = d.get("aq")  # where a quantized checkpoint's linear inputs go: static, capturable
        ids_p, mask_p, len_p = self._ptr(st.ctrl), self._ptr(st.ctrl, B), self._ptr(st.ctrl, 2 * B)
        x, h = d["x"], d["h"]
        self._run(self._k("embedding"), _l((B,), (256,), "embedding"), ids_p, self.p["embeddings.weight"], x, D,
                  c.vocab_size)
        if rec:
            rec("embeddings", x)
        delta = None
        for layer in g.layers:
            i, pre = layer.index, f"layers.{layer.index}.mixer."
            norm = layer.ops[0]
            self._run(self._k("add_rmsnorm"), launch_rows(B, D), x, delta, self.p[f"layers.{i}.norm.weight"], h,
                      mask_p if layer.kind == "mamba" else None, D, float(norm.a["eps"]))
            if rec and i > 0:
                rec(f"layers.{i - 1}", x)
            if rec:
                rec(norm.name, h)
            if layer.kind == "mamba":
                a = next(o for o in layer.ops if o.kind == "ssd_scan").a
                H, P, G, N = a["heads"], a["head_dim"], a["groups"], a["state_size"]
                C, di, ind = c.conv_dim, c.d_inner, c.in_proj_dim
                zx, xbc = d["zxbcdt"], d["xbc"]
                self._linear(pre + "in_proj", self._ptr(h), D, self._ptr(zx), ind, B, decode=True)
                if rec:
                    rec(pre + "in_proj", zx)
                self._run(self._k("conv1d_step"), launch_flat(B * C, 256, "conv1d_step"), self._ptr(zx, di), ind,
                          self.p[pre + "conv1d.weight"], self.p.get(pre + "conv1d.bias"), st.conv[i], mask_p, xbc,
                          B, C, c.conv_kernel)
                if rec:
                    rec(pre + "conv1d", xbc)
                lo = float(a["dt_min"])
                hi = float(a["dt_max"]) if a["dt_max"] is not None else float("inf")
                self._run(self._k("ssd_step"), _l((H, B), (128,), "ssd_step"), xbc, C, self._ptr(zx, di + C), ind,
                          self.p[pre + "dt_bias"], self.A[i], self.p[pre + "D"], st.ssm[i], d["y"], H, P, G, N, lo, hi)
                if rec:
                    rec(pre + "ssd", d["y"], "float32")
                delta = self._mamba_tail(layer, zx, d["y"], B, rec, yn=d["yn"], out=d["out"])
            elif layer.kind == "attention":
                a = next(o for o in layer.ops if o.kind == "attention").a
                Q, KV, Dh = a["heads"], a["kv_heads"], a["head_dim"]
                for name, buf, n in (("q_proj", "q", Q), ("k_proj", "k", KV), ("v_proj", "v", KV)):
                    self._linear(pre + name, self._ptr(h), D, self._ptr(d[buf]), n * Dh, B, decode=True)
                self._kv_quant(i, d["k"], d["v"], B, KV * Dh)
                self._run(self._k("kv_append"), _l((B,), (128,), "kv_append"), d["k"], d["v"], KV * Dh, st.k[i],
                          st.v[i], st.kmask, mask_p, len_p, 1, st.max_len, KV * Dh)
                self._run(self._k("attn_decode_split"), _l((st.splits, KV, B), (128,), "attn_decode_split"), d["q"],
                          st.k[i], st.v[i], st.kmask, len_p, d["part"], Q, KV, Dh, st.max_len, st.splits,
                          float(a["scale"]))
                self._run(self._k("attn_decode_combine"), _l((Q, B), (cdiv(Dh, 32) * 32,), "attn_decode_combine"),
                          d["part"], d["att"], Q, Dh, st.splits)
                if rec:
                    rec(pre + "attention", d["att"])
                self._linear(pre + "o_proj", self._ptr(d["att"]), Q * Dh, self._ptr(d["out"]), D, B, decode=True)
                if rec:
                    rec(pre + "o_proj", d["out"])
                delta = d["out"]
            elif layer.kind == "mlp":
                delta = self._mlp(pre, h, B, rec, up=d["up"], out=d["out"])
            else:
                delta = self._moe(layer, h, B, rec, d)
        self._run(self._k("add_rmsnorm"), launch_rows(B, D), x, delta, self.p["norm_f.weight"], h, None, D,
                  float(g.head.ops[0].a["eps"]))
        if rec:
            rec(f"layers.{g.layers[-1].index}", x)
            rec("norm_f", h)
        self._linear("lm_head", self._ptr(h), D, self._ptr(d["logits"]), c.vocab_size, B, decode=True)


class CupyEmulatedBackend(CupyBackend):
    """The CuPy backend, host code and kernels unchanged, on the CPU: its device is the CUDA
    emulator (EmulatedDevice; backends/cuda_emu.py), so the whole executor runs and is checked
    without a GPU. Slow (every launch runs twice and is compared): for tests, tiny models.

    Options as CupyBackend (no compiler choice: g++ builds the kernels), plus `schedules`
    (NEMOH_EMU_SCHEDULES, default 2; 1 skips the race check). The KV cache starts at 256 tokens
    (NEMOH_CUPY_MAX_LEN) so that growth is exercised early."""

    name = "cupy-emulated"

    def __init__(self, max_len: int | None = None, cuda_graphs: bool | None = None, schedules: int | None = None):
        if max_len is None:
            max_len = int(os.environ.get("NEMOH_CUPY_MAX_LEN", 256))
        super().__init__(max_len=max_len, cuda_graphs=cuda_graphs)
        self.schedules = int(schedules if schedules is not None else os.environ.get("NEMOH_EMU_SCHEDULES", 2))
        if self.schedules not in (1, 2):
            raise NemohError(f"cupy-emulated backend: schedules must be 1 or 2, got {self.schedules}")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "timings": f"of the CPU emulator ({self.schedules} schedule(s) per launch), "
                                                 "not of a GPU: never a speed claim"}

    def available(self) -> Support:
        import shutil

        from . import cuda_emu

        if shutil.which(cuda_emu.CXX) is None:
            return Support.no(f"the CUDA emulator needs a C++17 compiler: {cuda_emu.CXX} not found "
                              "(apt-get install g++, or set NEMOH_EMU_CXX)")
        return Support.yes()

    def _make_device(self, device: str | None) -> Device:
        if device not in (None, "cpu"):
            raise NemohError(f"cupy-emulated backend runs on the CPU, got device {device!r}")
        return EmulatedDevice(self.schedules)


# ----------------------------------------------------------------------------------------------
# Roofline of one decode step (predicted, from the IR's shapes; see cupy_kernels/NOTES.md)
# ----------------------------------------------------------------------------------------------

#: linear op (its name's last part, and the layer kind where it matters) -> the GEMV launch that runs it
_GEMV = {"in_proj": "gemv (in_proj)", "out_proj": "gemv (out_proj)", "q_proj": "gemv (q,k,v)", "k_proj": "gemv (q,k,v)",
         "v_proj": "gemv (q,k,v)", "o_proj": "gemv (o_proj)", "fc1_latent_proj": "gemv (latent)",
         "fc2_latent_proj": "gemv (latent)", "lm_head": "gemv (lm_head)"}


def decode_roofline(graph: Graph, batch: int = 1, context: int = 1) -> dict[str, tuple[int, int, int]]:
    """kernel -> (bytes moved, FLOPs, launches) for one decode step of `batch` rows after `context`
    cached tokens: each input read once, each output written once (the floor, not a measurement).

    Parameters read, carried state read and written, and FLOPs are nemoh's one cost model
    (nemoh.bench.cost.op_costs, the same figures nemoh-bench divides by its timings). What this
    backend adds is its own: which launch runs which ops (q, k and v in one GEMV; the residual add
    fused into the next RMSNorm; relu2 into its GEMV) and the activations each launch reads and writes.
    """
    c, B, S = graph.config, batch, context
    e = dtypes.ITEMSIZE[graph.dtype]
    D = c.hidden_size
    rows: dict[str, list[int]] = {}

    def add(kernel: str, nbytes: int, flops: int = 0, launches: int = 1) -> None:
        r = rows.setdefault(kernel, [0, 0, 0])
        r[0] += nbytes
        r[1] += flops
        r[2] += launches

    for oc in op_costs(graph, B, 1, S):
        op, k = oc.op, oc.op.kind
        part = op.name.removeprefix(f"layers.{oc.layer.index}.mixer.")
        base = oc.param_bytes + oc.state_read_bytes + oc.state_write_bytes
        if k == "embedding":
            add("embedding", base + B * D * e + B * 4, oc.flops)  # the rows out, the ids in
        elif k == "rmsnorm":
            add("add_rmsnorm", base + 4 * B * D * e, oc.flops)  # x, delta in; x, h out
        elif k == "linear":
            n_in, n_out = op.a["in_features"], op.a["out_features"]
            shared_input = part in ("k_proj", "v_proj")  # one launch reads h once for q, k and v
            if part.startswith("shared_experts."):
                kernel = "gemv (shared)"
            elif oc.layer.kind == "mlp":
                kernel = "gemv (up, relu2)" if part == "up_proj" else "gemv (down)"
            else:
                kernel = _GEMV[part.rsplit(".", 1)[-1]]
            add(kernel, base + B * ((0 if shared_input else n_in) + n_out) * e, oc.flops, 0 if shared_input else 1)
        elif k == "causal_conv1d":
            add("conv1d_step", base + 2 * B * op.a["channels"] * e, oc.flops)  # xBC in, out
        elif k == "ssd_scan":
            H, di, gn = c.mamba_num_heads, c.d_inner, c.n_groups * c.ssm_state_size
            add("ssd_step", base + B * (di + 2 * gn + H) * e + B * di * 4, oc.flops)  # x, B, C, dt in; y fp32 out
        elif k == "gated_rmsnorm":
            add("gated_rmsnorm", base + B * c.d_inner * (4 + 2 * e))  # y fp32, z in; out
        elif k == "attention":
            Q, KV, Dh = op.a["heads"], op.a["kv_heads"], op.a["head_dim"]
            add("kv_append", oc.state_write_bytes + 2 * B * KV * Dh * e)  # the new k, v: read, appended
            # S cached keys and values (the state read), the appended one again, the key mask, q in, out
            add("attn_decode", oc.state_read_bytes + 2 * B * KV * Dh * e + B * (S + 1) * 4 + 2 * B * Q * Dh * e,
                oc.flops)
        elif k == "moe_router":
            add("moe_router", base + B * D * e + 8 * B * c.num_experts_per_tok, oc.flops)  # h in; (w, idx) out
        elif k == "moe_experts":
            kk, L, I = c.num_experts_per_tok, c.moe_input_size, c.moe_intermediate_size
            add("moe_gemv", base + 2 * B * kk * (I + L) * e, oc.flops)
            add("moe_combine", B * kk * (L * e + 4) + B * L * e, 2 * B * kk * L)  # the weighted sum
        # split, relu2 and add are fused into the launches above: no memory traffic of their own
    return {k: (v[0], v[1], v[2]) for k, v in rows.items()}


def _roofline_main(argv: list[str]) -> int:
    import argparse

    from nemoh.model.config import load_config
    from nemoh.model.ir import build_graph

    ap = argparse.ArgumentParser(prog="python -m nemoh.backends.cupy_backend",
                                 description="Predicted decode-step roofline from a config.json")
    ap.add_argument("config")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=1, help="cached tokens before the step (default 1)")
    ap.add_argument("--bandwidth", type=float, default=3.35e12, help="bytes/s (H100 SXM HBM3 datasheet)")
    a = ap.parse_args(argv)
    g = build_graph(load_config(a.config), a.dtype)
    rows = decode_roofline(g, a.batch, a.context)
    tb = sum(r[0] for r in rows.values())
    print(f"| kernel | launches | bytes | FLOPs | floor at {a.bandwidth / 1e12:.2f} TB/s |")
    print("|---|---:|---:|---:|---:|")
    for k, (nb, fl, n) in sorted(rows.items(), key=lambda kv: -kv[1][0]):
        print(f"| {k} | {n} | {nb / 1e6:,.2f} MB | {fl / 1e9:,.3f} GFLOP | {nb / a.bandwidth * 1e6:,.1f} us |")
    print(f"| **total** | {sum(r[2] for r in rows.values())} | {tb / 1e9:,.3f} GB | "
          f"{sum(r[1] for r in rows.values()) / 1e9:,.2f} GFLOP | {tb / a.bandwidth * 1e3:,.3f} ms |")
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(_roofline_main(sys.argv[1:]))

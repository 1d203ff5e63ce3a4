"""The CuPy side of the cupy backend's device seam: every call the backend makes into CuPy is in this file.

The backend (backends/cupy_backend.py) does every device action (buffers, copies, views at an offset,
launches, GEMMs, synchronisation, graph capture and replay) through a device object: `CupyDevice` here on
a GPU, or `EmulatedDevice` (cupy_backend.py) on the CPU emulator. This file is the one a reader, the type
checker and the CuPy stand-in (tests/standin/, the same API run on the CPU emulator) face: each line here
runs in the default test run against the stand-in, and on a GPU against CuPy itself
(tests/backends/test_cupy_gpu.py, the judge of whether the stand-in's assumptions about CuPy hold).

The CuPy API used, and what the backend assumes of it (the stand-in checks each assumption):
  cupy.cuda.Device(id).use() / .compute_capability / .id, cupy.cuda.runtime.getDeviceProperties
  cupy.cuda.Stream(non_blocking=True): every launch, copy and fill goes to this one stream (`with stream:`
      makes it current); it does not synchronise with the legacy default stream, so nothing may go there
  Stream.begin_capture() / end_capture() -> Graph, Graph.launch(stream): decode steps; no allocation, host
      copy or synchronisation inside a capture
  cupy.RawModule(path=cubin | code=source, options=, backend="nvrtc").get_function(name) -> RawKernel,
      called as kernel(grid, block, args, shared_mem=): scalars must be numpy scalars of the parameter's exact
      type (a Python int would be passed as 64 bits, a float as a double), pointers as numpy.uint64
  cupy.empty / asarray / ascontiguousarray, ndarray.fill / get(stream=) / set(h, stream=) / copy / slicing
  cupy_backends.cuda.libs.cublas.gemmEx on raw pointers (column-major), on the handle's stream: the handle
      CuPy hands out is shared and keeps whatever stream it was last given, so every GEMM sets it first
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from nemoh.errors import NemohError

from . import cupy_compile as cc

# cuBLAS / CUDA enums (cublas_api.h, library_types.h)
CUDA_R_32F, CUDA_R_16BF = 0, 14
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUBLAS_COMPUTE_32F = 68
CUBLAS_GEMM_DEFAULT = -1

#: storage dtype of each buffer dtype (bf16 lives as raw uint16 bits: neither CuPy nor numpy has it)
NP_DTYPES: dict[str, type[np.generic]] = {"float32": np.float32, "bfloat16": np.uint16, "int32": np.int32,
                                          "float64": np.float64}


class Ptr(int):
    """A raw device address passed to a kernel as a 64-bit value."""


class LaunchShape(Protocol):
    """A kernel launch's shape (cupy_backend.Launch)."""

    @property
    def grid(self) -> tuple[int, int, int]: ...

    @property
    def block(self) -> tuple[int, int, int]: ...

    @property
    def shared_mem(self) -> int: ...


class Device(Protocol):
    """The seam: what the backend asks of a device (CupyDevice here, EmulatedDevice in cupy_backend.py).
    Buffers and pointers are the device's own types (cupy arrays and Ptr; numpy arrays and flat views)."""

    kind: str
    n_sm: int
    route: str
    kernels: dict[str, Any]

    def scope(self) -> Any: ...
    def synchronize(self) -> None: ...
    def empty(self, shape: Any, dtype: str) -> Any: ...
    def zeros(self, shape: Any, dtype: str) -> Any: ...
    def upload(self, h: np.ndarray) -> Any: ...
    def download(self, a: Any) -> np.ndarray: ...
    def write(self, a: Any, h: np.ndarray) -> None: ...
    def contiguous(self, a: Any) -> Any: ...
    def ptr(self, a: Any, elem_offset: int = 0) -> Any: ...
    def advance(self, p: Any, elems: int, itemsize: int) -> Any: ...
    def addr(self, p: Any) -> int: ...
    def launch(self, kern: Any, launch: LaunchShape, args: Any) -> None: ...
    def gemm(self, dtype: str, x: Any, ldx: int, w: Any, y: Any, ldy: int, M: int, N: int, K: int) -> None: ...
    def begin_capture(self) -> None: ...
    def end_capture(self) -> Any: ...
    def replay(self, graph: Any) -> None: ...
    def describe(self) -> dict[str, Any]: ...


def launch_arg(v: Any) -> np.generic:
    """A kernel argument as CuPy's RawKernel takes it: ints as int32, floats as float32, buffers by address
    (numpy scalars pass through as they are: np.int64 for `i64` parameters)."""
    if v is None:
        return np.uint64(0)
    if isinstance(v, Ptr):
        return np.uint64(int(v))
    if isinstance(v, np.generic):
        return v
    if isinstance(v, bool):
        return np.int32(int(v))
    if isinstance(v, int):
        return np.int32(v)
    if isinstance(v, float):
        return np.float32(v)
    return np.uint64(v.data.ptr)  # a cupy array


def kernel_cache() -> Path:
    return Path(os.environ.get("NEMOH_CACHE", Path.home() / ".cache" / "nemoh")) / "cupy-kernels"


class CupyDevice:
    """A GPU through CuPy: cupy arrays, one non-blocking stream, the kernels as NVRTC cubins loaded
    by RawModule (or CuPy's own NVRTC), prefill GEMMs on cuBLAS, decode steps as CUDA graphs.

    Buffers are cupy arrays; `ptr` is a raw address (Ptr) that kernels and cuBLAS take."""

    kind = "cuda"

    def __init__(self, device: str | None, compiler: str | None):
        import cupy as cp

        self.cp = cp
        dev_id = 0
        if device:
            if not device.startswith("cuda"):
                raise NemohError(f"cupy backend runs on CUDA devices only, got device {device!r}")
            try:
                dev_id = int(device.split(":")[1]) if ":" in device else 0
            except ValueError:
                raise NemohError(f"cupy backend: device {device!r} is not cuda or cuda:N") from None
        cp.cuda.Device(dev_id).use()
        self.id = dev_id
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.n_sm = int(cp.cuda.runtime.getDeviceProperties(dev_id)["multiProcessorCount"])
        self._one = np.ones(1, np.float32)
        self._zero = np.zeros(1, np.float32)
        self.kernels, self.route = self._load_kernels(cp.cuda.Device(dev_id).compute_capability, compiler)

    def _load_kernels(self, cap: str, route: str | None) -> tuple[dict[str, Any], str]:
        cp = self.cp
        if route is None:
            route = "nemoh" if cc.toolchain_candidates() else "cupy"
        modules = {}
        if route == "nemoh":
            tc = cc.find_toolchain()
            cubins = cc.compile_all(f"sm_{cap}", tc)
            cache = kernel_cache()
            cache.mkdir(parents=True, exist_ok=True)
            for file, code in cubins.items():
                path = cache / f"{Path(file).stem}-sm_{cap}-{hashlib.sha256(code).hexdigest()[:16]}.cubin"
                if not path.is_file():
                    with tempfile.NamedTemporaryFile(dir=cache, delete=False) as f:
                        f.write(code)
                    os.replace(f.name, path)
                modules[file] = cp.RawModule(path=str(path))
            desc = f"nemoh (NVRTC {'.'.join(map(str, tc.version))}, {tc.origin}, sm_{cap} cubin)"
        else:
            cands = cc.toolchain_candidates()
            includes = [cands[0].include] if cands else []
            if not includes:
                cuda_path = cp.cuda.get_cuda_path()
                if cuda_path and (Path(cuda_path) / "include" / "cuda_bf16.h").is_file():
                    includes = [str(Path(cuda_path) / "include")]
            opts = tuple(cc.nvrtc_options(None, includes))
            for file in cc.KERNELS:
                modules[file] = cp.RawModule(code=cc.source(file), options=opts, backend="nvrtc")
            desc = f"cupy (RawModule code, CuPy's NVRTC, includes {includes or 'CuPy defaults'})"
        kernels = {}
        for file, mod in modules.items():
            for entry in cc.entry_points(file):
                try:
                    k = mod.get_function(entry)
                    getattr(k, "kernel", None)  # RawKernel resolves its function lazily: do it now, not in a capture
                    kernels[entry] = k
                except Exception as e:
                    raise NemohError(f"cupy backend: kernel {entry} missing from {file} ({e})") from None
        return kernels, desc

    # buffers and copies
    def scope(self):
        """Context in which the backend's launches and copies go to the device's stream."""
        return self.stream

    def synchronize(self) -> None:
        self.stream.synchronize()

    def empty(self, shape, dtype: str):
        return self.cp.empty(shape, dtype=NP_DTYPES[dtype])

    def zeros(self, shape, dtype: str):
        a = self.empty(shape, dtype)
        with self.stream:  # the fill is a kernel: on the device's stream, as everything else
            a.fill(0)
        return a

    def upload(self, h: np.ndarray):
        with self.stream:
            return self.cp.asarray(h)

    def download(self, a) -> np.ndarray:
        h = a.get(stream=self.stream)
        self.stream.synchronize()
        return np.ascontiguousarray(h)

    def write(self, a, h: np.ndarray) -> None:
        """Copy host array `h` into device buffer `a` (same shape), asynchronously on the stream."""
        a.set(h, stream=self.stream)

    def contiguous(self, a):
        with self.stream:
            return self.cp.ascontiguousarray(a)

    # addresses
    def ptr(self, a, elem_offset: int = 0) -> Ptr:
        return Ptr(a.data.ptr + elem_offset * a.itemsize)

    def advance(self, p: Ptr, elems: int, itemsize: int) -> Ptr:
        return Ptr(int(p) + elems * itemsize)

    def addr(self, p) -> int:
        return int(p) if isinstance(p, int) else int(p.data.ptr)

    # work
    def launch(self, kern, launch: LaunchShape, args) -> None:
        """On the current stream: the backend's launches run inside scope() (a per-launch context would cost
        every decode step's eager launches)."""
        kern(launch.grid, launch.block, tuple(launch_arg(a) for a in args), shared_mem=launch.shared_mem)

    def gemm(self, dtype: str, x: Ptr, ldx: int, w: Ptr, y: Ptr, ldy: int, M: int, N: int, K: int) -> None:
        """y[M, N] = x[M, K] @ w[N, K]^T (row-major, leading dims ldx/K/ldy), fp32 accumulation."""
        from cupy_backends.cuda.libs import cublas

        t = CUDA_R_16BF if dtype == "bfloat16" else CUDA_R_32F
        handle = self.cp.cuda.device.get_cublas_handle()
        cublas.setStream(handle, self.stream.ptr)  # the shared handle keeps the last stream it was given
        # column-major view: y^T [N, M] = w [K, N]^T-as-stored (op T) times x^T [K, M]
        cublas.gemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, self._one.ctypes.data, int(w), t, K,
                      int(x), t, ldx, self._zero.ctypes.data, int(y), t, ldy, CUBLAS_COMPUTE_32F,
                      CUBLAS_GEMM_DEFAULT)

    def begin_capture(self) -> None:
        self.stream.begin_capture()

    def end_capture(self):
        return self.stream.end_capture()

    def replay(self, graph) -> None:
        graph.launch(self.stream)

    def describe(self) -> dict[str, Any]:
        cp = self.cp
        dev = cp.cuda.Device(self.id)
        props = cp.cuda.runtime.getDeviceProperties(dev.id)
        name = props["name"]
        return {"device": f"cuda:{dev.id}", "device_name": name.decode() if isinstance(name, bytes) else name,
                "compute_capability": dev.compute_capability, "cupy": cp.__version__,
                "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(), "cuda_driver": cp.cuda.runtime.driverGetVersion()}

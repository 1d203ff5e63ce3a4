"""The CuPy stand-in's device: memory, streams, graphs, kernels and cuBLAS on the CPU.

Only the part of CuPy that nemoh's cupy backend uses (backends/cupy_device.py), with CuPy's signatures,
each call doing on the CPU what it does on a GPU:

  memory     every allocation is host memory registered by address, filled with 0xFF bytes (garbage, as
             device memory is); a raw address (a kernel or cuBLAS pointer argument) is resolved back to its
             allocation, and one that lies in no live allocation is an error (a freed buffer, a bad offset)
  streams    work runs at once, in issue order, but each allocation remembers the stream of its last
             unsynchronised use: touching it from another stream without a synchronisation in between is
             an error (a race on a GPU). A non-blocking stream does not synchronise with the legacy stream
  capture    between begin_capture and end_capture, work issued to the capturing stream is recorded, not
             run; Graph.launch runs the recording. An allocation, a host transfer or a synchronisation
             during a capture is an error, and so is work issued to another stream while one captures
  kernels    RawModule(path=cubin) checks the file is an ELF cubin holding the entry point, RawModule(code=)
             that the source defines it; a kernel runs in the CUDA emulator (backends/cuda_emu.py: the same
             .cu source, every launch checked for races and out-of-bounds writes). Arguments must be what
             CuPy passes to a C parameter of that type: numpy scalars of the exact type (a Python int
             would go as 64 bits, a float as a double), pointers as numpy.uint64 or arrays
  cuBLAS     gemmEx on raw pointers, column-major, alpha/beta read from host pointers, on the handle's
             stream (the handle starts on the legacy stream, as CuPy's shared handle may be)

Why one file: memory, streams, capture, kernels and cuBLAS share one model of device state (the allocations
and the stream each last touched them from); split up, every part would reach into the others' globals.

These are nemoh's assumptions about CuPy and CUDA, written down and checked; only a real GPU can confirm
them (tests/backends/test_cupy_gpu.py on a GPU, and tests/backends/test_cupy_standin.py compares these
signatures with the real ones where cupy is importable).
"""

from __future__ import annotations

import ctypes
import os
import threading
import weakref
from typing import Any

import numpy as np

from nemoh.backends import cuda_emu
from nemoh.backends import cupy_compile as cc
from nemoh.backends.cupy_backend import _bf16_bits_to_f32, _f32_to_bf16_bits

__version__ = "14.2.0+nemoh-standin"
COMPUTE_CAPABILITY = "90"
N_SM = 132
RUNTIME_VERSION = DRIVER_VERSION = 13000


class CUDARuntimeError(RuntimeError):
    """As cupy_backends.cuda.api.runtime.CUDARuntimeError: a CUDA call failed."""


class StandinError(CUDARuntimeError):
    """A use of the device that is wrong on a GPU (a race, a capture violation, a bad pointer), found by
    the stand-in. On a GPU most of these give wrong numbers or a late, unrelated error instead."""


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------

class _Allocation:
    """One device allocation: `n` bytes at offset `off` of a host buffer (`owner`, held weakly: the memory is
    freed when the last array over it goes, as a cupy array's memory returns to the pool)."""

    __slots__ = ("owner", "off", "base", "nbytes", "pending")

    def __init__(self, owner: np.ndarray, off: int, n: int):
        self.owner = weakref.ref(owner)
        self.off, self.nbytes = off, n
        self.base = owner.__array_interface__["data"][0] + off
        self.pending: Stream | None = None  # the stream of its last use not yet synchronised with the host

    def bytes(self) -> np.ndarray | None:
        owner = self.owner()
        return None if owner is None else owner[self.off:self.off + self.nbytes]


_LOCK = threading.RLock()
_ALLOCS: dict[int, _Allocation] = {}


def _forget(base: int) -> None:
    with _LOCK:
        _ALLOCS.pop(base, None)


def _allocate(shape: Any, dtype: Any) -> np.ndarray:
    _no_capture("an allocation (cupy.empty / asarray / copy)", "its address would be baked into the graph while "
                "the memory pool may hand it out again")
    dt = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
    n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    owner = np.empty(max(n, 1) + 255, np.uint8)
    owner.fill(0xFF)  # garbage, as fresh device memory is
    off = (-owner.__array_interface__["data"][0]) % 256  # cudaMalloc's 256-byte alignment
    alloc = _Allocation(owner, off, max(n, 1))
    with _LOCK:
        _ALLOCS[alloc.base] = alloc
    weakref.finalize(owner, _forget, alloc.base)
    return owner[off:off + n].view(dt).reshape(shape)


def resolve(addr: int, what: str) -> tuple[_Allocation, np.ndarray]:
    """The live allocation holding byte `addr`, and its bytes (uint8) from `addr` to its end."""
    with _LOCK:
        for a in _ALLOCS.values():
            if a.base <= addr < a.base + a.nbytes:
                raw = a.bytes()
                if raw is None:
                    break
                return a, raw[addr - a.base:]
    raise StandinError(f"{what}: address {addr:#x} lies in no live device allocation (freed, or out of range)")


def _allocation_of(a: np.ndarray) -> list[_Allocation]:
    """The allocation under array `a` (none for an empty view: it touches no memory)."""
    return [resolve(a.__array_interface__["data"][0], "array")[0]] if a.size else []


# ----------------------------------------------------------------------------------------------
# Streams, capture, graphs
# ----------------------------------------------------------------------------------------------

_STREAMS: weakref.WeakSet = weakref.WeakSet()  # every stream, for "does any stream capture?"


class Stream:
    """cupy.cuda.Stream(null=False, non_blocking=False, ptds=False, priority=None)."""

    _next_ptr = 0x1000
    null: Stream  # the legacy default stream (ptr 0), set below

    def __init__(self, null: bool = False, non_blocking: bool = False, ptds: bool = False,
                 priority: int | None = None):
        if null:
            self.ptr = 0
        else:
            Stream._next_ptr += 0x10
            self.ptr = Stream._next_ptr
        self.non_blocking = bool(non_blocking)
        self._capture: list | None = None
        _STREAMS.add(self)

    def __enter__(self) -> Stream:
        _CURRENT.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _CURRENT.pop()

    def use(self) -> Stream:
        _CURRENT[0] = self
        return self

    def __repr__(self) -> str:
        return f"<Stream {self.ptr:#x} (standin{', non-blocking' if self.non_blocking else ''})>"

    def synchronize(self) -> None:
        if _capturing() is not None:
            raise StandinError(f"{self!r}.synchronize() while a stream captures a graph: "
                               "cudaErrorStreamCaptureUnsupported")
        with _LOCK:
            for a in _ALLOCS.values():
                if a.pending is self:
                    a.pending = None

    def is_capturing(self) -> bool:
        return self._capture is not None

    def begin_capture(self, mode: int | None = None) -> None:
        if self.ptr == 0:
            raise StandinError("begin_capture on the legacy default stream: cudaErrorStreamCaptureUnsupported")
        if _capturing() is not None:
            raise StandinError("begin_capture while a stream is already capturing")
        self._capture = []

    def end_capture(self) -> Graph:
        if self._capture is None:
            raise StandinError(f"end_capture on {self!r}, which is not capturing")
        ops, self._capture = self._capture, None
        return Graph(ops)


Stream.null = Stream(null=True)
_CURRENT: list[Stream] = [Stream.null]


def get_current_stream(device_id: int = -1) -> Stream:
    return _CURRENT[-1]


def _capturing() -> Stream | None:
    return next((s for s in list(_STREAMS) if s._capture is not None), None)


def _no_capture(what: str, why: str = "") -> None:
    s = _capturing()
    if s is not None:
        raise StandinError(f"{what} while {s!r} captures a graph{': ' + why if why else ''} "
                           "(cudaErrorStreamCaptureUnsupported)")


def _compatible(s: Stream, t: Stream) -> bool:
    """Are two streams ordered with respect to each other without an explicit synchronisation?"""
    if s is t:
        return True
    legacy = s.ptr == 0 or t.ptr == 0
    return legacy and not (s.non_blocking or t.non_blocking)  # blocking streams wait for the legacy stream


def _touch(stream: Stream, allocs: list[_Allocation], what: str) -> None:
    for a in allocs:
        if a.pending is not None and not _compatible(a.pending, stream):
            raise StandinError(f"{what} on {stream!r} uses a buffer last used on {a.pending!r} with no "
                               "synchronisation in between: a race on a GPU")
    for a in allocs:
        a.pending = stream


def _issue(stream: Stream, what: str, allocs: list[_Allocation], fn) -> None:
    """Device work `fn(stream)` touching `allocs` (kernels and GEMMs resolve theirs when they run): run now, or
    recorded if `stream` captures a graph."""

    def op(s: Stream) -> None:
        _touch(s, allocs, what)
        fn(s)

    cap = _capturing()
    if cap is not None:
        if cap is not stream:
            raise StandinError(f"{what} issued to {stream!r} while {cap!r} captures a graph: it would not be part "
                               "of the graph")
        assert stream._capture is not None
        stream._capture.append((what, op))
        return
    op(stream)


class Graph:
    """cupy.cuda.graph.Graph: the recorded work of a capture."""

    def __init__(self, ops: list):
        self._ops = ops

    def launch(self, stream: Stream | None = None) -> None:
        stream = stream or get_current_stream()
        _no_capture("Graph.launch")
        for _what, fn in self._ops:
            fn(stream)

    def upload(self, stream: Stream | None = None) -> None:
        pass


# ----------------------------------------------------------------------------------------------
# Arrays
# ----------------------------------------------------------------------------------------------

class MemoryPointer:
    def __init__(self, ptr: int):
        self.ptr = ptr


class ndarray:
    """cupy.ndarray over stand-in device memory: views, copies, fill, get/set; no arithmetic."""

    __array_priority__ = 100

    def __init__(self, a: np.ndarray):
        self._a = a

    # attributes
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    size = property(lambda self: self._a.size)
    ndim = property(lambda self: self._a.ndim)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)

    @property
    def data(self) -> MemoryPointer:
        return MemoryPointer(self._a.__array_interface__["data"][0])

    def __len__(self) -> int:
        return len(self._a)

    def __repr__(self) -> str:
        return f"<standin cupy.ndarray {self.shape} {self.dtype}>"

    def __array__(self, *a: Any, **k: Any):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a "
                        "NumPy array explicitly.")

    # views
    def __getitem__(self, key: Any) -> ndarray:
        if isinstance(key, ndarray) or (isinstance(key, tuple) and any(isinstance(k, ndarray) for k in key)):
            raise TypeError("standin: indexing with a device array is not part of what nemoh uses")
        return ndarray(self._a[key])

    def reshape(self, *shape: Any, order: str = "C") -> ndarray:
        out = self._a.reshape(*shape, order=order)
        if not np.shares_memory(out, self._a):  # CuPy copies too when it cannot view: on the current stream
            dst = _allocate(out.shape, out.dtype)
            src = self._a
            _issue(get_current_stream(), "reshape copy", _allocation_of(src) + _allocation_of(dst),
                   lambda s: np.copyto(dst, src.reshape(dst.shape, order=order)))
            return ndarray(dst)
        return ndarray(out)

    def view(self, dtype: Any) -> ndarray:
        return ndarray(self._a.view(dtype))

    # device work on the current stream
    def __setitem__(self, key: Any, value: Any) -> None:
        dst = self._a[key]
        if isinstance(value, ndarray):
            src = value._a
            _issue(get_current_stream(), "device copy (setitem)", _allocation_of(self._a) + _allocation_of(src),
                   lambda s: np.copyto(dst, src))
        elif isinstance(value, (int, float, np.generic)) and not isinstance(value, np.ndarray):
            _issue(get_current_stream(), "fill (setitem)", _allocation_of(self._a), lambda s: dst.fill(value))
        else:
            raise TypeError(f"standin: assigning a {type(value).__name__} into a device array; upload it first "
                            "(cupy.asarray) so that the copy's stream is explicit")

    def fill(self, value: Any) -> None:
        a = self._a
        _issue(get_current_stream(), "fill", _allocation_of(a), lambda s: a.fill(value))

    def copy(self, order: str = "C") -> ndarray:
        dst = _allocate(self.shape, self.dtype)
        src = self._a
        _issue(get_current_stream(), "copy", _allocation_of(src) + _allocation_of(dst),
               lambda s: np.copyto(dst, src))
        return ndarray(dst)

    # host transfers
    def get(self, stream: Stream | None = None, order: str = "C", out: np.ndarray | None = None,
            blocking: bool = True) -> np.ndarray:
        _no_capture("ndarray.get (a device-to-host copy)")
        s = stream or get_current_stream()
        _touch(s, _allocation_of(self._a), "ndarray.get")
        h = np.array(self._a, copy=True, order=order)
        if blocking:
            s.synchronize()
        if out is not None:
            out[...] = h
            return out
        return h

    def set(self, arr: np.ndarray, stream: Stream | None = None) -> None:
        _no_capture("ndarray.set (a host-to-device copy)")
        if not isinstance(arr, np.ndarray) or arr.shape != self.shape or arr.dtype != self.dtype:
            raise ValueError(f"standin: set() needs a numpy array of shape {self.shape} and dtype {self.dtype}, "
                             f"got {getattr(arr, 'shape', type(arr))} {getattr(arr, 'dtype', '')}")
        _touch(stream or get_current_stream(), _allocation_of(self._a), "ndarray.set")
        np.copyto(self._a, arr)


def empty(shape: Any, dtype: Any = float, order: str = "C") -> ndarray:
    return ndarray(_allocate(shape, dtype))


def zeros(shape: Any, dtype: Any = float, order: str = "C") -> ndarray:
    a = empty(shape, dtype)
    a.fill(0)
    return a


def asarray(a: Any, dtype: Any = None, order: str | None = None, copy: bool | None = None, *,
            blocking: bool = False) -> ndarray:
    if isinstance(a, ndarray) and dtype is None:
        return a
    _no_capture("cupy.asarray (a host-to-device copy)")
    h = np.asarray(a, dtype=dtype)
    out = _allocate(h.shape, h.dtype)
    _touch(get_current_stream(), _allocation_of(out), "cupy.asarray")
    np.copyto(out, h)
    return ndarray(out)


def ascontiguousarray(a: ndarray, dtype: Any = None) -> ndarray:
    if a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    return a.copy()


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

#: the numpy type of each C parameter type, from the emulator's own tables (cuda_emu._NP, _T, _SCALAR)
_SCALAR_TYPES = {t: cuda_emu._NP[t][0] for t in cuda_emu._SCALAR}
_T_DTYPES = {suffix: types[0] for suffix, (_, types) in cuda_emu._T.items()}
_P_DTYPES = {t: types[0] for t, types in cuda_emu._NP.items()}
MAX_THREADS, MAX_STATIC_SHARED = 1024, 48 * 1024
#: thread schedules per launch (NEMOH_EMU_SCHEDULES, default 1): the race check between two schedules runs in
#: the kernel tests and cupy-emulated; here the stand-in's own checks are the point
SCHEDULES = int(os.environ.get("NEMOH_EMU_SCHEDULES", "1"))


class RawKernel:
    """cupy.RawKernel (as RawModule.get_function returns it); runs in the CUDA emulator."""

    def __init__(self, code: str, name: str, options: tuple = (), backend: str = "nvrtc", *,
                 translate_cucomplex: bool = False, enable_cooperative_groups: bool = False, jitify: bool = False):
        self.code, self.name = code, name
        _, self._suffix, self._params = cuda_emu.entry_signature(name)

    @property
    def kernel(self) -> RawKernel:
        return self

    def __call__(self, grid: tuple, block: tuple, args: tuple, *, shared_mem: int = 0,
                 enable_cooperative_groups: bool = False) -> None:
        what = f"{self.name}<<<{grid}, {block}, {shared_mem}>>>"
        g, b = tuple(int(x) for x in grid), tuple(int(x) for x in block)
        if int(np.prod(b)) > MAX_THREADS:
            raise StandinError(f"{what}: more than {MAX_THREADS} threads per block: cudaErrorInvalidConfiguration")
        if shared_mem > MAX_STATIC_SHARED:
            raise StandinError(f"{what}: {shared_mem} bytes of dynamic shared memory need the kernel's "
                               "MaxDynamicSharedMemorySize attribute raised first")
        if len(args) != len(self._params):
            raise StandinError(f"{what}: {len(args)} arguments for {len(self._params)} parameters")
        raw: list[Any] = []
        for p, v in zip(self._params, args):
            if p.pointer:
                if isinstance(v, ndarray):
                    v = np.uint64(v.data.ptr)
                if not isinstance(v, np.uint64):
                    raise StandinError(f"{what}: pointer parameter {p.type} {p.name} got {type(v).__name__} "
                                       f"{v!r}; CuPy passes a pointer as a cupy array or numpy.uint64")
                raw.append((p, int(v)))
            else:
                want = _SCALAR_TYPES.get(p.base)
                if want is None or not isinstance(v, np.generic) or type(v) is not want:
                    raise StandinError(f"{what}: parameter {p.type} {p.name} got {type(v).__name__} {v!r}; CuPy "
                                       f"passes it by its own size, so it must be numpy.{np.dtype(want).name}")
                raw.append((p, v))
        name, suffix = self.name, self._suffix

        def run(stream: Stream) -> None:
            # resolved when it runs: a graph replayed after its buffers were freed fails here, by name
            resolved: list[Any] = []
            touched: list[_Allocation] = []
            for p, v in raw:
                if not p.pointer:
                    resolved.append(v)
                elif v == 0:
                    resolved.append(None)
                else:
                    alloc, rest = resolve(v, f"{what} argument {p.name}")
                    dt = _T_DTYPES[suffix] if p.base == "T" and suffix else _P_DTYPES.get(p.base, np.uint8)
                    n = rest.nbytes // np.dtype(dt).itemsize
                    if v % np.dtype(dt).itemsize:
                        raise StandinError(f"{what}: argument {p.name} at {v:#x} is misaligned for {np.dtype(dt)}")
                    resolved.append(rest[:n * np.dtype(dt).itemsize].view(dt))
                    touched.append(alloc)
            _touch(stream, touched, what)
            cuda_emu.launch(name, g, b, shared_mem, resolved, schedules=SCHEDULES)

        _issue(get_current_stream(), what, [], run)


class RawModule:
    """cupy.RawModule(*, code=None, path=None, options=(), backend='nvrtc', ...)."""

    def __init__(self, *, code: str | None = None, path: str | None = None, options: tuple = (),
                 backend: str = "nvrtc", translate_cucomplex: bool = False, enable_cooperative_groups: bool = False,
                 name_expressions: Any = None, jitify: bool = False, log_stream: Any = None):
        if (code is None) == (path is None):
            raise TypeError("One (and only one) of path or code is required.")
        if path is not None:
            with open(path, "rb") as f:
                self._binary: bytes | None = f.read()
            if not self._binary.startswith(b"\x7fELF"):
                raise CUDARuntimeError(f"{path}: not a cubin (CUDA_ERROR_INVALID_IMAGE)")
        else:
            self._binary = None
        self.code, self.options, self.backend = code, options, backend

    def get_function(self, name: str) -> RawKernel:
        if self._binary is not None:  # an ELF cubin: extern "C" entry points keep their names in its symbol table
            found = name.encode() + b"\0" in self._binary
        else:  # source: nemoh's entry points are made by a macro (stem_##S) from the kernel file that defines them
            try:
                file, _, _ = cuda_emu.entry_signature(name)
            except cuda_emu.EmulatorError:
                file = None
            found = file is not None and self.code == (cc.KERNEL_DIR / file).read_text(encoding="utf-8")
        if not found:
            raise CUDARuntimeError(f"CUDA_ERROR_NOT_FOUND: named symbol not found: {name}")
        return RawKernel(self.code or "", name)


# ----------------------------------------------------------------------------------------------
# Device, runtime, NVRTC, cuBLAS
# ----------------------------------------------------------------------------------------------

_DEVICE = [0]


class Device:
    """cupy.cuda.Device(device=None)."""

    def __init__(self, device: int | None = None):
        self.id = _DEVICE[0] if device is None else int(device)
        if not 0 <= self.id < getDeviceCount():
            raise CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")

    def use(self) -> Device:
        _DEVICE[0] = self.id
        return self

    def synchronize(self) -> None:
        deviceSynchronize()

    @property
    def compute_capability(self) -> str:
        return COMPUTE_CAPABILITY


def getDeviceCount() -> int:
    return 1


def getDeviceProperties(device: int) -> dict[str, Any]:
    return {"name": b"nemoh CuPy stand-in (CUDA emulator on the CPU)", "multiProcessorCount": N_SM,
            "major": int(COMPUTE_CAPABILITY[0]), "minor": int(COMPUTE_CAPABILITY[1:]),
            "totalGlobalMem": 24 << 30, "sharedMemPerBlock": MAX_STATIC_SHARED}


def runtimeGetVersion() -> int:
    return RUNTIME_VERSION


def driverGetVersion() -> int:
    return DRIVER_VERSION


def deviceSynchronize() -> None:
    _no_capture("cudaDeviceSynchronize")
    with _LOCK:
        for a in _ALLOCS.values():
            a.pending = None


def getDevice() -> int:
    return _DEVICE[0]


def nvrtc_getVersion() -> tuple[int, int]:
    return (13, 0)


def get_cuda_path() -> str | None:
    return None


_HANDLES: dict[int, Stream] = {}


def get_cublas_handle() -> int:
    """cupy.cuda.device.get_cublas_handle(): one shared handle, on whatever stream it was last given."""
    _HANDLES.setdefault(1, Stream.null)
    return 1


def setStream(handle: int, stream: int) -> None:
    s = next((x for x in list(_STREAMS) if x.ptr == stream), None)
    if s is None:
        raise CUDARuntimeError(f"cublasSetStream: no stream {stream:#x}")
    _HANDLES[handle] = s


def getStream(handle: int) -> int:
    return _HANDLES[handle].ptr


CUDA_R_32F, CUDA_R_16BF = 0, 14
_GEMM_DTYPES = {CUDA_R_32F: np.float32, CUDA_R_16BF: np.uint16}


def gemmEx(handle: int, transa: int, transb: int, m: int, n: int, k: int, alpha: int, A: int, Atype: int, lda: int,
           B: int, Btype: int, ldb: int, beta: int, C: int, Ctype: int, ldc: int, computeType: int, algo: int) -> None:
    """C[m, n] = alpha op(A)[m, k] op(B)[k, n] + beta C, column-major, pointer mode host (alpha, beta are
    host addresses of fp32 values for CUBLAS_COMPUTE_32F)."""
    what = f"cublasGemmEx(m={m}, n={n}, k={k}, lda={lda}, ldb={ldb}, ldc={ldc})"
    if not (Atype == Btype == Ctype) or Atype not in _GEMM_DTYPES:
        raise StandinError(f"{what}: types {Atype}/{Btype}/{Ctype}: nemoh uses fp32 or bf16 throughout")
    ar, ac = (m, k) if transa == 0 else (k, m)
    br, bc = (k, n) if transb == 0 else (n, k)
    if min(m, n, k) < 0 or lda < max(1, ar) or ldb < max(1, br) or ldc < max(1, m):
        raise StandinError(f"{what}: CUBLAS_STATUS_INVALID_VALUE (a leading dimension below the row count)")
    a_, b_ = ctypes.c_float.from_address(alpha).value, ctypes.c_float.from_address(beta).value
    dt = _GEMM_DTYPES[Atype]
    isz = np.dtype(dt).itemsize
    stream = _HANDLES.get(handle, Stream.null)

    def run(s: Stream) -> None:
        mats, allocs = [], []
        for ptr, rows, cols, ld, name in ((A, ar, ac, lda, "A"), (B, br, bc, ldb, "B"), (C, m, n, ldc, "C")):
            alloc, rest = resolve(ptr, f"{what} {name}")
            need = ((cols - 1) * ld + rows) * isz if rows and cols else 0
            if need > rest.nbytes:
                raise StandinError(f"{what}: matrix {name} ({rows}x{cols}, ld {ld}) runs {need - rest.nbytes} bytes "
                                   "past the end of its allocation")
            flat = rest[:max(need, isz)].view(dt) if need else rest[:0].view(dt)
            mats.append(np.lib.stride_tricks.as_strided(flat, (rows, cols), (isz, ld * isz)) if need else
                        np.zeros((rows, cols), dt))
            allocs.append(alloc)
        _touch(s, allocs, what)
        f32 = (lambda x: _bf16_bits_to_f32(x)) if dt is np.uint16 else (lambda x: np.asarray(x, np.float32))
        opa = f32(mats[0]) if transa == 0 else f32(mats[0]).T
        opb = f32(mats[1]) if transb == 0 else f32(mats[1]).T
        out = a_ * (opa @ opb)
        if b_ != 0:
            out = out + b_ * f32(mats[2])
        mats[2][...] = _f32_to_bf16_bits(out) if dt is np.uint16 else out.astype(np.float32)

    _issue(stream, what, [], run)

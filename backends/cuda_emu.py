"""Run the CuPy backend's CUDA kernels on the CPU: the same `.cu` sources, compiled with g++.

`cupy_kernels/emu/cuda_emu.h` supplies what the kernels use from CUDA (qualifiers, thread indices,
`__syncthreads`, warp shuffles, `__ldg`, `__nv_bfloat16`, math); each thread of a block is a
cooperative fiber that switches at barriers and shuffles, and blocks run one after another (see the
header). This module builds one shared library per kernel file (the source, a C launcher
`emu_launch_<entry>` per entry point generated from `cupy_compile.SIGNATURES`), caches it on disk
by a hash of everything that goes into it, loads it with ctypes, and launches kernels on numpy
arrays (device buffers are host memory; bf16 buffers are uint16, as in the CuPy backend):

    from nemoh.backends import cuda_emu
    cuda_emu.launch("add_rmsnorm_f32", grid=(M,), block=(256,), shared_bytes=0,
                    args=[x, delta, w, h, None, D, 1e-5])

Every launch is checked, and a failure raises `EmulatorError` naming the kernel and launch:
  * twice, under two schedules (threads and blocks in ascending, then descending order between
    synchronisation points, shared memory and guard bytes poisoned with different patterns), from
    identical copies of the buffers; the results must agree bit for bit. A missing `__syncthreads`,
    a race between blocks, or a read of never-written shared memory or of bytes outside a buffer
    shows up as a difference;
  * each buffer (each set of overlapping arrays) runs in a copy with guard bytes on both sides,
    checked after the launch: a write out of bounds names the buffer and the side;
  * a barrier that some threads of a block exited before reaching, or a shuffle part of a warp
    never reaches, is reported instead of hanging; a misaligned vector `__ldg` is reported.

Compiled libraries live in $NEMOH_EMU_CACHE, else ~/.cache/nemoh/cuda-emu (not $NEMOH_CACHE: the
test suite points that at a fresh folder per session, and these are content-addressed, so they can
never be stale). `python -m nemoh.backends.cuda_emu` builds every file and prints the time taken.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nemoh.backends import cupy_compile as cc
from nemoh.errors import NemohError

EMU_DIR = cc.KERNEL_DIR / "emu"
HEADER = EMU_DIR / "cuda_emu.h"
CXX = os.environ.get("NEMOH_EMU_CXX", "g++")
# -fno-strict-aliasing: the kernels read bf16/float values through uint4 (16-byte loads);
# -ffp-contract=off: no FMA the source did not write (x86-64 without -mfma contracts nothing anyway)
FLAGS = ("-O2", "-shared", "-fPIC", "-std=c++17", "-fno-strict-aliasing", "-ffp-contract=off",
         "-Wno-unknown-pragmas")
GUARD = 4096  # guard bytes on each side of every buffer
_CANARY = (0xA5, 0x5A)  # guard byte pattern per schedule


class EmulatorError(NemohError):
    """A kernel failed under the emulator: it did not compile, hung at a barrier, wrote out of
    bounds, or gave different results under two thread schedules (a race)."""


# ----------------------------------------------------------------------------------------------
# Signatures
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Param:
    type: str  # as in the source, T for the compute dtype: "const T*", "int", "i64"
    name: str

    @property
    def pointer(self) -> bool:
        return self.type.endswith("*")

    @property
    def base(self) -> str:
        """The pointee (pointers) or the type itself, without const: "T", "float", "int"."""
        return self.type.rstrip("*").replace("const", "").strip()


def parse_params(text: str) -> list[Param]:
    """"const T* x, int n" -> [Param("const T*", "x"), Param("int", "n")] (whitespace normalised)."""
    out = []
    for piece in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(.*?[\s*])(\w+)", piece)
        if not m:
            raise EmulatorError(f"cannot parse kernel parameter {piece!r}")
        t = re.sub(r"\s*\*", "*", " ".join(m.group(1).split()))
        out.append(Param(t, m.group(2)))
    return out


# compute dtype suffix -> (C++ type of T, numpy dtypes a T buffer may have)
_T = {"f32": ("float", (np.float32,)), "bf16": ("__nv_bfloat16", (np.uint16, np.int16))}
_NP = {"float": (np.float32,), "double": (np.float64,), "int": (np.int32,), "unsigned": (np.uint32,),
       "i64": (np.int64,), "long long": (np.int64,), "unsigned char": (np.uint8,), "char": (np.int8, np.uint8)}
_CScalar = type[ctypes.c_int32] | type[ctypes.c_uint32] | type[ctypes.c_float] | type[ctypes.c_double] \
    | type[ctypes.c_int64]
_SCALAR: dict[str, _CScalar] = {"int": ctypes.c_int32, "unsigned": ctypes.c_uint32, "float": ctypes.c_float,
                                "double": ctypes.c_double, "i64": ctypes.c_int64, "long long": ctypes.c_int64}


def entry_signature(entry: str) -> tuple[str, str | None, list[Param]]:
    """A kernel entry point -> (file, dtype suffix or None, parameters) from cupy_compile's tables."""
    for file, (templated, plain) in cc.KERNELS.items():
        if entry in plain:
            return file, None, parse_params(cc.SIGNATURES[entry])
        for stem in templated:
            for suffix in cc.DTYPE_SUFFIX.values():
                if entry == f"{stem}_{suffix}":
                    return file, suffix, parse_params(cc.SIGNATURES[stem])
    raise EmulatorError(f"unknown kernel {entry!r}: not an entry point in cupy_compile.KERNELS")


def _cxx_type(t: str, suffix: str | None) -> str:
    t = re.sub(r"\bi64\b", "long long", t)
    if suffix is not None:
        t = re.sub(r"\bT\b", _T[suffix][0], t)
    return t


# ----------------------------------------------------------------------------------------------
# Building: source rewrite, launchers, g++, the cache
# ----------------------------------------------------------------------------------------------

_DYN_SHARED = re.compile(r"extern\s+__shared__\s+((?:__align__\s*\(\s*\d+\s*\)\s*)?)([A-Za-z_][\w:<> ]*?)\s+(\w+)"
                         r"\s*\[\s*\]\s*;")
_SHARED = re.compile(r"__shared__\s+([^;{}]+);")


def _declared_name(decl: str) -> str:
    """The variable a shared-memory declaration names: "float buf[32][33]" -> "buf"."""
    m = re.match(r"(?:.*?[\s*)])?(\w+)\s*(?:\[[^\]]*\]\s*)*$", decl.strip(), re.S)
    if m is None:
        raise EmulatorError(f"cannot read the variable name of the __shared__ declaration {decl.strip()!r}")
    return m.group(1)


def rewrite_shared(src: str) -> str:
    """`extern __shared__ T s[];` -> a pointer to the launch's dynamic shared buffer; every static
    `__shared__` declaration also registers its variables (poisoned at each block start). Keeps
    line numbers, so g++'s messages point into the .cu file."""
    src = _DYN_SHARED.sub(lambda m: f"{m.group(2)}* const {m.group(3)} = "
                                    f"reinterpret_cast<{m.group(2)}*>(EMU_DYNAMIC_SHARED);", src)

    def static(m: re.Match) -> str:
        names = [_declared_name(d) for d in m.group(1).split(",")]
        return f"static {m.group(1)};" + "".join(f" EMU_SHARED({n});" for n in names)

    return _SHARED.sub(static, src)


_BOUNDS = re.compile(r"__global__\s+void\s+__launch_bounds__\s*\(\s*(\d+)[^)]*\)\s*(\w+?)(_##S)?\s*\(")


def launch_bounds(source: str, entries) -> dict[str, int]:
    """entry -> its `__launch_bounds__` thread limit (a launch with more threads fails on a GPU)."""
    src = re.sub(r"\\\n", " ", source)  # join macro continuation lines
    out = {}
    for m in _BOUNDS.finditer(src):
        n, name, templated = int(m.group(1)), m.group(2), m.group(3)
        for e in entries:
            if e == name or (templated and e.startswith(name + "_") and e[len(name) + 1:] in _T):
                out[e] = n
    return out


def launchers(entries: dict[str, tuple[str | None, list[Param]]]) -> str:
    """C launchers: `int emu_launch_<entry>(grid[3], block[3], smem, order, void** args)`, args[i]
    pointing at argument i (as cuLaunchKernel takes them); `emu_last_error()` says why one failed."""
    out = ['\nextern "C" const char* emu_last_error() { return ::emu::g_err; }\n']
    for entry, (suffix, params) in entries.items():
        call = ", ".join(f"::emu::arg<{_cxx_type(p.type, suffix)}>(a[{i}])" for i, p in enumerate(params))
        out.append(
            f"static void emu_body_{entry}(void* p) {{ void** a = (void**)p; (void)a; {entry}({call}); }}\n"
            f'extern "C" int emu_launch_{entry}(const unsigned* g, const unsigned* b, unsigned long long smem, '
            f"int order, void** a) {{\n"
            f'    return ::emu::launch("{entry}", g, b, smem, order, &emu_body_{entry}, (void*)a);\n}}\n')
    return "".join(out)


def cache_dir() -> Path:
    return Path(os.environ.get("NEMOH_EMU_CACHE") or Path.home() / ".cache" / "nemoh" / "cuda-emu")


@functools.lru_cache(maxsize=1)
def compiler_version() -> str:
    try:
        r = subprocess.run([CXX, "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise EmulatorError(f"the CUDA emulator needs a C++17 compiler: {CXX!r} is not usable ({e}); install "
                            "g++ (apt-get install g++) or set NEMOH_EMU_CXX") from None
    return r.stdout.splitlines()[0]


def _headers_text() -> str:
    files = sorted(EMU_DIR.glob("*.h")) + [cc.KERNEL_DIR / h for h in cc.HEADERS]
    return "".join(f"//{f.name}\n{f.read_text(encoding='utf-8')}" for f in files)


def build(name: str, tu: str, extra_flags: Sequence[str] = ()) -> tuple[Path, float]:
    """Compile translation unit `tu` (named `name` in messages) to a shared library, or reuse the
    cached one. Returns (path, seconds spent compiling: 0 for a cache hit)."""
    cmd = [CXX, *FLAGS, *extra_flags, "-include", str(HEADER), f"-I{EMU_DIR}", f"-I{cc.KERNEL_DIR}"]
    key = hashlib.sha256("\0".join([tu, _headers_text(), " ".join(cmd), compiler_version()]).encode()).hexdigest()
    out = cache_dir() / f"{Path(name).stem}-{key[:20]}.so"
    if out.is_file():
        return out, 0.0
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src, so = Path(tmp) / f"{Path(name).stem}.emu.cpp", Path(tmp) / "lib.so"
        src.write_text(tu, encoding="utf-8")
        r = subprocess.run([*cmd, str(src), "-o", str(so)], capture_output=True, text=True)
        if r.returncode != 0:
            raise EmulatorError(f"{name} does not compile for the CPU emulator ({' '.join(cmd)}):\n"
                                f"{r.stderr[-6000:]}")
        os.replace(so, out)
    return out, time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------
# A loaded module and its launches
# ----------------------------------------------------------------------------------------------

_LOCK = threading.Lock()  # the runtime in each library is not reentrant


class Module:
    """One .cu source compiled for the emulator. `kernels`: entry -> (dtype suffix or None, params);
    `extra_flags`: more g++ flags (-DEMU_USE_UCONTEXT selects the portable fiber switch)."""

    def __init__(self, name: str, source: str, kernels: dict[str, tuple[str | None, list[Param]]],
                 extra_flags: Sequence[str] = ()):
        self.name, self.kernels = name, kernels
        tu = f'#line 1 "{name}"\n{rewrite_shared(source)}\n{launchers(kernels)}'
        self.path, self.compile_s = build(name, tu, extra_flags)
        self.bounds = launch_bounds(source, kernels)
        self.lib = ctypes.CDLL(str(self.path))
        self.lib.emu_last_error.restype = ctypes.c_char_p
        self._fns = {}
        for entry in kernels:
            fn = getattr(self.lib, f"emu_launch_{entry}")
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint), ctypes.c_ulonglong,
                           ctypes.c_int, ctypes.POINTER(ctypes.c_void_p)]
            self._fns[entry] = fn

    @classmethod
    def from_source(cls, name: str, source: str, signatures: dict[str, str], extra_flags: Sequence[str] = ()) -> Module:
        """A module from source text with explicit signatures (no `T`): for small test kernels."""
        return cls(name, source, {k: (None, parse_params(v)) for k, v in signatures.items()}, extra_flags)

    def launch(self, entry: str, grid: Sequence[int], block: Sequence[int], shared_bytes: int, args: Sequence[Any],
               *, schedules: int = 2) -> None:
        """Run kernel `entry` on `args` (numpy arrays for pointers, None for a null pointer, Python or
        numpy scalars), in place. See the module docstring for the checks."""
        if entry not in self._fns:
            raise EmulatorError(f"{self.name} has no kernel {entry!r}")
        suffix, params = self.kernels[entry]
        g, b = _dims(grid, "grid"), _dims(block, "block")
        what = f"{entry}<<<grid {tuple(g)}, block {tuple(b)}, shared {shared_bytes}>>>"
        if entry in self.bounds and b[0] * b[1] * b[2] > self.bounds[entry]:
            raise EmulatorError(f"{what}: {b[0] * b[1] * b[2]} threads per block, more than the kernel's "
                                f"__launch_bounds__({self.bounds[entry]}): the launch fails on a GPU")
        if len(args) != len(params):
            raise EmulatorError(f"{what}: {len(args)} arguments for {len(params)} parameters "
                                f"({', '.join(f'{p.type} {p.name}' for p in params)})")
        scalars = [None if p.pointer else _scalar(p, a, what) for p, a in zip(params, args)]
        arrays = {i: _array(p, args[i], suffix, what) for i, p in enumerate(params) if p.pointer}
        present = {i: a for i, a in arrays.items() if a is not None}  # the non-null pointers
        groups = _groups(present)
        results = []
        for order in range(schedules):
            bufs = [_Guarded(lo, hi, order) for lo, hi, _ in groups]
            ptrs: list[Any] = []
            for i, p in enumerate(params):
                if not p.pointer:
                    ptrs.append(scalars[i])
                elif arrays[i] is None:
                    ptrs.append(ctypes.c_void_p(None))
                else:
                    addr = _addr(present[i])
                    k = next(k for k, (lo, hi, _) in enumerate(groups) if lo <= addr < max(hi, lo + 1))
                    ptrs.append(ctypes.c_void_p(bufs[k].data_addr + addr - groups[k][0]))
            argv = (ctypes.c_void_p * max(1, len(ptrs)))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p)
                                                            for v in ptrs])
            with _LOCK:
                rc = self._fns[entry]((ctypes.c_uint * 3)(*g), (ctypes.c_uint * 3)(*b), shared_bytes, order, argv)
                msg = self.lib.emu_last_error().decode(errors="replace") if rc else ""
            if rc:
                raise EmulatorError(f"{what}: {msg}")
            for buf, (_, _, members) in zip(bufs, groups):
                buf.check_guards(what, [(params[i].name, i, present[i]) for i in members])
            results.append(bufs)
        for k, (lo, hi, members) in enumerate(groups):
            first = results[0][k].data()
            for other in results[1:]:
                diff = np.flatnonzero(first != other[k].data())
                if diff.size:
                    where = _where(int(diff[0]), lo, [(params[i].name, i, present[i]) for i in members])
                    raise EmulatorError(f"{what}: results differ between two thread schedules ({where}, "
                                        f"{diff.size} bytes differ): a race (a missing __syncthreads, blocks "
                                        "depending on each other's writes) or a read of never-written shared memory "
                                        "or of bytes outside a buffer")
            ctypes.memmove(lo, results[0][k].data_addr, hi - lo)


def _dims(v: Sequence[int], what: str) -> list[int]:
    d = [int(x) for x in (v if isinstance(v, (tuple, list)) else (v,))]
    if not 1 <= len(d) <= 3:
        raise EmulatorError(f"{what} {v!r} must have 1 to 3 dimensions")
    return d + [1] * (3 - len(d))


def _addr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _scalar(p: Param, v: Any, what: str):
    ct = _SCALAR.get(p.base)
    if ct is None:
        raise EmulatorError(f"{what}: parameter {p.type} {p.name} has a type the emulator cannot pass")
    if isinstance(v, np.ndarray) or v is None:
        raise EmulatorError(f"{what}: parameter {p.type} {p.name} takes a scalar, got {type(v).__name__}")
    if ct in (ctypes.c_float, ctypes.c_double):
        return ct(float(v))
    if isinstance(v, (float, np.floating)):
        raise EmulatorError(f"{what}: parameter {p.type} {p.name} takes an integer, got {v!r}")
    bits = 8 * ctypes.sizeof(ct)
    lo, hi = (0, 2 ** bits) if ct is ctypes.c_uint32 else (-(2 ** (bits - 1)), 2 ** (bits - 1))
    if not lo <= int(v) < hi:
        raise EmulatorError(f"{what}: parameter {p.type} {p.name} = {v} does not fit")
    return ct(int(v))


def _array(p: Param, a: Any, suffix: str | None, what: str) -> np.ndarray | None:
    if a is None:
        return None
    if not isinstance(a, np.ndarray):
        raise EmulatorError(f"{what}: parameter {p.type} {p.name} takes a numpy array or None, "
                            f"got {type(a).__name__}")
    if not a.flags.c_contiguous:
        raise EmulatorError(f"{what}: buffer {p.name} is not C-contiguous (pass a contiguous array, or a flat "
                            "view at an offset: a.reshape(-1)[offset:])")
    want = _T[suffix][1] if p.base == "T" and suffix else _NP.get(p.base)
    if want is not None and a.dtype.type not in want:
        raise EmulatorError(f"{what}: buffer {p.type} {p.name} must be {' or '.join(np.dtype(w).name for w in want)}, "
                            f"got {a.dtype}")
    return a


def _groups(arrays: dict[int, np.ndarray]) -> list[tuple[int, int, list[int]]]:
    """Byte ranges [lo, hi) of the arrays, overlapping ones merged (aliases must stay aliases)."""
    spans = sorted((_addr(a), _addr(a) + a.nbytes, i) for i, a in arrays.items())
    out: list[tuple[int, int, list[int]]] = []
    for lo, hi, i in spans:
        if out and lo < out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi), out[-1][2] + [i])
        else:
            out.append((lo, hi, [i]))
    return out


def _where(byte: int, lo: int, members: list[tuple[str, int, np.ndarray]]) -> str:
    """Name the buffer (and element) holding byte offset `byte` of a group starting at `lo`."""
    for name, i, a in members:
        off = lo + byte - _addr(a)
        if 0 <= off < a.nbytes:
            idx = np.unravel_index(off // a.itemsize, a.shape) if a.size else ()
            return f"buffer {name} (argument {i}) at element {tuple(int(x) for x in idx)}"
    return f"buffer {members[0][0]} (argument {members[0][1]}) at byte {byte}"


class _Guarded:
    """A copy of the bytes [lo, hi) with GUARD canary bytes on each side; the copy keeps the
    address's alignment modulo 256 (as cudaMalloc's 256-byte alignment would)."""

    def __init__(self, lo: int, hi: int, order: int):
        self.n, self.canary = hi - lo, _CANARY[order % 2]
        self.raw = np.full(2 * GUARD + 256 + self.n, self.canary, np.uint8)
        base = _addr(self.raw)
        self.off = GUARD + (lo - (base + GUARD)) % 256
        self.data_addr = base + self.off
        ctypes.memmove(self.data_addr, lo, self.n)

    def data(self) -> np.ndarray:
        return self.raw[self.off:self.off + self.n]

    def check_guards(self, what: str, members: list[tuple[str, int, np.ndarray]]) -> None:
        before = np.flatnonzero(self.raw[:self.off] != self.canary)
        after = np.flatnonzero(self.raw[self.off + self.n:] != self.canary)
        if not (before.size or after.size):
            return
        names = " / ".join(f"{n} (argument {i}, {a.dtype} {tuple(a.shape)})" for n, i, a in members)
        if before.size:
            raise EmulatorError(f"{what}: wrote out of bounds, {self.off - int(before[0])} bytes before the start "
                                f"of buffer {names}")
        if after.size:
            raise EmulatorError(f"{what}: wrote out of bounds, {int(after[-1]) + 1} bytes past the end of buffer "
                                f"{names} (first bad byte at +{int(after[0])})")


# ----------------------------------------------------------------------------------------------
# The nemoh kernels
# ----------------------------------------------------------------------------------------------

_MODULES: dict[str, Module] = {}
_FILE_LOCKS = {file: threading.Lock() for file in cc.KERNELS}  # per file: build_all compiles files in parallel


def module(file: str) -> Module:
    """The emulated module of kernel file `file` (e.g. "norm.cu"), built or loaded once."""
    with _FILE_LOCKS.setdefault(file, threading.Lock()):
        if file not in _MODULES:
            entries = {}
            for entry in cc.entry_points(file):
                _, suffix, params = entry_signature(entry)
                entries[entry] = (suffix, params)
            _MODULES[file] = Module(file, cc.source(file), entries)
        return _MODULES[file]


def build_all(workers: int | None = None) -> dict[str, float]:
    """Build (or load from the cache) every kernel file, in parallel. {file: compile seconds}."""
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        mods = dict(zip(cc.KERNELS, pool.map(module, cc.KERNELS)))
    return {f: m.compile_s for f, m in mods.items()}


def launch(entry: str, grid: Sequence[int], block: Sequence[int], shared_bytes: int, args: Sequence[Any], *,
           schedules: int = 2) -> None:
    """Launch nemoh kernel `entry` (e.g. "add_rmsnorm_bf16") on the CPU. See Module.launch."""
    file, _, _ = entry_signature(entry)
    module(file).launch(entry, grid, block, shared_bytes, args, schedules=schedules)


def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    times = build_all()
    for f, s in times.items():
        print(f"{f:13s} {'cached' if s == 0 else f'{s:6.2f} s'}  {module(f).path}")
    print(f"total {time.perf_counter() - t0:.2f} s wall ({CXX}: {compiler_version()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

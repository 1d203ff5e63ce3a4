"""Compiling the CuPy backend's CUDA kernels: the one source of truth for files, options, entries.

The kernels live in `cupy_kernels/*.cu` (plus the shared header `common.cuh`). This module knows
which `extern "C" __global__` entry points each file must export (`KERNELS`), the NVRTC options
they are built with (`nvrtc_options`), and how to compile them without a GPU: NVRTC is called
through ctypes (nvrtcCreateProgram / nvrtcCompileProgram / nvrtcGetPTX or nvrtcGetCUBIN), so
neither a driver nor CuPy is needed. CI uses this to prove every kernel compiles for sm_80 and
sm_90 (`tests/backends/test_cupy_kernels.py`); the backend uses the same function to build the cubin it
loads through `cupy.RawModule(path=...)`.

Where NVRTC and the CUDA headers come from (first hit wins):
  1. $NEMOH_NVRTC (the libnvrtc shared library) and $NEMOH_CUDA_INCLUDE (a folder holding
     cuda_bf16.h), when set;
  2. the PyPI wheels `nvidia-cuda-nvrtc-cu12` + `nvidia-cuda-runtime-cu12` (the `test` and `gpu`
     extras install them), or their CUDA 13 successors `nvidia-cuda-nvrtc` + `nvidia-cuda-runtime`;
  3. a CUDA toolkit at $CUDA_PATH, $CUDA_HOME or /usr/local/cuda.
NVRTC finds no header by itself (`cuda_bf16.h`: "no directories in search list"), so the include
folder is always passed explicitly; it must come from the same CUDA major version as libnvrtc.

`python -m nemoh.backends.cupy_compile [ARCH ...]` compiles everything and prints the entry points.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from nemoh.errors import NemohError

KERNEL_DIR = Path(__file__).with_name("cupy_kernels")
HEADERS = ("common.cuh",)

#: compute dtype -> the suffix of the kernel instantiations for it
DTYPE_SUFFIX = {"float32": "f32", "bfloat16": "bf16"}

#: file -> (kernels instantiated once per dtype as `<stem>_<suffix>`, dtype-free kernels)
KERNELS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "embedding.cu": (("embedding",), ()),
    "norm.cu": (("add_rmsnorm", "gated_rmsnorm"), ()),
    "conv1d.cu": (("conv1d_prefill", "conv1d_state_update", "conv1d_step"), ()),
    "ssd.cu": (("ssd_dt_cumsum", "ssd_chunk_state", "ssd_chunk_scan", "ssd_step"), ("ssd_state_passing",)),
    "attention.cu": (("kv_append", "attn_prefill", "attn_decode_split", "attn_decode_combine"), ()),
    "moe.cu": (("moe_router", "moe_gemv", "moe_combine"), ()),
    "linear.cu": (("gemv", "relu2", "add", "gather_rows"), ()),
    "quant.cu": (("gemv_nvfp4", "nvfp4_dequant", "act_nvfp4", "act_fp8"), ()),
}

#: kernel stem -> its parameter list exactly as the .cu source declares it, `T` being the compute
#: dtype of the `<stem>_<suffix>` instantiations (`i64` is `long long`). Launchers that marshal
#: arguments by hand (the CPU emulator, backends/cuda_emu.py) read the types from here;
#: tests/backends/test_cupy_emulated.py checks it against the sources, and the emulator's generated launchers
#: only compile when every declared type equals the kernel's parameter type.
SIGNATURES: dict[str, str] = {
    "embedding": "const int* ids, const T* W, T* out, int D, int V",
    "add_rmsnorm": "T* x, const T* delta, const T* w, T* h, const int* rowmask, int D, float eps",
    "gated_rmsnorm": "const float* y, const T* z, int ldz, const T* w, T* out, int d_inner, int gs, float eps",
    "conv1d_prefill": "const T* xbc, int ld, const T* w, const T* bias, const T* state, const int* mask, T* out, "
                      "int T_, int C, int K, int tt",
    "conv1d_state_update": "const T* xbc, int ld, T* state, const int* mask, int B, int T_, int C, int K",
    "conv1d_step": "const T* xbc, int ld, const T* w, const T* bias, T* state, const int* mask, T* out, int B, "
                   "int C, int K",
    "ssd_dt_cumsum": "const T* dt_raw, int ld, const T* dt_bias, const float* A, float* dtd, double* cum, int B, "
                     "int T_, int H, int chunk, float dt_min, float dt_max",
    "ssd_chunk_state": "const T* xbc, const float* dtd, const double* cum, float* states, int T_, int H, int P, "
                       "int G, int N, int chunk",
    "ssd_state_passing": "float* states, float* ssm, const double* cum, int B, int T_, int H, int PN, int chunk",
    "ssd_chunk_scan": "const T* xbc, const float* dtd, const double* cum, const float* starts, const T* Dp, "
                      "float* y, int T_, int H, int P, int G, int N, int chunk",
    "ssd_step": "const T* xbc, int ldx, const T* dt_raw, int ld, const T* dt_bias, const float* A, const T* Dp, "
                "float* ssm, float* y, int H, int P, int G, int N, float dt_min, float dt_max",
    "kv_append": "const T* k, const T* v, int ldkv, T* kc, T* vc, int* kmask, const int* mask, const int* len, "
                 "int T_, int Smax, int KVD",
    "attn_prefill": "const T* q, int ldq, const T* kc, const T* vc, const int* kmask, const int* len, T* out, "
                    "int T_, int Q, int KV, int Dh, int Smax, float scale",
    "attn_decode_split": "const T* q, const T* kc, const T* vc, const int* kmask, const int* len, float* part, "
                         "int Q, int KV, int Dh, int Smax, int NS, float scale",
    "attn_decode_combine": "const float* part, T* out, int Q, int Dh, int NS",
    "moe_router": "const T* h, const T* Wg, const float* bias, float* out_w, int* out_idx, int D, int E, "
                  "int top_k, int n_group, int topk_group, int norm, float scaling",
    "moe_gemv": "const T* W, const int* idx, const T* x, int ldx, int xdiv, T* y, int R, int Cc, int act, int vec",
    "moe_combine": "const float* w, const T* y, const int* pos, T* out, int L, int top_k",
    "gemv": "const T* W, const T* x, int ldx, T* y, int ldy, int R, int Cc, int M, int act, int vec",
    "relu2": "T* x, i64 n",
    "add": "const T* a, const T* b, T* out, i64 n",
    "gather_rows": "const T* src, const int* rows, T* out, int D",
    "gemv_nvfp4": "const unsigned char* Wq, const unsigned char* Ws, float gs, const T* x, int ldx, T* y, int ldy, "
                  "int R, int Cc, int M, int act, int vec",
    "nvfp4_dequant": "const unsigned char* Wq, const unsigned char* Ws, float gs, T* W, i64 nb16",
    "act_nvfp4": "const T* x, int ldx, int xdiv, const int* idx, const float* g, T* out, int ldo, int C",
    "act_fp8": "const T* x, int ldx, int xdiv, const int* idx, const float* sc, T* out, int ldo, int C",
}

#: the architectures CI compiles for (A100 and H100/H200)
CI_ARCHS = ("compute_80", "compute_90")


class CompileError(NemohError):
    """NVRTC is missing, or a kernel failed to compile (the message carries NVRTC's log)."""


def kernel_name(stem: str, dtype: str) -> str:
    """The extern "C" name of kernel `stem` instantiated for compute dtype `dtype`."""
    return f"{stem}_{DTYPE_SUFFIX[dtype]}"


def entry_points(file: str) -> list[str]:
    """Every extern "C" __global__ name `file` must export."""
    templated, plain = KERNELS[file]
    return [kernel_name(s, d) for s in templated for d in DTYPE_SUFFIX] + list(plain)


def kernel_files() -> list[str]:
    """The .cu files on disk (tests check this equals KERNELS' keys: no file goes unchecked)."""
    return sorted(p.name for p in KERNEL_DIR.glob("*.cu"))


def source(file: str) -> str:
    return (KERNEL_DIR / file).read_text(encoding="utf-8")


def nvrtc_options(arch: str | None, include_dirs: list[str] | tuple[str, ...]) -> list[str]:
    """NVRTC options for every kernel file. `arch` is `compute_XY` (PTX) or `sm_XY` (cubin); None
    leaves the architecture to the caller (CuPy adds the device's own)."""
    opts = ["--std=c++17", "-default-device", f"-I{KERNEL_DIR}"] + [f"-I{d}" for d in include_dirs]
    if arch is not None:
        opts.insert(0, f"--gpu-architecture={arch}")
    return opts


# ----------------------------------------------------------------------------------------------
# Finding NVRTC and the CUDA headers
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Toolchain:
    """A libnvrtc and the include folder (with cuda_bf16.h) of the same CUDA release."""

    nvrtc: str
    include: str
    origin: str  # env | wheel-cu12 | wheel-cu13 | toolkit

    @functools.cached_property
    def lib(self) -> ctypes.CDLL:
        lib = ctypes.CDLL(self.nvrtc)
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        return lib

    @property
    def version(self) -> tuple[int, int]:
        major, minor = ctypes.c_int(), ctypes.c_int()
        _check(self.lib, self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        return major.value, minor.value


def _nvidia_roots() -> list[Path]:
    """The folders of the `nvidia` namespace package (where the CUDA wheels install)."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(p) for p in spec.submodule_search_locations]


def _first(paths) -> Path | None:
    for p in paths:
        if p.is_file():
            return p
    return None


def toolchain_candidates() -> list[Toolchain]:
    """Every usable (libnvrtc, include folder) pair found, in preference order."""
    out: list[Toolchain] = []
    env_lib, env_inc = os.environ.get("NEMOH_NVRTC"), os.environ.get("NEMOH_CUDA_INCLUDE")
    if env_lib:
        inc = env_inc or ""
        out.append(Toolchain(env_lib, inc, "env"))
    for root in _nvidia_roots():
        for libdir, pattern, incdir, origin in (
                ("cuda_nvrtc/lib", "libnvrtc.so.12*", "cuda_runtime/include", "wheel-cu12"),
                ("cu13/lib", "libnvrtc.so.13*", "cu13/include", "wheel-cu13")):
            lib = _first(sorted((root / libdir).glob(pattern)))
            wheel_inc = root / incdir
            if lib and (wheel_inc / "cuda_bf16.h").is_file():
                out.append(Toolchain(str(lib), str(wheel_inc), origin))
    homes = [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    for home in dict.fromkeys(h for h in homes if h):
        h = Path(home)
        lib = _first(sorted((h / "lib64").glob("libnvrtc.so*")) + sorted((h / "lib").glob("libnvrtc.so*")))
        if lib and (h / "include" / "cuda_bf16.h").is_file():
            out.append(Toolchain(str(lib), str(h / "include"), "toolkit"))
    return out


def find_toolchain() -> Toolchain:
    """The first usable toolchain, or a CompileError that says what to install."""
    cands = toolchain_candidates()
    if not cands:
        raise CompileError(
            "no NVRTC found: install the CUDA compiler wheels (pip install nvidia-cuda-nvrtc-cu12 "
            "nvidia-cuda-runtime-cu12, which `pip install -e '.[test]'` does), or set NEMOH_NVRTC to "
            "a libnvrtc.so and NEMOH_CUDA_INCLUDE to a folder holding cuda_bf16.h")
    return cands[0]


# ----------------------------------------------------------------------------------------------
# NVRTC through ctypes
# ----------------------------------------------------------------------------------------------

def _check(lib, rc: int, what: str) -> None:
    if rc != 0:
        raise CompileError(f"{what} failed: {lib.nvrtcGetErrorString(rc).decode()} ({rc})")


def compile_source(src: str, name: str, arch: str, tc: Toolchain | None = None) -> bytes:
    """Compile one translation unit: PTX for `compute_XY`, a cubin for `sm_XY`."""
    tc = tc or find_toolchain()
    lib = tc.lib
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), name.encode(), 0, None, None),
           "nvrtcCreateProgram")
    try:
        opts = [o.encode() for o in nvrtc_options(arch, [tc.include] if tc.include else [])]
        arr = (ctypes.c_char_p * len(opts))(*opts)
        rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
        n = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        log = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetProgramLog(prog, log)
        if rc != 0:
            raise CompileError(f"{name} ({arch}, NVRTC {'.'.join(map(str, tc.version))} from {tc.origin}) "
                               f"does not compile:\n{log.value.decode(errors='replace')}")
        cubin = arch.startswith("sm_")
        get_size = lib.nvrtcGetCUBINSize if cubin else lib.nvrtcGetPTXSize
        get = lib.nvrtcGetCUBIN if cubin else lib.nvrtcGetPTX
        _check(lib, get_size(prog, ctypes.byref(n)), "nvrtcGet*Size")
        buf = ctypes.create_string_buffer(n.value)
        _check(lib, get(prog, buf), "nvrtcGet*")
        return buf.raw[:n.value].rstrip(b"\0") if not cubin else buf.raw[:n.value]
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def compile_all(arch: str = "compute_90", tc: Toolchain | None = None) -> dict[str, bytes]:
    """Every kernel file compiled for `arch`: {file: PTX bytes} (cubin bytes for `sm_XY`).

    Raises CompileError if NVRTC is missing, a file does not compile, or a file's output lacks an
    expected entry point.
    """
    tc = tc or find_toolchain()
    out = {}
    for file in KERNELS:
        code = compile_source(source(file), file, arch, tc)
        if not arch.startswith("sm_"):
            missing = sorted(set(entry_points(file)) - ptx_entries(code))
            if missing:
                raise CompileError(f"{file} ({arch}) compiled but lacks entry points {missing}")
        out[file] = code
    return out


_ENTRY = re.compile(rb"^\s*(?:\.(?:visible|weak)\s+)?\.entry\s+([A-Za-z_$]\w*)\s*\(", re.M)


def ptx_entries(ptx: bytes) -> set[str]:
    """The `.entry` (kernel) names a PTX module defines."""
    return {m.decode() for m in _ENTRY.findall(ptx)}


def main(argv: list[str] | None = None) -> int:
    archs = (argv if argv is not None else sys.argv[1:]) or list(CI_ARCHS)
    tc = find_toolchain()
    print(f"NVRTC {'.'.join(map(str, tc.version))} ({tc.origin}: {tc.nvrtc}), headers {tc.include}")
    for arch in archs:
        ptx = compile_all(arch, tc)
        for file, code in ptx.items():
            what = f"{len(ptx_entries(code))} entry points" if not arch.startswith("sm_") else "cubin"
            print(f"{arch:11s} {file:13s} {len(code):8d} bytes  {what}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

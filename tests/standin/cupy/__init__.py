"""A stand-in for CuPy on the CPU: the API nemoh's cupy backend uses (backends/cupy_device.py), run by the
CUDA emulator, with CuPy's signatures. Put `tests/standin` first on the import path to use it (the test
suite's `standin` fixture does; `NEMOH_CUPY_STANDIN=1 pytest ...` does it for a whole run, and
`PYTHONPATH=tests/standin nemoh conformance --backend cupy` for the command line). What it checks, and why
only a GPU can confirm it: cupy/_core.py."""

from cupy import cuda
from cupy._core import RawKernel, RawModule, __version__, asarray, ascontiguousarray, empty, ndarray, zeros

STANDIN = True

__all__ = ["RawKernel", "RawModule", "STANDIN", "__version__", "asarray", "ascontiguousarray", "cuda", "empty",
           "ndarray", "zeros"]

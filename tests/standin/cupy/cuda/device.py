"""cupy.cuda.device of the stand-in (see cupy/_core.py)."""

from cupy._core import Device, get_cublas_handle

__all__ = ["Device", "get_cublas_handle"]

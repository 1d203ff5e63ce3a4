"""cupy_backends.cuda.libs.cublas of the stand-in (see cupy/_core.py)."""

from cupy._core import gemmEx, getStream, setStream

__all__ = ["gemmEx", "getStream", "setStream"]

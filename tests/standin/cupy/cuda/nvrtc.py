"""cupy.cuda.nvrtc of the stand-in (see cupy/_core.py)."""

from cupy._core import nvrtc_getVersion as getVersion

__all__ = ["getVersion"]

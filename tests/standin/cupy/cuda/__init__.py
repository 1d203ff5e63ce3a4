"""cupy.cuda of the stand-in (see cupy/_core.py)."""

from cupy._core import Device, Graph, Stream, get_cuda_path, get_current_stream
from cupy.cuda import device, nvrtc, runtime

__all__ = ["Device", "Graph", "Stream", "device", "get_cuda_path", "get_current_stream", "nvrtc", "runtime"]

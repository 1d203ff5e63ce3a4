"""cupy.cuda.runtime of the stand-in (see cupy/_core.py)."""

from cupy._core import (
    CUDARuntimeError,
    deviceSynchronize,
    driverGetVersion,
    getDevice,
    getDeviceCount,
    getDeviceProperties,
    runtimeGetVersion,
)

__all__ = ["CUDARuntimeError", "deviceSynchronize", "driverGetVersion", "getDevice", "getDeviceCount",
           "getDeviceProperties", "runtimeGetVersion"]

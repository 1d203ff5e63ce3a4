"""The CuPy backend's kernel limits are one fact: the `#define`s in backends/cupy_kernels/*.cu. The
constants `check_graph` enforces in backends/cupy_backend.py must equal them, so a kernel whose
shared-memory tile grows is never fed a model the old limit would refuse, or the reverse."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nemoh.backends import cupy_backend as cb

KERNELS = Path(cb.__file__).resolve().parent / "cupy_kernels"
LIMITS = ("KMAX", "SSD_PMAX", "SSD_NMAX", "ATT_DMAX", "ATT_TK", "ATT_QROWS", "ATT_GROUP_MAX", "MOE_EMAX", "MOE_GMAX",
          "MOE_KMAX", "GEMV_MMAX")


def defines() -> dict[str, int]:
    out: dict[str, int] = {}
    for f in sorted(KERNELS.glob("*.cu*")):
        for name, value in re.findall(r"^#define\s+([A-Z_]+)\s+(\d+)\b", f.read_text(), re.M):
            assert out.get(name, int(value)) == int(value), f"{name} defined twice with different values"
            out[name] = int(value)
    return out


@pytest.mark.parametrize("name", LIMITS)
def test_backend_limit_equals_the_kernel_define(name):
    d = defines()
    assert name in d, f"{name} is not a #define in {KERNELS}: the kernel hard-codes it"
    assert getattr(cb, name) == d[name], f"cupy_backend.{name} = {getattr(cb, name)}, the kernels say {d[name]}"


def test_every_kernel_limit_is_checked():
    """A new sizing #define in a kernel must be listed (and enforced) here too."""
    sizing = {n for n in defines() if n.endswith(("MAX", "_TK", "QROWS"))}
    assert sizing <= set(LIMITS), sorted(sizing - set(LIMITS))

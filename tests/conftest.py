from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

#: the CuPy stand-in (tests/standin/cupy: CuPy's API on the CPU emulator); NEMOH_CUPY_STANDIN=1 puts it first on
#: the import path for the whole run, so that `import cupy` anywhere (the cupy backend, test_cupy_gpu.py) gets it
STANDIN = Path(__file__).resolve().parent / "standin"
if os.environ.get("NEMOH_CUPY_STANDIN") == "1":
    sys.path.insert(0, str(STANDIN))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tests generate their own checkpoints: a stale or tampered user cache can't leak in."""
    old = os.environ.get("NEMOH_CACHE")
    os.environ["NEMOH_CACHE"] = str(tmp_path_factory.mktemp("nemoh-cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield
    if old is None:
        os.environ.pop("NEMOH_CACHE", None)
    else:
        os.environ["NEMOH_CACHE"] = old


@pytest.fixture
def standin(monkeypatch):
    """`import cupy` (and cupy_backends) gets the stand-in for the duration of a test, also where a real cupy
    is installed; the real one, if it was imported, comes back afterwards."""
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in ("cupy", "cupy_backends")}
    for k in saved:
        del sys.modules[k]
    monkeypatch.syspath_prepend(str(STANDIN))
    import cupy

    assert getattr(cupy, "STANDIN", False), cupy.__file__
    yield cupy
    for k in [k for k in sys.modules if k.split(".")[0] in ("cupy", "cupy_backends")]:
        del sys.modules[k]
    sys.modules.update(saved)

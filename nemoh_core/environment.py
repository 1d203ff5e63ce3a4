"""What a result was measured on: one description of the machine and the software, shared by the
conformance, bench and eval reports."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: the distributions whose versions every report records (those not installed are left out)
PACKAGES = ("nemoh", "torch", "transformers", "safetensors", "tokenizers", "numpy", "onnx", "onnxruntime",
            "onnxruntime-gpu", "cupy-cuda12x", "lm-eval", "hypothesis", "llama-cpp-python")


def git_commit() -> str | None:
    """The commit nemoh runs from (with '+dirty' for local changes), or None outside a checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        res = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if res.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True,
                               timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() + ("+dirty" if dirty else "")


def loadavg() -> list[float] | None:
    """The 1/5/15-minute load averages, rounded to two decimals (None where the OS has none)."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def environment(argv: list[str] | None = None, seeds: dict[str, Any] | None = None) -> dict[str, Any]:
    import torch

    pkgs = {}
    for name in PACKAGES:
        try:
            pkgs[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda_available": torch.cuda.is_available(),
            "cuda": torch.version.cuda if torch.cuda.is_available() else None,
            "transformers": pkgs.get("transformers"), "packages": pkgs, "git_commit": git_commit(),
            "command_line": list(argv) if argv is not None else list(sys.argv), "seeds": seeds or {},
            "loadavg_start": loadavg()}

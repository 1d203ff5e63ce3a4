"""The one dtype table: every compute dtype nemoh knows, with its torch dtype, size, accumulation
dtype and safetensors code. Everything else (config validation, the IR's byte counts, the weight
loader, the oracle's upcasts, the CLI's choices) reads it from here.

Pure data: torch is imported only when a torch dtype is asked for, so the config and the IR load
without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DType:
    name: str  # the name used in configs, on the command line and in the IR
    itemsize: int  # bytes per element
    acc: str  # the dtype norms, the SSM, the router and the softmax compute in (at least fp32)
    safetensors: str  # the code in a safetensors header


DTYPES: dict[str, DType] = {d.name: d for d in (
    DType("float64", 8, "float64", "F64"),
    DType("float32", 4, "float32", "F32"),
    DType("bfloat16", 2, "float32", "BF16"),
    DType("float16", 2, "float32", "F16"),
)}
#: compute dtype names, most precise first
NAMES: tuple[str, ...] = tuple(DTYPES)
#: name -> bytes per element; int64 too, for token ids and masks
ITEMSIZE: dict[str, int] = {**{n: d.itemsize for n, d in DTYPES.items()}, "int64": 8}
#: safetensors header code -> name, for the float dtypes a checkpoint may hold
FROM_SAFETENSORS: dict[str, str] = {d.safetensors: n for n, d in DTYPES.items()}


def torch_dtype(name: str) -> torch.dtype:
    """torch.float32 for 'float32' (the table's names are torch's own attribute names)."""
    import torch

    return getattr(torch, DTYPES[name].name)


def acc(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of a torch dtype: float64 stays float64, everything else is float32."""
    import torch

    return torch.float64 if dtype == torch.float64 else torch.float32

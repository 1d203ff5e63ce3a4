"""ModelOpt FP8 / NVFP4 checkpoints on the CuPy executor: what the device holds, what a decode step streams.

Host-side only (no cupy, no device): the backend (backends/cupy_backend.py) uploads what this plans and
launches the kernels of cupy_kernels/quant.cu.

What runs where (docs/quantized-formats.md, cupy_kernels/NOTES.md):
  * NVFP4 dense linears (every quantized linear but the MoE experts) stay packed on the device: codes uint8
    [R, C/2] and e4m3 block scales [R, C/16] as raw bytes, the global scale a kernel argument. Decode (and any
    forward of <= 8 token rows) runs `gemv_nvfp4`, which dequantizes in the kernel: 0.5625 bytes per weight
    streamed (4.5 bits) instead of 2 (bf16) or 4 (fp32). Prefill dequantizes one linear at a time into one
    scratch buffer (`nvfp4_dequant`, sized for the largest packed linear) and hands it to cuBLAS.
  * FP8 linears and the MoE experts of both formats are held dequantized at the compute dtype (as
    Checkpoint.load gives them): no FP8 GEMV, no packed MoE GEMV yet.
  * Every linear with an `input_scale` has its input quantized as the format prescribes (`act_fp8` static per
    tensor, `act_nvfp4` per 16-element block), in prefill and decode; MoE experts per (token, expert) pair with
    that expert's scale, as the torch executor does.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nemoh.model.ir import Graph
from nemoh.model.quant import QUANTIZABLE, aux_name

EXPERTS = ("experts.up_proj", "experts.down_proj")
#: activation format -> its quantizer kernel (cupy_kernels/quant.cu)
ACT_KERNEL = {"fp8": "act_fp8", "nvfp4": "act_nvfp4"}


@dataclass
class Packed:
    """An NVFP4 linear as the decode GEMV streams it."""

    codes: Any  # device uint8 [R, C/2], element 2j in the low nibble of byte j
    scales: Any  # device uint8 [R, C/16], e4m3 bits
    gs: np.float32  # weight_scale_2
    rows: int
    cols: int

    @property
    def nbytes(self) -> int:
        return self.rows * self.cols // 2 + self.rows * self.cols // 16 + 4


@dataclass
class ActQuant:
    """The quantizer in front of one linear: kernel and its per-expert (or single) fp32 scale on the device."""

    fmt: str
    kernel: str
    scale: Any  # device fp32 [E] or [1]: input_scale (fp8), 1 / input_scale in fp32 (nvfp4: torch's g)


def packed_names(formats: dict[str, str]) -> list[str]:
    """The linears kept packed: NVFP4 and not MoE experts."""
    return [n for n, f in formats.items() if f == "nvfp4" and not n.endswith(EXPERTS)]


def act_scale(fmt: str, input_scale: torch.Tensor) -> np.ndarray:
    """The kernel's scale array: FP8 input_scale; NVFP4 g = 1 / input_scale divided in fp32 on the host, as
    torch_backend._act_nvfp4 does (`1.0 / input_scale.to(fp32)`)."""
    s = input_scale.to(torch.float32).reshape(-1)
    return np.ascontiguousarray((s if fmt == "fp8" else 1.0 / s).numpy(), np.float32)


def packed_host(stored: dict[str, torch.Tensor], name: str) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """(codes, block-scale bytes, global scale) of NVFP4 linear `name` from Checkpoint.stored."""
    codes = stored[name].contiguous().numpy()
    scales = stored[aux_name(name, "weight_scale")].contiguous().view(torch.uint8).numpy()
    return codes, scales, np.float32(stored[aux_name(name, "weight_scale_2")].float().item())


def act_elems(graph: Graph, names: list[str]) -> int:
    """Per decode token, the elements of the static buffer the quantized inputs go to: the widest quantized
    dense linear's input, or top_k x the expert input width (one row per (token, expert) pair; down_proj's
    inputs are quantized in place)."""
    c, n = graph.config, 0
    for name in names:
        if name.endswith("experts.up_proj"):
            n = max(n, c.num_experts_per_tok * c.moe_input_size)
        elif not name.endswith("experts.down_proj"):
            n = max(n, graph.param(name).shape[1])
    return n


def summary(graph: Graph, formats: dict[str, str], packed: dict[str, Packed], acts: list[str],
            itemsize: int) -> dict[str, Any]:
    """What describe() says: the formats, which linears stream packed, and the bytes of linear weights one decode
    token streams at batch 1 (MoE: top_k experts), against the same linears at the compute dtype."""
    c = graph.config
    streamed = dense = 0
    for t in graph.params:
        if not QUANTIZABLE.fullmatch(t.name):
            continue
        if t.name.endswith(EXPERTS):
            n = c.num_experts_per_tok * t.shape[1] * t.shape[2] * itemsize
            streamed, dense = streamed + n, dense + n
            continue
        full = t.shape[0] * t.shape[1] * itemsize
        dense += full
        streamed += packed[t.name].nbytes if t.name in packed else full
    return {"formats": dict(Counter(formats.values())), "packed_nvfp4": sorted(packed), "bits_per_packed_weight": 4.5,
            "held_dequantized": sorted(n for n in formats if n not in packed),
            "activations_quantized": len(acts),
            "decode_linear_bytes_per_token": streamed, "decode_linear_bytes_per_token_unpacked": dense}

"""The oracle over a checkpoint too big to hold: parameters read block by block from the memory-mapped
safetensors, in the oracle's dtype, only while their block runs.

`StreamedParams` is a read-only mapping from canonical name to tensor, so the interpreter (`run`,
`run_block`), localisation and the deviation probes use it exactly as they use the dict that
`Checkpoint.load` returns: same ops, same inputs, same numbers, bit for bit. What it changes is memory:

- a block's tensors are converted when the block first asks for one, and released as soon as a name
  of another block is asked for; peak parameter memory is the largest block in the oracle's dtype;
- the embedding table is never converted whole: `weight[ids]` gathers the rows a call needs from the
  stored (bf16, mmap'd) tensor and converts those;
- the LM head's weight is converted one slice of output rows at a time: the oracle computes the head
  by row slices in both modes (nemoh.oracle.ops.linear_by_rows), so the same BLAS calls see the same
  numbers (tests/core/test_stream_oracle.py checks it on every preset, with slices smaller than the
  vocabulary).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping

import torch

from nemoh import dtypes
from nemoh.model.ir import Graph
from nemoh.model.quant import act_key, aux_name
from nemoh.model.weights import Checkpoint

class RowGather:
    """The embedding table, stored: `self[ids]` converts only the gathered rows."""

    def __init__(self, stored: torch.Tensor, dtype: torch.dtype):
        self.stored, self.dtype = stored, dtype
        self.shape = stored.shape

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.stored[ids].to(self.dtype)


class RowSlices:
    """A linear layer's weight [N, K], stored: `self[r0:r1]` converts only those rows (what
    nemoh.oracle.ops.linear_by_rows asks for, one slice at a time)."""

    def __init__(self, stored: torch.Tensor, dtype: torch.dtype):
        self.stored, self.dtype = stored, dtype
        self.shape = stored.shape

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return self.stored[rows].to(self.dtype)


class StreamedParams(Mapping[str, torch.Tensor]):
    """`Checkpoint.load(graph)` without holding it: see the module docstring."""

    def __init__(self, ckpt: Checkpoint, graph: Graph):
        ckpt.validate(graph)
        self.ckpt, self.graph = ckpt, graph
        self.specs = {t.name: t for t in graph.params}
        self.block_of: dict[str, object] = {t.name: b.index if b.kind not in ("embed", "head") else b.kind
                                            for b in graph.blocks for t in b.params}
        # a quantized checkpoint (ModelOpt): its linears come dequantized, and the input scale of each one whose
        # activations are quantized is served under act_key(weight, format), as Checkpoint.load gives them
        self.formats = ckpt.formats(graph)
        self.act_keys = {act_key(n, f): n for n, f in self.formats.items()
                         if ckpt.aux.get(aux_name(n, "input_scale"))}
        self.block_of.update({k: self.block_of[n] for k, n in self.act_keys.items()})
        self.kv_keys = ckpt.kv_scales(graph)  # an FP8 KV cache's scales, under kv_key as Checkpoint.load gives them
        self.block_of.update({k: self.block_of[w] for k, (w, _) in self.kv_keys.items()})
        self.embedding = graph.embed.ops[0].params[0]
        self.head = graph.head.ops[-1].params[0]
        self._block: object = None
        self._held: dict[str, torch.Tensor] = {}
        self.peak_bytes = 0  # most parameter bytes held at once (converted tensors only)
        self.seconds: dict[str, float] = {}  # block ("embed", "0", ..., "head") -> wall time, reading included
        self.calls = 0
        self._t: float | None = None

    def begin(self) -> None:
        """Start timing one oracle call: each block's wall time (its reading, converting and computing) is
        added to `seconds` until `release()`."""
        self._t = time.perf_counter()
        self.calls += 1

    def __getitem__(self, name: str):  # a tensor, or a row-wise stand-in for one (the embedding, the head)
        if name not in self.block_of:
            raise KeyError(name)
        if name in self.kv_keys:
            return self.ckpt.read_kv(*self.kv_keys[name])
        if name in self.act_keys:
            scale = self.ckpt.read_aux(self.act_keys[name], "input_scale")
            assert scale is not None  # act_keys lists only linears that have one
            return scale.to(torch.float32, copy=True)
        dtype = dtypes.torch_dtype(self.specs[name].dtype)
        block = self.block_of[name]
        if block != self._block:
            self._held.clear()  # the previous block is done: its tensors go before this one's come
            self._lap()
            self._block = block
        fmt = self.formats.get(name)
        if fmt is not None:  # dequantized exactly in fp64 (one tensor at a time), then cast
            stored = self.ckpt.dequantized(name, fmt)
        else:
            stored = self.ckpt.read(name)
        if name == self.embedding:
            return RowGather(stored, dtype)
        if name == self.head:
            return RowSlices(stored, dtype)
        if name not in self._held:
            self._held[name] = stored.to(dtype, copy=True)
            self.peak_bytes = max(self.peak_bytes, sum(t.numel() * t.element_size() for t in self._held.values()))
        return self._held[name]

    def _lap(self) -> None:
        if self._t is not None and self._block is not None:
            now = time.perf_counter()
            key = str(self._block)
            self.seconds[key] = self.seconds.get(key, 0.0) + now - self._t
            self._t = now

    def release(self) -> None:
        """The call is over: its last block's tensors go, and its time is counted."""
        self._lap()
        self._t = None
        self._held.clear()
        self._block = None

    def __iter__(self) -> Iterator[str]:
        return iter(self.block_of)

    def __len__(self) -> int:
        return len(self.block_of)

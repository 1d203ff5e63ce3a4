"""Running a model through any backend: input validation, sessions, chunked prefill, generation.

Everything here is backend-neutral: it talks to a backend only through nemoh.backend.Backend.
Bad input is rejected here, once, with an InputError naming what is wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .backend import Backend
from .config import ModelConfig, load_config
from .errors import InputError, NemohError
from .ir import Graph, build_graph
from .registry import get_backend
from .weights import Checkpoint


def check_ids(ids: Any, vocab_size: int) -> torch.Tensor:
    """ids as an int64 [B, T] tensor with every id in [0, vocab_size)."""
    t = torch.as_tensor(ids)
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2 or t.shape[1] == 0:
        raise InputError(f"token ids must have shape [batch, tokens] with tokens >= 1, got {list(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise InputError(f"token ids must be integers, got {t.dtype}")
    bad = (t < 0) | (t >= vocab_size)
    if bool(bad.any()):
        b, p = (int(v) for v in bad.nonzero()[0])
        raise InputError(f"token id {int(t[b, p])} at [{b}, {p}] is out of range [0, {vocab_size}) "
                         f"for vocab_size {vocab_size}")
    return t.to(torch.int64)


def check_mask(mask: Any, shape: torch.Size, started: torch.Tensor | None) -> torch.Tensor | None:
    """A 0/1 mask of `shape` that is left padding only (no pad after a real token, across chunks)."""
    if mask is None:
        return None
    m = torch.as_tensor(mask)
    if m.dim() == 1:
        m = m[None]
    if tuple(m.shape) != tuple(shape):
        raise InputError(f"attention mask has shape {list(m.shape)}, expected {list(shape)} like the token ids")
    if not bool(((m == 0) | (m == 1)).all()):
        raise InputError("attention mask must hold only 0 (padding) and 1 (real token)")
    m = m.to(torch.int64)
    seen = torch.cummax(m, dim=1).values.bool()
    if started is not None:
        seen = seen | started[:, None]
    if bool((seen & (m == 0)).any()):
        b = int((seen & (m == 0)).nonzero()[0, 0])
        raise InputError(f"attention mask row {b} has padding after a real token; only left padding is supported")
    return m


@dataclass
class Model:
    """A loaded model: its config, graph, checkpoint and the backend running it."""

    path: Path
    config: ModelConfig
    graph: Graph
    checkpoint: Checkpoint
    backend: Backend

    def session(self, batch: int = 1) -> Session:
        return Session(self, batch)


def open_model(model: str | Path, backend: str | Backend = "torch", dtype: str | None = None,
               device: str | None = None) -> Model:
    """Resolve a checkpoint directory or preset name, build its graph and load it on a backend."""
    from .presets import resolve_model

    path = resolve_model(str(model))
    config = load_config(path)
    graph = build_graph(config, dtype or config.torch_dtype)
    be = get_backend(backend) if isinstance(backend, str) else backend
    ok = be.available()
    if not ok.ok:
        raise NemohError(f"backend '{be.name}' is not available here: {ok.reason}")
    ck = Checkpoint(path)
    be.load(graph, ck, device=device)
    return Model(path, config, graph, ck, be)


class Session:
    """A batch of sequences with carried state on one backend."""

    def __init__(self, model: Model, batch: int = 1):
        self.model, self.batch = model, batch
        self.state = model.backend.new_state(batch)
        self.started = torch.zeros(batch, dtype=torch.bool)  # has a real token been seen per row
        self.length = 0

    def forward(self, ids: Any, mask: Any = None, *, last_only: bool = False,
                trace: dict | None = None) -> torch.Tensor:
        ids = check_ids(ids, self.model.config.vocab_size)
        if ids.shape[0] != self.batch:
            raise InputError(f"token ids have batch {ids.shape[0]}, but this session holds {self.batch} sequences")
        m = check_mask(mask, ids.shape, self.started)
        out = self.model.backend.forward(self.state, ids, m, last_only=last_only, trace=trace)
        self.started |= (m.bool().any(1) if m is not None else torch.ones(self.batch, dtype=torch.bool))
        self.length += ids.shape[1]
        return out

    def prefill(self, ids: Any, mask: Any = None, chunks: Sequence[int] | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Prefill in chunks of the given lengths (summing to T); logits of all positions."""
        ids = check_ids(ids, self.model.config.vocab_size)
        T = ids.shape[1]
        chunks = list(chunks) if chunks else [T]
        if sum(chunks) != T or any(c <= 0 for c in chunks):
            raise InputError(f"prefill chunks {chunks} must be positive and sum to the {T} tokens")
        m = None if mask is None else torch.as_tensor(mask).reshape(ids.shape)
        outs, a = [], 0
        for c in chunks:
            outs.append(self.forward(ids[:, a:a + c], None if m is None else m[:, a:a + c], last_only=last_only))
            a += c
        return outs[-1] if last_only else torch.cat(outs, dim=1)

    def snapshot(self) -> Any:
        return (self.model.backend.copy_state(self.state), self.started.clone(), self.length)

    def restore(self, snap: Any) -> None:
        state, started, length = snap
        self.state, self.started, self.length = self.model.backend.copy_state(state), started.clone(), length


def greedy_generate(model: Model, ids: Any, n: int, mask: Any = None,
                    chunks: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding of `n` tokens after a (chunked) prefill.

    Returns (tokens [B, n] int64, logits [B, n, V]: the distribution each token was picked from).
    """
    ids = check_ids(ids, model.config.vocab_size)
    s = model.session(ids.shape[0])
    logits = s.prefill(ids, mask, chunks, last_only=True)[:, -1]
    toks, dists = [], []
    for _ in range(n):
        t = logits.argmax(-1)
        toks.append(t)
        dists.append(logits)
        if len(toks) < n:
            logits = s.forward(t[:, None], last_only=True)[:, -1]
    if not toks:
        return torch.zeros(ids.shape[0], 0, dtype=torch.int64), torch.zeros(ids.shape[0], 0, logits.shape[-1])
    return torch.stack(toks, 1), torch.stack(dists, 1)

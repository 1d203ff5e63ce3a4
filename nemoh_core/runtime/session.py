"""Running a model through any backend: input validation, sessions, chunked prefill, generation.

Everything here is backend-neutral: it talks to a backend only through nemoh.runtime.backend.Backend.
Bad input is rejected here, once, with an InputError naming what is wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nemoh.errors import InputError, NemohError
from nemoh.model.config import ModelConfig, load_config
from nemoh.model.ir import Graph, build_graph
from nemoh.model.weights import Checkpoint
from nemoh.runtime.backend import Backend
from nemoh.runtime.registry import get_backend


def check_device(device: str | None) -> torch.device | None:
    """A device nemoh can run on here, or an InputError naming it: bogus names, `meta` (no data),
    `cuda` without CUDA, `cuda:N` past the last GPU. None (the backend's default) passes."""
    if device is None:
        return None
    name = str(device).strip()
    try:
        d = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"--device {device!r}: not a device (use cpu, cuda or cuda:N)") from None
    if d.type == "cpu":
        return d
    if d.type != "cuda":
        raise InputError(f"--device {device!r}: device type '{d.type}' is not supported (use cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise InputError(f"--device {device!r}: CUDA is not available here (no GPU or no CUDA build of torch); "
                         "use --device cpu")
    n = torch.cuda.device_count()
    if d.index is not None and d.index >= n:
        raise InputError(f"--device {device!r}: there {'is' if n == 1 else 'are'} only {n} CUDA device(s) "
                         f"(cuda:0..cuda:{n - 1})")
    return d


def available_memory(device: str | torch.device | None) -> int | None:
    """Bytes that can still be allocated on `device` (None: unknown)."""
    d = torch.device(device) if device is not None else torch.device("cpu")
    if d.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(d)[0])
        except Exception:
            return None
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return (int(info["MemAvailable"].split()[0]) + int(info.get("SwapFree", "0 kB").split()[0])) * 1024
    except (OSError, KeyError, ValueError):
        return None


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def check_fits(graph: Graph, device: str | torch.device | None = None, *, batch: int = 1, tokens: int = 0) -> None:
    """Refuse up front a model (weights at the graph's dtype) plus the activations of `batch` x
    `tokens` that cannot fit in the memory left on `device`, instead of a multi-GB allocation failure."""
    c = graph.config
    from nemoh import dtypes

    weights = sum(t.nbytes for t in graph.params)
    item = dtypes.ITEMSIZE[graph.dtype]
    width = max(c.hidden_size, c.in_proj_dim, c.intermediate_size if "mlp" in c.layer_types else 0,
                c.num_attention_heads * c.head_dim)
    # logits (fp32) + a few live activations of the widest layer + the carried state
    acts = batch * tokens * (4 * c.vocab_size + 4 * width * item + graph.state_bytes_per_token)
    acts += batch * graph.state_bytes_per_sequence
    have = available_memory(device)
    if have is not None and weights + acts > have:
        where = str(device or "cpu")
        raise InputError(f"{c.source}: the model needs about {_human(weights)} of weights"
                         + (f" + {_human(acts)} of activations for {batch}x{tokens} tokens" if tokens else "")
                         + f" at {graph.dtype}, but only {_human(have)} is available on {where}")


def check_generation(config: ModelConfig, prompt_tokens: int, new_tokens: int) -> None:
    """`new_tokens` >= 1 and prompt + new tokens within the config's max_position_embeddings."""
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise InputError(f"-n/--max-new-tokens must be a positive integer, got {new_tokens!r}")
    limit = config.max_position_embeddings
    if prompt_tokens > limit:
        raise InputError(f"the prompt has {prompt_tokens} tokens, more than the model's max_position_embeddings "
                         f"({limit}, {config.source})")
    if prompt_tokens + new_tokens > limit:
        raise InputError(f"-n {new_tokens}: {prompt_tokens} prompt tokens + {new_tokens} new tokens exceed the "
                         f"model's max_position_embeddings ({limit}, {config.source})")


def check_ids(ids: Any, vocab_size: int) -> torch.Tensor:
    """ids as an int64 [B, T] tensor with every id in [0, vocab_size)."""
    try:
        t = torch.as_tensor(ids)
    except (RuntimeError, OverflowError, TypeError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"token ids must be integers in [0, {vocab_size}) ({msg})") from None
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
    from nemoh.model.presets import resolve_model

    check_device(device)
    path = resolve_model(str(model))
    config = load_config(path)
    graph = build_graph(config, dtype or config.torch_dtype)
    check_fits(graph, device)
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

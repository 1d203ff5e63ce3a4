"""The backend protocol: the small, fixed surface every executor implements.

A backend is one file (plus its kernel sources) in `backends/` or in a third-party package,
registered under the entry-point group `nemoh.backends` (see nemoh.registry). The harness never
branches on backend names: everything it needs goes through these methods.

Data crosses the protocol as CPU `torch.Tensor`s (the lingua franca; a backend converts at its
edge): token ids int64 [B, T], masks int/bool [B, T], logits float32 [B, T, V] (float64 when the
graph computes in float64). State is opaque to
the caller except through `export_state`/`import_state`, whose keys are the IR's StateSpec names
(`layers.{i}.conv` [B, C, K-1], `layers.{i}.ssm` [B, H, P, N], `layers.{i}.k`/`.v` [B, S, KV, Dh])
plus `mask` [B, S] (1 for each real cached token).

Input validation (token ids in range, shapes, left padding) happens once, in nemoh.runtime, before
a backend sees the data.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch

from .ir import Graph
from .weights import Checkpoint


class Support(NamedTuple):
    """A capability answer: ok, or not with a reason a user can read."""

    ok: bool
    reason: str = ""

    @classmethod
    def yes(cls) -> Support:
        return cls(True, "")

    @classmethod
    def no(cls, reason: str) -> Support:
        return cls(False, reason)


@runtime_checkable
class Backend(Protocol):
    #: registry name, e.g. "torch"
    name: str

    def available(self) -> Support:
        """Can this backend run on this machine at all (libraries, device)? Cheap; loads nothing."""

    def supports(self, op_kind: str, dtype: str) -> Support:
        """Can it run IR op `op_kind` (see nemoh.ir.OP_KINDS) at compute dtype `dtype`?"""

    def load(self, graph: Graph, checkpoint: Checkpoint, *, device: str | None = None) -> None:
        """Prepare to run `graph` (its dtype is the compute dtype) with the checkpoint's tensors.

        `checkpoint` is a nemoh.weights.Checkpoint or any object with the same `load(graph)` and
        `read(name)` methods (nemoh-bench passes random weights built in memory, possibly already
        on the device); a backend moves what it gets to where it computes.
        """

    def new_state(self, batch: int) -> Any:
        """Empty carried state for `batch` fresh sequences."""

    def copy_state(self, state: Any) -> Any:
        """An independent snapshot of `state` (later forwards on either leave the other intact)."""

    def forward(self, state: Any, ids: torch.Tensor, mask: torch.Tensor | None = None, *,
                last_only: bool = False, trace: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Run T >= 1 new tokens on `state` (updated in place); prefill chunks and decode steps alike.

        ids [B, T] int64, mask [B, T] (0 marks left padding) -> float32 logits [B, T, V], or
        [B, 1, V] with `last_only`. If `trace` is a dict and the backend can, it receives op outputs
        keyed by IR op name and the residual stream after each layer as `layers.{i}`.
        """

    def export_state(self, state: Any) -> dict[str, torch.Tensor]:
        """The carried state as CPU tensors keyed by StateSpec name (and `mask`)."""

    def import_state(self, tensors: dict[str, torch.Tensor]) -> Any:
        """The inverse of export_state."""

    def read_param(self, name: str) -> torch.Tensor:
        """A loaded parameter, as the backend holds it, copied to the CPU (for bit-equality checks)."""

    def describe(self) -> dict[str, Any]:
        """What ran: device, provider, library versions. Goes into every result."""

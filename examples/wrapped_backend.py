"""A complete third-party nemoh backend: it wraps the built-in PyTorch executor.

Every method of the protocol (nemoh.backend.Backend) is here, each delegating to the wrapped
backend, plus one thing of its own: it counts forward calls and tokens and reports them in
`describe()`, which lands in every conformance result. Replace the delegation with your engine's
calls to test your own port.

Run it without installing anything (the module only has to be importable):

    PYTHONPATH=examples nemoh conformance --model tiny-moe --backend wrapped_backend:WrappedTorch

or register it from your package's pyproject.toml, exactly like nemoh's built-ins:

    [project.entry-points."nemoh.backends"]
    wrapped = "wrapped_backend:WrappedTorch"

and then `nemoh conformance --model tiny-moe --backend wrapped`.
"""

from __future__ import annotations

from typing import Any

import torch

from nemoh.backend import Support
from nemoh.backends.torch_backend import TorchBackend


class WrappedTorch:
    name = "wrapped-torch"

    def __init__(self) -> None:
        self.inner = TorchBackend()
        self.calls = 0
        self.tokens = 0

    def available(self) -> Support:
        return self.inner.available()

    def supports(self, op_kind: str, dtype: str) -> Support:
        if dtype == "float16":
            return Support.no("this example declines float16 to show how NOT_SUPPORTED is reported")
        return self.inner.supports(op_kind, dtype)

    def load(self, graph, checkpoint, *, device: str | None = None) -> None:
        self.inner.load(graph, checkpoint, device=device)

    def new_state(self, batch: int) -> Any:
        return self.inner.new_state(batch)

    def copy_state(self, state: Any) -> Any:
        return self.inner.copy_state(state)

    def forward(self, state: Any, ids: torch.Tensor, mask: torch.Tensor | None = None, *,
                last_only: bool = False, trace: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        self.calls += 1
        self.tokens += ids.numel()
        return self.inner.forward(state, ids, mask, last_only=last_only, trace=trace)

    def export_state(self, state: Any) -> dict[str, torch.Tensor]:
        return self.inner.export_state(state)

    def import_state(self, tensors: dict[str, torch.Tensor]) -> Any:
        return self.inner.import_state(tensors)

    def read_param(self, name: str) -> torch.Tensor:
        return self.inner.read_param(name)

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "backend": self.name, "wraps": "torch",
                "forward_calls_so_far": self.calls, "tokens_so_far": self.tokens}

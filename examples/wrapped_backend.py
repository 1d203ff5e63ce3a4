"""A complete third-party nemoh backend: it wraps the built-in PyTorch executor and counts calls.

nemoh.runtime.backend.BackendBase gives the defaults (available, supports from `dtypes`,
supports_graph, copy_state, describe) and names the backend, method, op, shapes and dtype in
any error. Replace the delegation with your engine's calls to test your own port:

    PYTHONPATH=examples nemoh conformance --model tiny-moe --backend wrapped_backend:WrappedTorch

or register it in your pyproject.toml under [project.entry-points."nemoh.backends"]:
`wrapped = "wrapped_backend:WrappedTorch"`, then `--backend wrapped`.
"""

from nemoh.backends.torch_backend import TorchBackend
from nemoh.runtime.backend import BackendBase


class WrappedTorch(BackendBase):
    name = "wrapped-torch"
    dtypes = ("float64", "float32", "bfloat16")  # declines float16, to show NOT_SUPPORTED

    def __init__(self):
        self.inner, self.calls = TorchBackend(), 0
        self.load, self.new_state, self.read_param = self.inner.load, self.inner.new_state, self.inner.read_param
        self.export_state, self.import_state = self.inner.export_state, self.inner.import_state

    def forward(self, state, ids, mask=None, *, last_only=False, trace=None):
        self.calls += 1
        return self.inner.forward(state, ids, mask, last_only=last_only, trace=trace)

    def describe(self):
        return {**self.inner.describe(), **super().describe(), "wraps": "torch", "forward_calls_so_far": self.calls}

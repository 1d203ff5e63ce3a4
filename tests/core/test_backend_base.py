"""The backend base class and the protocol: defaults, error wrapping that names backend, method, op,
shapes and dtype, `supports_graph` as a NOT_SUPPORTED answer, and the method list written once."""

from __future__ import annotations

import re

import pytest
import torch

from nemoh.backends.torch_backend import TorchBackend
from nemoh.errors import NemohError
from nemoh.model.config import load_config
from nemoh.model.ir import build_graph
from nemoh.model.presets import resolve_model
from nemoh.runtime.backend import Backend, BackendBase, BackendError, Support, protocol_methods, unsupported_reason
from nemoh.runtime.registry import get_backend
from nemoh.runtime.session import open_model


class FailsInSsd(TorchBackend):
    name = "fails-in-ssd"

    def _ssd(self, *a, **kw):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")


class TooBig(TorchBackend):
    name = "too-big"

    def supports_graph(self, graph, device=None):
        return Support.no(f"hidden_size {graph.config.hidden_size} is above this engine's 32")


class Minimal(BackendBase):
    """Only the methods that compute; everything else comes from the base."""

    name = "minimal"
    dtypes = ("float32",)

    def __init__(self):
        self.inner = TorchBackend()

    def load(self, graph, checkpoint, *, device=None):
        self.graph = graph
        self.inner.load(graph, checkpoint, device=device)

    def new_state(self, batch):
        return self.inner.new_state(batch)

    def forward(self, state, ids, mask=None, *, last_only=False, trace=None):
        return self.inner.forward(state, ids, mask, last_only=last_only, trace=trace)

    def export_state(self, state):
        return self.inner.export_state(state)

    def import_state(self, tensors):
        return self.inner.import_state(tensors)

    def read_param(self, name):
        return self.inner.read_param(name)


def graph(name="tiny-moe", dtype="float32"):
    return build_graph(load_config(resolve_model(name)), dtype)


def test_the_protocol_lists_its_methods_once_and_the_registry_checks_them():
    assert set(protocol_methods()) == {"available", "supports", "supports_graph", "load", "new_state", "copy_state",
                                       "forward", "export_state", "import_state", "read_param", "describe"}
    assert isinstance(Minimal(), Backend)
    with pytest.raises(NemohError, match=r"does not implement the nemoh backend protocol \(missing: .*supports_graph"):
        get_backend("test_backend_base:Incomplete")


class Incomplete:
    """Everything but supports_graph: an old third-party backend gets told what is missing."""

    name = "incomplete"

    def __getattr__(self, attr):
        if attr in protocol_methods() and attr != "supports_graph":
            return lambda *a, **kw: None
        raise AttributeError(attr)


def test_base_defaults():
    be = Minimal()
    assert be.available().ok and be.supports("ssd_scan", "float32").ok and be.supports_graph(graph()).ok
    assert not be.supports("rope", "float32").ok
    no = be.supports("linear", "bfloat16")
    assert not no.ok and no.reason == "minimal runs float32 only, not bfloat16"
    d = be.describe()
    assert d["backend"] == "minimal" and d["class"].endswith("Minimal")


def test_copy_state_defaults_to_import_of_export_and_is_independent():
    m = open_model(resolve_model("tiny-moe"), Minimal(), "float32", "cpu")
    s = m.session(1)
    s.prefill(torch.randint(4, 512, (1, 20), generator=torch.Generator().manual_seed(1)))
    before = m.backend.export_state(s.state)
    snap = m.backend.copy_state(s.state)
    s.forward(torch.tensor([[9, 10]]))  # moves the original on
    after = m.backend.export_state(snap)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not torch.equal(m.backend.export_state(s.state)["layers.0.ssm"], after["layers.0.ssm"])


def test_errors_name_backend_method_op_shapes_and_dtype():
    m = open_model(resolve_model("tiny-moe"), FailsInSsd(), "float32", "cpu")
    with pytest.raises(BackendError) as e:
        m.backend.forward(m.backend.new_state(2), torch.ones(2, 5, dtype=torch.int64))
    msg = str(e.value)
    assert msg == ("backend 'fails-in-ssd' forward(TorchState, [2, 5] int64) at float32 at layers.0.mixer (mamba): "
                   "RuntimeError: CUDA error: an illegal memory access was encountered")
    assert "\n" not in msg and isinstance(e.value.__cause__, RuntimeError)


def test_a_user_error_from_a_backend_stays_a_user_error():
    be = TorchBackend()
    with pytest.raises(NemohError):  # not wrapped into a BackendError: it is bad input, exit 2
        open_model("tiny-moee", be, "float32", "cpu")


def test_unsupported_reason_says_each_reason_once():
    assert unsupported_reason(TorchBackend(), graph()) == ""
    why = unsupported_reason(Minimal(), graph(dtype="bfloat16"))
    assert why.count("runs float32 only") == 1 and why.startswith("backend 'minimal' cannot run bfloat16: ")
    assert "ops: " in why and "ssd_scan" in why
    assert unsupported_reason(TooBig(), graph()) == ("backend 'too-big' cannot run this model at float32: "
                                                     "hidden_size 64 is above this engine's 32")


@pytest.mark.parametrize("spec,says", [
    ("nemoh.cli:main", "exited (SystemExit 2) instead of returning a backend"),
    ("os:system", "raised TypeError"),
    (":", "is not of the form package.module:attribute"),
    ("builtins:exit", "exited"),
])
def test_bad_factory_specs_are_one_line_errors(spec, says, capsys):
    with pytest.raises(NemohError, match=re.escape(says)) as e:
        get_backend(spec)
    assert "\n" not in str(e.value)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""  # nemoh's own main, run as a factory, printed nothing

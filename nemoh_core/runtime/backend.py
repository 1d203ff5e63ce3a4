"""The backend protocol: the small, fixed surface every executor implements.

A backend is one file (plus its kernel sources) in `backends/` or in a third-party package,
registered under the entry-point group `nemoh.backends` (see nemoh.runtime.registry). The harness never
branches on backend names: everything it needs goes through these methods.

`Backend` is the protocol (the method list, written once: the registry checks against it).
`BackendBase` is the short way to implement it: it gives the defaults (`available`, `supports` from
a `dtypes` attribute, `supports_graph`, `copy_state` as import(export), `describe`) and wraps every
failure of the backend's own methods in a `BackendError` that names the backend, the method, the op
it was in (`with self.at("layers.3.mixer.ssd"):`), the input shapes and the dtype.

Data crosses the protocol as CPU `torch.Tensor`s (the lingua franca; a backend converts at its
edge): token ids int64 [B, T], masks int/bool [B, T], logits float32 [B, T, V] (float64 when the
graph computes in float64). State is opaque to
the caller except through `export_state`/`import_state`, whose keys are the IR's StateSpec names
(`layers.{i}.conv` [B, C, K-1], `layers.{i}.ssm` [B, H, P, N], `layers.{i}.k`/`.v` [B, S, KV, Dh])
plus `mask` [B, S] (1 for each real cached token).

Input validation (token ids in range, shapes, left padding) happens once, in nemoh.runtime.session, before
a backend sees the data.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any, NamedTuple, Protocol, cast, runtime_checkable

import torch

from nemoh import dtypes
from nemoh.errors import NemohError
from nemoh.model.ir import OP_KINDS, Graph
from nemoh.model.weights import Checkpoint


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
        """Can it run IR op `op_kind` (see nemoh.model.ir.OP_KINDS) at compute dtype `dtype`?"""

    def supports_graph(self, graph: Graph, device: str | None = None) -> Support:
        """Can it run this whole model here (size, dimensions its kernels handle)? Asked before `load`,
        so that a model it can't run is NOT_SUPPORTED with the reason instead of a failed load."""

    def load(self, graph: Graph, checkpoint: Checkpoint, *, device: str | None = None) -> None:
        """Prepare to run `graph` (its dtype is the compute dtype) with the checkpoint's tensors.

        `checkpoint` is a nemoh.model.weights.Checkpoint or any object with the same `load(graph)` and
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


#: what a backend may be unable to do without failing a model: hand its carried state out
#: (`export_state`/`import_state`, e.g. llama.cpp keeps its recurrent state inside), hold the
#: checkpoint's parameters bit for bit (a quantizing engine holds other numbers on purpose), and run a
#: ModelOpt FP8 / NVFP4 checkpoint as it means (`quant_fp8`, `quant_nvfp4`: weights as stored AND each
#: quantized linear's input quantized; an executor that only dequantizes the weights computes another
#: model; `quant_kv_fp8`: the FP8 KV cache a checkpoint's kv_cache_quant_algo asks for). A backend that
#: cannot lists the name in `optional_capabilities` and answers it in `supports`.
OPTIONAL_CAPABILITIES = ("state_export", "param_bit_equal", "quant_fp8", "quant_nvfp4", "quant_kv_fp8")


def capability(backend: Backend, name: str, dtype: str) -> Support:
    """Can `backend` do optional thing `name` at `dtype`? Asked only of a backend that lists it in its
    `optional_capabilities`; every other backend has it. The suites turn a no into NOT_SUPPORTED for
    what needs it (state comparisons, bit-equal weights) and still judge everything else."""
    if name not in OPTIONAL_CAPABILITIES:
        raise ValueError(f"unknown optional capability {name!r}; known: {', '.join(OPTIONAL_CAPABILITIES)}")
    if name not in getattr(backend, "optional_capabilities", ()):
        return Support.yes()
    return backend.supports(name, dtype)


def protocol_methods() -> list[str]:
    """The protocol's method names, read from `Backend` itself (the one copy of the list)."""
    return [n for n, v in vars(Backend).items() if callable(v) and not n.startswith("_")]


class ModelNotSupported(Exception):
    """Raised by a backend's `load` when, having read the checkpoint, it finds it cannot run this model at all:
    what `supports_graph` cannot know from the graph alone (e.g. an engine's own converter refuses the file).
    `str(err)` is the reason, one line; the model's cases are NOT_SUPPORTED with it, not FAIL."""


class BackendError(Exception):
    """A backend's own method failed. Charged to the backend, never to the harness.

    `context` is what the wrapper knows (backend, method, shapes, dtype, op) and `cause` the first
    line of the original error, each held once: a reader that shows the cause first and the context
    after (nemoh.conformance.blame.describe_exc) repeats neither."""

    def __init__(self, message: str, *, context: str = "", cause: str = ""):
        super().__init__(message)
        self.context, self.cause = context, cause


def _shape(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"{list(x.shape)} {str(x.dtype).removeprefix('torch.')}"
    if isinstance(x, dict):
        return f"dict of {len(x)}"
    return type(x).__name__


_WRAPPED = ("load", "new_state", "copy_state", "forward", "export_state", "import_state", "read_param")


def _wrap(method):
    @functools.wraps(method)
    def call(self: BackendBase, *args: Any, **kw: Any) -> Any:
        if getattr(self, "_nemoh_in_call", False):  # a wrapped method calling another: wrap once
            return method(self, *args, **kw)
        self._nemoh_in_call, self._nemoh_at = True, ""
        try:
            return method(self, *args, **kw)
        except (NemohError, BackendError, ModelNotSupported):
            raise
        except Exception as e:
            graph = getattr(self, "graph", None)
            dtype = getattr(graph, "dtype", None) or "?"
            args_s = ", ".join(_shape(a) for a in args if a is not None)
            where = f" at {self._nemoh_at}" if self._nemoh_at else ""
            first = (str(e).splitlines() or [""])[0]
            context = f"backend '{self.name}' {method.__name__}({args_s}) at {dtype}{where}"
            cause = f"{type(e).__name__}: {first}"
            raise BackendError(f"{context}: {cause}", context=context, cause=cause) from e
        finally:
            self._nemoh_in_call = False

    call.__nemoh_wrapped__ = True  # type: ignore[attr-defined]  # functools.wraps' _Wrapped declares no own attributes
    return call


class BackendBase:
    """Defaults for the protocol and error wrapping; subclass it and write the methods that compute.

    Required: `name`, `load`, `new_state`, `forward`, `export_state`, `import_state`, `read_param`.
    Optional overrides: `dtypes` (the compute dtypes it runs, default all), `available`, `supports`,
    `supports_graph`, `copy_state` (a faster snapshot), `describe` (call super() and add to it).
    """

    name: str = "unnamed"
    #: compute dtypes this backend runs; `supports` answers NOT_SUPPORTED for the others
    dtypes: tuple[str, ...] = dtypes.NAMES
    #: the OPTIONAL_CAPABILITIES this backend may lack; `supports(name, dtype)` answers each
    optional_capabilities: tuple[str, ...] = ()
    _nemoh_at = ""
    _nemoh_in_call = False

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        for m in _WRAPPED:
            fn = cls.__dict__.get(m)
            if fn is not None and not getattr(fn, "__nemoh_wrapped__", False):
                setattr(cls, m, _wrap(fn))

    @contextlib.contextmanager
    def at(self, where: str) -> Iterator[None]:
        """Name the op being computed: a failure inside is reported `at <where>`."""
        outer = self._nemoh_at
        self._nemoh_at = where
        yield  # on an exception the innermost name stays for the error message
        self._nemoh_at = outer

    def available(self) -> Support:
        return Support.yes()

    def supports(self, op_kind: str, dtype: str) -> Support:
        if op_kind in OPTIONAL_CAPABILITIES:
            return Support.yes()
        if op_kind not in OP_KINDS:
            return Support.no(f"unknown op kind {op_kind!r}")
        if dtype not in self.dtypes:
            return Support.no(f"{self.name} runs {', '.join(self.dtypes)} only, not {dtype}")
        return Support.yes()

    def supports_graph(self, graph: Graph, device: str | None = None) -> Support:
        return Support.yes()

    def copy_state(self, state: Any) -> Any:
        be = cast(Backend, self)  # export_state / import_state are the subclass's (required above)
        return be.import_state(be.export_state(state))

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "class": f"{type(self).__module__}.{type(self).__qualname__}"}


def unsupported_reason(backend: Backend, graph: Graph, device: str | None = None, quant: str | None = None,
                       kv_cache: str | None = None) -> str:
    """Why `backend` can't run `graph` here, each distinct reason said once; "" when it can.

    Asked before anything is loaded: availability, then the checkpoint's quantization format (`quant`:
    'fp8', 'nvfp4' or None, as nemoh.model.quant.QuantConfig.fmt) and KV-cache format (`kv_cache`: 'fp8' or
    None), then every op kind at the graph's dtype,
    then the whole graph (size, dimensions its kernels handle)."""
    ok = backend.available()
    if not ok.ok:
        return f"backend '{backend.name}' is not available here: {ok.reason}"
    if quant is not None:
        q = capability(backend, f"quant_{quant}", graph.dtype)
        if not q.ok:
            return f"backend '{backend.name}' cannot run a ModelOpt {quant.upper()} checkpoint as it means: {q.reason}"
    if kv_cache is not None:
        q = capability(backend, f"quant_kv_{kv_cache}", graph.dtype)
        if not q.ok:
            return (f"backend '{backend.name}' cannot keep the {kv_cache.upper()} KV cache the checkpoint asks for: "
                    f"{q.reason}")
    by_reason: dict[str, list[str]] = {}
    for kind in sorted({op.kind for b in graph.blocks for op in b.ops}):
        answer = backend.supports(kind, graph.dtype)
        if not answer.ok:
            by_reason.setdefault(answer.reason, []).append(kind)
    if by_reason:
        return f"backend '{backend.name}' cannot run {graph.dtype}: " + "; ".join(
            f"{reason} (ops: {', '.join(kinds)})" for reason, kinds in by_reason.items())
    whole = backend.supports_graph(graph, device)
    return "" if whole.ok else f"backend '{backend.name}' cannot run this model at {graph.dtype}: {whole.reason}"

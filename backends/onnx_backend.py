"""The ONNX Runtime executor: the IR lowered to one ONNX graph (nemoh.backends.onnx_export), run by
onnxruntime with the carried state bound as OrtValues.

Every forward (a prefill chunk or a decode step alike) runs the same graph through IO binding:
token ids and the key mask go in from the host, the state goes in and comes out as OrtValues on
the session's device, logits come back to the host. On the CPU execution provider the device is
host memory; with onnxruntime-gpu and a GPU (`device="cuda"` or the default when the CUDA
provider is installed) the state stays in GPU memory between steps and only ids, mask and logits
cross PCIe. The CUDA path is the same code with another device name; it has not been run on this
project's CPU-only machines.

The session runs a file: `load` writes the lowered model to a temporary directory as `nemoh
export-onnx` does (model.onnx + model.onnx.data; `describe()["model_file"]`), and `read_param` reads
the initializers back from it, so bit-equality is checked on what onnxruntime actually loaded.

OrtValues are never written after a run returns them (each run binds fresh outputs, and
onnxruntime never writes into inputs), so a state snapshot can share them: `copy_state` is cheap.

What runs where is found out, not assumed: `supports(op, dtype)` lowers a tiny model covering all
op kinds at that dtype and asks onnxruntime to build and run it on the chosen providers; when that
fails, each op kind's nodes are extracted and tried alone, and the error of the ones that fail is
the reason. On the CPU provider (onnxruntime 1.32) that gives: float32 and float64 everything;
float16 everything, but onnxruntime computes the fp16 nodes it has no CPU kernel for (MatMul among
them) in fp32 between casts it inserts ("InsertedPrecisionFreeCast_*" in the optimised graph), so
its fp16 is fp16 storage with mostly fp32 arithmetic; bfloat16 not supported (no bf16 kernels for
Add, Mul, MatMul, Exp, ... on the CPU provider). float64 is supported on purpose: it checks the
lowering against the fp64 oracle to ~1e-14, where a lowering bug cannot hide under fp32 rounding.

`trace` is supported: on first use a second session is built from the same lowering with every IR
op's first output and each layer's residual stream as extra graph outputs.
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nemoh import dtypes
from nemoh.errors import NemohError
from nemoh.model.ir import OP_KINDS, Graph
from nemoh.model.weights import Checkpoint
from nemoh.runtime.backend import BackendBase, Support

# A tiny config with every op kind (mamba, attention, mlp, latent group-limited MoE with a shared
# expert): what `supports` lowers and runs to find out what the providers can do.
_PROBE_CONFIG = {
    "model_type": "nemotron_h", "hybrid_override_pattern": "M*-E", "vocab_size": 16, "hidden_size": 8,
    "mamba_num_heads": 4, "mamba_head_dim": 2, "n_groups": 2, "ssm_state_size": 2, "chunk_size": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4, "intermediate_size": 8,
    "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 4,
    "moe_shared_expert_intermediate_size": 4, "n_shared_experts": 1, "moe_latent_size": 4, "n_group": 2,
    "topk_group": 1, "torch_dtype": "float32",
}


def _np_dtype(dtype: str):
    if dtype == "bfloat16":  # numpy has no bf16; ml_dtypes (an onnx dependency) does
        import ml_dtypes

        return ml_dtypes.bfloat16
    return {"float64": np.float64, "float32": np.float32, "float16": np.float16, "int64": np.int64}[dtype]


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """A host copy of `t` as numpy (bf16 through its bits)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().copy().view(_np_dtype("bfloat16"))
    return t.numpy().copy()


def _to_torch(a: np.ndarray) -> torch.Tensor:
    """A torch copy of `a` (never a view of onnxruntime-owned memory)."""
    if a.dtype == _np_dtype("bfloat16"):
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(a, copy=True))


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _make_session(src: bytes | str, providers: list):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only: the provider actually used is checked, not logged
    return ort.InferenceSession(src, sess_options=so, providers=providers)


def _zero_feeds(graph: Graph, batch: int, tokens: int) -> dict[str, np.ndarray]:
    feeds = {"input_ids": np.ones((batch, tokens), np.int64), "attention_mask": np.ones((batch, tokens), np.int64),
             "logits_to_keep": np.array(0, np.int64)}
    for s in graph.states:
        shape = (batch, 0, *s.shape) if s.per_token else (batch, *s.shape)
        feeds[f"past.{s.name}"] = np.zeros(shape, _np_dtype(s.dtype))
    return feeds


@functools.cache
def _probe(dtype: str, providers: tuple) -> dict[str, Support]:
    """op kind -> can `providers` build and run its lowering at `dtype`? (see module docstring)"""
    import onnx
    import onnxruntime as ort

    from nemoh.model.config import parse_config
    from nemoh.model.ir import build_graph

    from .onnx_export import lower_graph

    graph = build_graph(parse_config(_PROBE_CONFIG, "<onnx probe config>"), dtype)
    gen = torch.Generator().manual_seed(0)
    params = {t.name: torch.rand(t.shape, generator=gen).to(dtypes.torch_dtype(t.dtype)) for t in graph.params}
    model = lower_graph(graph, params)
    where = f"onnxruntime {ort.__version__} on {providers[0]}"
    try:
        logits = _make_session(model.SerializeToString(), list(providers)).run(["logits"], _zero_feeds(graph, 1, 5))[0]
        if not np.isfinite(logits).all():
            raise RuntimeError("the probe model's logits are not finite")
        return {k: Support.yes() for k in OP_KINDS}
    except Exception as e:  # find out which op kinds fail, one at a time
        whole = _first_line(e)
    inferred = onnx.shape_inference.infer_shapes(model)
    ex = onnx.utils.Extractor(inferred)
    scope_of = {o: n.name.split("/")[0] for n in model.graph.node for o in n.output}
    graph_inputs = [i.name for i in model.graph.input]
    out: dict[str, Support] = {}
    for kind in OP_KINDS:
        op = next(o for b in graph.blocks for o in b.ops if o.kind == kind and (kind != "add" or len(o.inputs) == 2))
        mine = [n for n in model.graph.node if n.name.split("/")[0] == op.name]
        made = {o for n in mine for o in n.output}
        # inputs made by other IR ops become inputs of the extracted model; constants and the shared
        # mask / chunk-geometry nodes come along (they start from the graph inputs)
        ext = {i for n in mine for i in n.input if i in scope_of and i not in made
               and not scope_of[i].startswith(("const", "shared."))}
        try:
            sub = ex.extract_model(sorted(ext) + graph_inputs, sorted(made))
            _make_session(sub.SerializeToString(), list(providers))
            out[kind] = Support.yes()
        except Exception as e:
            out[kind] = Support.no(f"{where} cannot run {kind} at {dtype}: {_first_line(e)}")
    if all(s.ok for s in out.values()):  # each part builds alone, the whole does not
        out = {k: Support.no(f"{where}: the {dtype} probe model fails as a whole: {whole}") for k in OP_KINDS}
    return out


@dataclass
class OnnxState:
    tensors: dict[str, Any]  # StateSpec name -> OrtValue on the session device
    mask: torch.Tensor  # [B, S] bool on the host, True for real cached tokens
    batch: int = 1


class OnnxBackend(BackendBase):
    """Implements nemoh.runtime.backend.Backend with onnxruntime on the graph lowered from the IR."""

    name = "onnx"
    optional_capabilities = ("quant_fp8", "quant_nvfp4", "quant_kv_fp8")

    def __init__(self) -> None:
        self.graph: Graph | None = None
        self.session: Any = None  # an onnxruntime.InferenceSession once loaded
        self._trace_session: Any = None
        self._checkpoint: Checkpoint | None = None
        self._inits: dict[str, Any] = {}
        self._base: Path | None = None  # the directory of the model file the session runs
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._providers: list = ["CPUExecutionProvider"]
        self.device_type, self.device_id = "cpu", 0

    # -- capabilities -------------------------------------------------------------------------
    def available(self) -> Support:
        try:
            import onnx  # noqa: F401  (the lowering)
            import onnxruntime  # noqa: F401
        except ImportError as e:
            return Support.no(f"onnx/onnxruntime are not importable ({e}); install them with: "
                              "pip install 'nemoh[onnx]' (or onnxruntime-gpu for the CUDA provider)")
        return Support.yes()

    def supports(self, op_kind: str, dtype: str) -> Support:
        if op_kind == "quant_kv_fp8":
            return Support.no("the ONNX lowering keeps the KV cache at the compute dtype")
        if op_kind in ("quant_fp8", "quant_nvfp4"):
            return Support.no("the ONNX lowering reads the weights dequantized but does not quantize the linears' "
                              "inputs (W8A8 / W4A4), so it would compute another model (docs/quantized-formats.md)")
        ok = super().supports(op_kind, dtype)
        if ok.ok:
            ok = self.available()
        if not ok.ok:
            return ok
        providers = self._providers if self.session is not None else self._choose_providers(None)[0]
        return _probe(dtype, tuple(p if isinstance(p, str) else p[0] for p in providers))[op_kind]

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = super().describe()
        try:
            import onnx
            import onnxruntime as ort

            d.update(onnxruntime=ort.__version__, onnx=onnx.__version__)
        except ImportError as e:
            d["unavailable"] = str(e)
            return d
        from .onnx_export import OPSET

        d.update(opset=OPSET, io_binding=True, trace="supported (a second session with per-op outputs, built on "
                                                      "first use)")
        if self.session is None:
            d["device"] = "not loaded"
            return d
        graph, session, base = self._loaded()
        providers = session.get_providers()
        d.update(device=self.device_type if self.device_type == "cpu" else f"{self.device_type}:{self.device_id}",
                 provider=providers[0], providers=providers, dtype=graph.dtype,
                 model_file=str(base / "model.onnx"),
                 intra_op_threads=session.get_session_options().intra_op_num_threads or "default (physical cores)")
        return d

    # -- loading ------------------------------------------------------------------------------
    def _choose_providers(self, device: str | None) -> tuple[list, str, int]:
        import onnxruntime as ort

        have = ort.get_available_providers()
        if device is None:
            device = "cuda" if "CUDAExecutionProvider" in have else "cpu"
        kind, _, idx = device.partition(":")
        if kind == "cpu" and not idx:
            return ["CPUExecutionProvider"], "cpu", 0
        if kind == "cuda":
            if "CUDAExecutionProvider" not in have:
                raise NemohError(f"device '{device}': onnxruntime has no CUDA execution provider here (available: "
                                 f"{', '.join(have)}); install onnxruntime-gpu, or use --device cpu")
            try:
                i = int(idx or 0)
            except ValueError:
                raise NemohError(f"device '{device}': expected cuda or cuda:N") from None
            return [("CUDAExecutionProvider", {"device_id": i}), "CPUExecutionProvider"], "cuda", i
        raise NemohError(f"device '{device}' is not supported by the onnx backend (use cpu, cuda or cuda:N)")

    def load(self, graph: Graph, checkpoint: Checkpoint, *, device: str | None = None) -> None:
        from . import onnx_export

        providers, self.device_type, self.device_id = self._choose_providers(device)
        self._providers, self.graph, self.session = providers, graph, None
        names = tuple(p if isinstance(p, str) else p[0] for p in providers)
        bad = {o.kind: _probe(graph.dtype, names)[o.kind] for b in graph.blocks for o in b.ops}
        bad = {k: s for k, s in bad.items() if not s.ok}
        if bad:
            first = next(iter(bad.values())).reason
            raise NemohError(f"onnx backend cannot run this model at {graph.dtype}: op kinds "
                             f"{', '.join(sorted(bad))} are not supported (first: {first}); try another --dtype")
        self._checkpoint = checkpoint
        model = onnx_export.lower_graph(graph, checkpoint.load(graph))
        session, self._inits, self._base = self._open(model, onnx_export, providers)
        self.session = session
        used = session.get_providers()[0]
        if self.device_type == "cuda" and used != "CUDAExecutionProvider":
            if device is not None:
                raise NemohError(f"device '{device}': onnxruntime fell back to {used} (is a GPU visible?)")
            # default device: the CUDA provider is installed but no GPU answered; onnxruntime fell back
            self.device_type, self.device_id, self._providers = "cpu", 0, ["CPUExecutionProvider"]
        self._trace_session = None

    def _open(self, model, onnx_export, providers):
        """(session, initializers by name, model dir): the model goes through a file with external
        data, as `nemoh export-onnx` writes it. Measured on the cpu-small bench preset (436 MB of
        fp32 weights): +457 MB resident after load, against +1568 MB when the session is built from
        serialized bytes (which also keeps the ModelProto for read_param); no 2 GiB protobuf limit."""
        import onnx

        self._tmp = tempfile.TemporaryDirectory(prefix="nemoh-onnx-")
        path = onnx_export.save(model, self._tmp.name)
        del model
        light = onnx.load(str(path), load_external_data=False)  # read_param reads the file back
        return _make_session(str(path), providers), {t.name: t for t in light.graph.initializer}, path.parent

    def _loaded(self) -> tuple[Graph, Any, Path]:
        """(graph, session, model dir) of the loaded model."""
        if self.graph is None or self.session is None or self._base is None:
            raise RuntimeError("no model loaded: call load(graph, checkpoint) first")
        return self.graph, self.session, self._base

    def _graph(self) -> Graph:
        if self.graph is None:
            raise RuntimeError("no model loaded: call load(graph, checkpoint) first")
        return self.graph

    def read_param(self, name: str) -> torch.Tensor:
        from .onnx_ops import tensor_from_proto

        if name not in self._inits:
            raise NemohError(f"onnx backend: no initializer named '{name}'")
        return tensor_from_proto(self._inits[name], self._base).clone()

    # -- state --------------------------------------------------------------------------------
    def _ortvalue(self, a: np.ndarray):
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(a, self.device_type, self.device_id)

    def new_state(self, batch: int) -> OnnxState:
        g = self._graph()
        feeds = _zero_feeds(g, batch, 1)
        return OnnxState({s.name: self._ortvalue(feeds[f"past.{s.name}"]) for s in g.states},
                         torch.zeros(batch, 0, dtype=torch.bool), batch)

    def copy_state(self, state: OnnxState) -> OnnxState:
        # OrtValues are immutable here (see module docstring): sharing them is a snapshot
        return OnnxState(dict(state.tensors), state.mask.clone(), state.batch)

    def export_state(self, state: OnnxState) -> dict[str, torch.Tensor]:
        out = {"mask": state.mask.to(torch.int64)}
        for name, v in state.tensors.items():
            out[name] = _to_torch(v.numpy())  # numpy() copies device memory to the host
        return out

    def import_state(self, tensors: dict[str, torch.Tensor]) -> OnnxState:
        g = self._graph()
        missing = [s.name for s in g.states if s.name not in tensors] + (
            [] if "mask" in tensors else ["mask"])
        if missing:
            raise NemohError(f"onnx backend: state to import lacks {', '.join(missing)}")
        mask = tensors["mask"].cpu().bool().clone()
        return OnnxState({s.name: self._ortvalue(_to_numpy(tensors[s.name].to(dtypes.torch_dtype(s.dtype))))
                          for s in g.states}, mask, mask.shape[0])

    # -- compute ------------------------------------------------------------------------------
    def _tracing_session(self):
        if self._trace_session is None:
            from .onnx_export import lower_graph, save

            g = self._graph()
            if self._checkpoint is None or self._tmp is None:
                raise RuntimeError("no model loaded: call load(graph, checkpoint) first")
            model = lower_graph(g, self._checkpoint.load(g), trace=True)
            path = save(model, Path(self._tmp.name) / "trace")  # a file, as the main session
            self._trace_session = _make_session(str(path), self._providers)
        return self._trace_session

    def forward(self, state: OnnxState, ids: torch.Tensor, mask: torch.Tensor | None = None, *,
                last_only: bool = False, trace: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        from .onnx_export import TRACE_PREFIX

        graph, session, _ = self._loaded()
        B, T = ids.shape
        m = torch.ones(B, T, dtype=torch.bool) if mask is None else mask.cpu().bool()
        key_mask = torch.cat([state.mask, m], dim=1)  # [B, S+T]: the graph's attention_mask
        sess = session if trace is None else self._tracing_session()
        io = sess.io_binding()
        ids_np = ids.cpu().to(torch.int64).contiguous().numpy()
        mask_np = key_mask.to(torch.int64).numpy()
        io.bind_cpu_input("input_ids", ids_np)
        io.bind_cpu_input("attention_mask", mask_np)
        keep = np.array(1 if last_only else 0, np.int64)  # last_only: the head runs on one position
        io.bind_cpu_input("logits_to_keep", keep)
        names = [s.name for s in graph.states]
        for n in names:
            io.bind_ortvalue_input(f"past.{n}", state.tensors[n])
        io.bind_output("logits", "cpu")
        for n in names:  # the new state stays on the session's device
            io.bind_output(f"present.{n}", self.device_type, self.device_id)
        traced = [o.name for o in sess.get_outputs() if o.name.startswith(TRACE_PREFIX)] if trace is not None else []
        for n in traced:
            io.bind_output(n, "cpu")
        try:
            sess.run_with_iobinding(io)
        except Exception as e:  # wrap with what ran, so a failure names shape, dtype and provider
            raise RuntimeError(f"onnx backend ({self.describe().get('provider')}, {graph.dtype}): forward of "
                               f"ids {list(ids.shape)} with {state.mask.shape[1]} cached tokens failed: "
                               f"{_first_line(e)}") from e
        outs = io.get_outputs()  # in binding order
        logits = _to_torch(outs[0].numpy())
        state.tensors = dict(zip(names, outs[1:1 + len(names)]))
        state.mask = key_mask
        if trace is not None:  # traced is empty otherwise
            for n, v in zip(traced, outs[1 + len(names):]):
                trace[n.removeprefix(TRACE_PREFIX)] = _to_torch(v.numpy())
        return logits

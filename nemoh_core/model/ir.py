"""The backend-neutral graph IR: frozen data describing a Nemotron-H model.

A `Graph` is built from a `ModelConfig` and a compute dtype. It holds:
  - `embed`: the embedding op, `layers`: one `Layer` per block, `head`: final norm and lm_head;
  - per op: its kind, the values it reads and writes (names local to a layer; `x` is the
    residual stream entering a layer and `x` again leaving it), the parameter tensors it reads
    and the carried state it updates, plus plain attributes;
  - per layer: the parameter tensors (`TensorSpec`: canonical name, shape, dtype) and the carried
    state (`StateSpec`: conv, ssm, k, v).
Nothing in here is a framework object: a graph prints, serialises to JSON and back, and every
count nemoh reports (parameters, state bytes, bytes moved, FLOPs) is derived from it.

Padding: an op with the attribute `zero_padding=True` (the Mamba in_proj) reads its input with the
left-padding positions zeroed; causal_conv1d zeroes them before and after the conv.

Op kinds (the whole vocabulary a backend implements; see nemoh.oracle for each one's math):
  embedding, rmsnorm, linear, split, causal_conv1d, ssd_scan, gated_rmsnorm, attention,
  relu2, moe_router, moe_experts, add.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from nemoh import dtypes
from nemoh.errors import NemohError, did_you_mean
from nemoh.model.config import ModelConfig, parse_config

OP_KINDS = (
    "embedding", "rmsnorm", "linear", "split", "causal_conv1d", "ssd_scan", "gated_rmsnorm",
    "attention", "relu2", "moe_router", "moe_experts", "add",
)
STATE_KINDS = ("conv", "ssm", "k", "v")


@dataclass(frozen=True)
class TensorSpec:
    """A checkpoint tensor: canonical name (no `backbone.`/`model.` prefix), shape, storage dtype.

    `buffer`: stored in the checkpoint but not a trainable parameter in transformers (a registered
    buffer: the MoE router's `e_score_correction_bias`); it is not counted in `params_total`.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    buffer: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * dtypes.ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class StateSpec:
    """Carried state. `shape` is per sequence, or per token of context when `per_token`."""

    name: str
    kind: str  # conv | ssm | k | v
    shape: tuple[int, ...]
    dtype: str
    per_token: bool = False

    @property
    def nbytes(self) -> int:
        n = dtypes.ITEMSIZE[self.dtype]
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Op:
    """One op: `outputs = kind(inputs; params, state, attrs)`."""

    name: str
    kind: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    params: tuple[str, ...] = ()
    state: tuple[str, ...] = ()
    attrs: tuple[tuple[str, Any], ...] = ()

    @property
    def a(self) -> dict[str, Any]:
        return dict(self.attrs)


@dataclass(frozen=True)
class Layer:
    index: int
    kind: str  # mamba | attention | mlp | moe
    ops: tuple[Op, ...]
    params: tuple[TensorSpec, ...]
    states: tuple[StateSpec, ...]

    @property
    def param_count(self) -> int:
        """Parameters (transformers' `num_parameters()` of this block), buffers excluded."""
        return sum(t.numel for t in self.params if not t.buffer)

    @property
    def buffer_count(self) -> int:
        return sum(t.numel for t in self.params if t.buffer)


@dataclass(frozen=True)
class Graph:
    config: ModelConfig
    dtype: str
    embed: Layer  # index -1, kind "embed": the embedding op
    layers: tuple[Layer, ...]
    head: Layer  # index -1, kind "head": norm_f and lm_head

    # -- derived quantities -------------------------------------------------------------------
    @property
    def blocks(self) -> tuple[Layer, ...]:
        """Every op container in execution order: embed, layers..., head."""
        return (self.embed, *self.layers, self.head)

    @property
    def params(self) -> tuple[TensorSpec, ...]:
        return tuple(t for b in self.blocks for t in b.params)

    @property
    def states(self) -> tuple[StateSpec, ...]:
        return tuple(s for b in self.layers for s in b.states)

    def param(self, name: str) -> TensorSpec:
        for t in self.params:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def params_total(self) -> int:
        """Parameters, as transformers' `model.num_parameters()` counts them (buffers excluded)."""
        return sum(t.numel for t in self.params if not t.buffer)

    @property
    def buffers_total(self) -> int:
        """Elements of checkpoint tensors that are buffers, not parameters (router correction bias)."""
        return sum(t.numel for t in self.params if t.buffer)

    @property
    def checkpoint_tensors_total(self) -> int:
        """Elements of every tensor the checkpoint holds: params_total + buffers_total."""
        return sum(t.numel for t in self.params)

    def params_by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {"embedding": self.embed.param_count}
        for layer in self.layers:
            out[layer.kind] = out.get(layer.kind, 0) + layer.param_count
        out["head"] = self.head.param_count
        return out

    @property
    def state_bytes_per_sequence(self) -> int:
        """Fixed-size carried state (conv + SSM) for one sequence."""
        return sum(s.nbytes for s in self.states if not s.per_token)

    @property
    def state_bytes_per_token(self) -> int:
        """KV cache bytes added per token of context, for one sequence."""
        return sum(s.nbytes for s in self.states if s.per_token)

    # -- serialisation ------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        def layer(b: Layer) -> dict[str, Any]:
            return {
                "index": b.index, "kind": b.kind,
                "params": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype,
                            **({"buffer": True} if t.buffer else {})} for t in b.params],
                "states": [{"name": s.name, "kind": s.kind, "shape": list(s.shape), "dtype": s.dtype,
                            "per_token": s.per_token} for s in b.states],
                "ops": [{"name": o.name, "kind": o.kind, "inputs": list(o.inputs), "outputs": list(o.outputs),
                         "params": list(o.params), "state": list(o.state),
                         "attrs": {k: list(v) if isinstance(v, tuple) else v for k, v in o.attrs}}
                        for o in b.ops],
            }

        return {"format": "nemoh-graph/1", "dtype": self.dtype, "config": self.config.to_dict(),
                "embed": layer(self.embed), "layers": [layer(b) for b in self.layers], "head": layer(self.head)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Graph:
        if d.get("format") != "nemoh-graph/1":
            raise NemohError(f"not a nemoh graph (format {d.get('format')!r}, expected 'nemoh-graph/1')")

        def layer(x: dict[str, Any]) -> Layer:
            return Layer(
                index=x["index"], kind=x["kind"],
                params=tuple(TensorSpec(t["name"], tuple(t["shape"]), t["dtype"], bool(t.get("buffer", False)))
                             for t in x["params"]),
                states=tuple(StateSpec(s["name"], s["kind"], tuple(s["shape"]), s["dtype"], s["per_token"])
                             for s in x["states"]),
                ops=tuple(Op(o["name"], o["kind"], tuple(o["inputs"]), tuple(o["outputs"]), tuple(o["params"]),
                             tuple(o["state"]),
                             tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in o["attrs"].items()))
                          for o in x["ops"]),
            )

        return cls(config=parse_config(d["config"], "<graph json>"), dtype=d["dtype"], embed=layer(d["embed"]),
                   layers=tuple(layer(x) for x in d["layers"]), head=layer(d["head"]))

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1)

    @classmethod
    def loads(cls, s: str) -> Graph:
        return cls.from_json(json.loads(s))

    def to_text(self) -> str:
        """A readable listing: one line per op with its params and attrs."""
        c = self.config
        lines = [f"nemotron_h graph  dtype={self.dtype}  layers={c.num_layers} ({c.pattern})  "
                 f"D={c.hidden_size} V={c.vocab_size}  params={self.params_total:,}"
                 + (f" (+ {self.buffers_total:,} in buffers)" if self.buffers_total else "")]
        for b in self.blocks:
            title = f"layers.{b.index} [{b.kind}]" if b.index >= 0 else f"[{b.kind}]"
            states = ", ".join(f"{s.name}{list(s.shape)}{'/token' if s.per_token else ''}:{s.dtype}"
                               for s in b.states)
            lines.append(f"{title}  params={b.param_count:,}" + (f"  state: {states}" if states else ""))
            shapes = {t.name: t.shape for t in b.params}
            for o in b.ops:
                ps = " ".join(f"{p.rsplit('.', 2)[-2] if p.endswith(('.weight', '.bias')) else p.rsplit('.', 1)[-1]}"
                              f"{list(shapes[p])}" for p in o.params)
                at = " ".join(f"{k}={v}" for k, v in o.attrs)
                lines.append(f"  {', '.join(o.outputs)} = {o.kind}({', '.join(o.inputs)})"
                             + (f"  {ps}" if ps else "") + (f"  {at}" if at else "") + f"   # {o.name}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Building the graph from a config
# ----------------------------------------------------------------------------------------------

class _Builder:
    """Collects the ops, params and states of one layer."""

    def __init__(self, prefix: str, dtype: str):
        self.prefix, self.dtype = prefix, dtype
        self.ops: list[Op] = []
        self.params: list[TensorSpec] = []
        self.states: list[StateSpec] = []

    def p(self, name: str, shape: tuple[int, ...], dtype: str | None = None, buffer: bool = False) -> str:
        full = f"{self.prefix}{name}"
        self.params.append(TensorSpec(full, tuple(shape), dtype or self.dtype, buffer))
        return full

    def s(self, name: str, kind: str, shape: tuple[int, ...], dtype: str, per_token: bool = False) -> str:
        full = f"{self.prefix}{name}"
        self.states.append(StateSpec(full, kind, tuple(shape), dtype, per_token))
        return full

    def op(self, name: str, kind: str, inputs, outputs, params=(), state=(), **attrs: Any) -> None:
        attrs = {k: tuple(v) if isinstance(v, list) else v for k, v in attrs.items()}
        self.ops.append(Op(f"{self.prefix}{name}".rstrip("."), kind, tuple(inputs), tuple(outputs),
                           tuple(params), tuple(state), tuple(sorted(attrs.items()))))

    def linear(self, name: str, x: str, y: str, n_in: int, n_out: int, bias: bool, **attrs: Any) -> None:
        ps = [self.p(f"{name}.weight", (n_out, n_in))]
        if bias:
            ps.append(self.p(f"{name}.bias", (n_out,)))
        self.op(name, "linear", [x], [y], ps, in_features=n_in, out_features=n_out, **attrs)

    def layer(self, index: int, kind: str) -> Layer:
        return Layer(index, kind, tuple(self.ops), tuple(self.params), tuple(self.states))


def _mamba(b: _Builder, c: ModelConfig) -> None:
    H, P, N, G, K = c.mamba_num_heads, c.mamba_head_dim, c.ssm_state_size, c.n_groups, c.conv_kernel
    m = "mixer."
    # padding positions are zeroed on this op's input (and before/after the conv): attr zero_padding
    b.linear(f"{m}in_proj", "h", "zxbcdt", c.hidden_size, c.in_proj_dim, c.use_bias, zero_padding=True)
    b.op(f"{m}split_zxbcdt", "split", ["zxbcdt"], ["z", "xBC", "dt"], sizes=[c.d_inner, c.conv_dim, H])
    conv = [b.p(f"{m}conv1d.weight", (c.conv_dim, 1, K))]
    if c.use_conv_bias:
        conv.append(b.p(f"{m}conv1d.bias", (c.conv_dim,)))
    st_conv = b.s("conv", "conv", (c.conv_dim, K - 1), b.dtype)
    b.op(f"{m}conv1d", "causal_conv1d", ["xBC"], ["xBC_c"], conv, [st_conv], kernel=K, channels=c.conv_dim,
         activation="silu")
    b.op(f"{m}split_xbc", "split", ["xBC_c"], ["xs", "B", "C"], sizes=[c.d_inner, G * N, G * N])
    ssm = [b.p(f"{m}A_log", (H,)), b.p(f"{m}D", (H,)), b.p(f"{m}dt_bias", (H,))]
    # the SSM state is kept in mamba_ssm_cache_dtype (fp32); an fp64 reference run keeps it in fp64
    st_ssm = b.s("ssm", "ssm", (H, P, N), "float64" if b.dtype == "float64" else c.mamba_ssm_cache_dtype)
    lo, hi = c.time_step_limit
    b.op(f"{m}ssd", "ssd_scan", ["xs", "dt", "B", "C"], ["y"], ssm, [st_ssm], heads=H, head_dim=P, groups=G,
         state_size=N, chunk_size=c.chunk_size, dt_min=lo, dt_max=None if hi == float("inf") else hi)
    b.op(f"{m}gated_norm", "gated_rmsnorm", ["y", "z"], ["yn"], [b.p(f"{m}norm.weight", (c.d_inner,))],
         group_size=c.d_inner // G, eps=c.layer_norm_epsilon)
    b.linear(f"{m}out_proj", "yn", "out", c.d_inner, c.hidden_size, c.use_bias)


def _attention(b: _Builder, c: ModelConfig) -> None:
    Q, KV, Dh = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    m = "mixer."
    b.linear(f"{m}q_proj", "h", "q", c.hidden_size, Q * Dh, False)
    b.linear(f"{m}k_proj", "h", "k", c.hidden_size, KV * Dh, False)
    b.linear(f"{m}v_proj", "h", "v", c.hidden_size, KV * Dh, False)
    sk = b.s("k", "k", (KV, Dh), b.dtype, per_token=True)
    sv = b.s("v", "v", (KV, Dh), b.dtype, per_token=True)
    b.op(f"{m}attention", "attention", ["q", "k", "v"], ["a"], [], [sk, sv], heads=Q, kv_heads=KV, head_dim=Dh,
         scale=Dh ** -0.5)
    b.linear(f"{m}o_proj", "a", "out", Q * Dh, c.hidden_size, False)


def _mlp(b: _Builder, c: ModelConfig, name: str, x: str, y: str, inter: int) -> None:
    b.linear(f"{name}up_proj", x, f"{y}_up", c.hidden_size, inter, c.mlp_bias)
    b.op(f"{name}relu2", "relu2", [f"{y}_up"], [f"{y}_act"])
    b.linear(f"{name}down_proj", f"{y}_act", y, inter, c.hidden_size, c.mlp_bias)


def _moe(b: _Builder, c: ModelConfig) -> None:
    E, L, I = c.n_routed_experts, c.moe_input_size, c.moe_intermediate_size
    m = "mixer."
    router = [b.p(f"{m}gate.weight", (E, c.hidden_size)),
              # fp32 always: large values with a tiny spread; bf16 rounding changes the winners
              # a registered buffer in transformers: in the checkpoint, not in num_parameters()
              b.p(f"{m}gate.e_score_correction_bias", (E,), "float32", buffer=True)]
    b.op(f"{m}router", "moe_router", ["h"], ["topk_w", "topk_idx"], router, experts=E, top_k=c.num_experts_per_tok,
         n_group=c.n_group, topk_group=c.topk_group, norm_topk_prob=c.norm_topk_prob,
         routed_scaling_factor=float(c.routed_scaling_factor))
    xin = "h"
    if c.moe_latent_size is not None:
        b.linear(f"{m}fc1_latent_proj", "h", "h_lat", c.hidden_size, L, c.mlp_bias)
        xin = "h_lat"
    experts = [b.p(f"{m}experts.up_proj", (E, I, L)), b.p(f"{m}experts.down_proj", (E, L, I))]
    b.op(f"{m}experts", "moe_experts", [xin, "topk_w", "topk_idx"], ["routed"], experts, experts=E, latent=L,
         intermediate=I)
    routed = "routed"
    if c.moe_latent_size is not None:
        b.linear(f"{m}fc2_latent_proj", "routed", "routed_out", L, c.hidden_size, c.mlp_bias)
        routed = "routed_out"
    if c.n_shared_experts and c.moe_shared_expert_intermediate_size:
        # the shared expert reads the original (normed) hidden state, not the latent
        _mlp(b, c, f"{m}shared_experts.", "h", "shared", c.moe_shared_expert_intermediate_size)
        b.op(f"{m}combine", "add", [routed, "shared"], ["out"])
    else:
        b.op(f"{m}combine", "add", [routed], ["out"])


def build_graph(config: ModelConfig, dtype: str | None = None) -> Graph:
    """The IR of `config` computing in `dtype` (default: the config's torch_dtype)."""
    dtype = dtype or config.torch_dtype
    if dtype not in dtypes.NAMES:
        raise NemohError(did_you_mean("dtype", dtype, dtypes.NAMES))
    c = config
    e = _Builder("", dtype)
    e.op("embeddings", "embedding", ["ids"], ["x"], [e.p("embeddings.weight", (c.vocab_size, c.hidden_size))])
    layers = []
    for i, kind in enumerate(c.layer_types):
        b = _Builder(f"layers.{i}.", dtype)
        b.op("norm", "rmsnorm", ["x"], ["h"], [b.p("norm.weight", (c.hidden_size,))], eps=c.layer_norm_epsilon)
        {"mamba": _mamba, "attention": _attention, "moe": _moe,
         "mlp": lambda b, c: _mlp(b, c, "mixer.", "h", "out", c.intermediate_size)}[kind](b, c)
        b.op("residual", "add", ["x", "out"], ["x"])
        layers.append(b.layer(i, kind))
    h = _Builder("", dtype)
    h.op("norm_f", "rmsnorm", ["x"], ["h"], [h.p("norm_f.weight", (c.hidden_size,))], eps=c.layer_norm_epsilon)
    h.op("lm_head", "linear", ["h"], ["logits"], [h.p("lm_head.weight", (c.vocab_size, c.hidden_size))],
         in_features=c.hidden_size, out_features=c.vocab_size)
    return Graph(config, dtype, e.layer(-1, "embed"), tuple(layers), h.layer(-1, "head"))

"""What a forward step must cost, derived from the graph IR alone: FLOPs, bytes, memory to fit.

Every number comes from the `Graph`: TensorSpec shapes and dtypes, StateSpecs, and op attrs (the
router's `top_k`, the attention's heads, the scan's sizes). Nothing here knows a model by name.

A *step* runs `T` new tokens for each of `B` sequences that already hold `S` cached tokens:
prefill from scratch is (B, T, 0), one decode step at context depth S is (B, 1, S).

FLOPs (multiply and add count as 2), per op kind:
  linear          2 * in * out per token (lm_head only on the positions whose logits are kept)
  moe_router      2 * D * E per token
  moe_experts     top_k experts per token, each 2 * L * I (up) + 2 * I * L (down)
  attention       causal: query t (of T, after S cached) sees S + t + 1 keys; per key and head
                  2 * Dh for q.k and 2 * Dh for p.v
  ssd_scan        the recurrence's 5 * H * P * N per token (decay, input outer product, add;
                  contraction with C); the chunked SSD form does more work to use matrix units,
                  the floor counts what the math needs
  causal_conv1d   2 * K * channels per token
  elementwise ops (norms, relu2, add, split, embedding lookup) are not counted: < 1% here.

Bytes (the fewest a step must move through device memory):
  parameters read once per step: every tensor the step's ops read, except the embedding (only
  the looked-up rows) and the routed experts (only the experts chosen: at most min(E, tokens *
  top_k) of E; exact for one token, an upper bound for more);
  carried state: conv + SSM state read (when S > 0) and written back; the KV cache's S cached
  tokens read and the T new tokens written.
  Activations are not counted (they can stay on chip for decode; prefill is FLOP-bound).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nemoh import dtypes
from nemoh.model.ir import Graph, Layer, Op


def _router(layer: Layer) -> Op:
    return next(o for o in layer.ops if o.kind == "moe_router")


def _specs(graph: Graph):
    return {t.name: t for t in graph.params}


def experts_touched(layer: Layer, tokens: int) -> int:
    """Distinct routed experts a step over `tokens` tokens can touch: min(E, tokens * top_k)."""
    a = _router(layer).a
    return min(a["experts"], tokens * a["top_k"])


def op_param_bytes(op: Op, layer: Layer, specs: dict, tokens: int) -> int:
    """Parameter bytes `op` reads at least once in a step over `tokens` tokens (all sequences)."""
    total = 0
    for name in op.params:
        t = specs[name]
        if op.kind == "embedding":  # only the looked-up rows
            rows, width = t.shape
            total += min(rows, tokens) * width * dtypes.ITEMSIZE[t.dtype]
        elif op.kind == "moe_experts":
            total += t.nbytes * experts_touched(layer, tokens) // op.a["experts"]
        else:
            total += t.nbytes
    return total


def param_bytes_read(graph: Graph, tokens: int) -> int:
    """Parameter bytes a step over `tokens` tokens (all sequences together) reads at least once."""
    specs = _specs(graph)
    return sum(op_param_bytes(op, b, specs, tokens) for b in graph.blocks for op in b.ops)


def active_params(graph: Graph) -> int:
    """Parameters one token reads: the embedding row, every dense tensor, top_k of E routed experts."""
    specs = _specs(graph)
    total = 0
    for b in graph.blocks:
        for op in b.ops:
            for name in op.params:
                t = specs[name]
                if op.kind == "embedding":
                    total += t.shape[1]
                elif op.kind == "moe_experts":
                    total += t.numel * experts_touched(b, 1) // op.a["experts"]
                else:
                    total += t.numel
    return total


def op_flops(op: Op, layer: Layer, B: int, T: int, S: int, head_tokens: int) -> int:
    """FLOPs of one op for a step of B sequences x T new tokens after S cached ones."""
    a = op.a
    M = B * T
    k = op.kind
    if k == "linear":
        m = head_tokens if layer.kind == "head" else M
        return 2 * a["in_features"] * a["out_features"] * m
    if k == "moe_router":
        return 2 * a["experts"] * (_specs_shape(layer, op.params[0])[1]) * M
    if k == "moe_experts":
        top_k = _router(layer).a["top_k"]
        return top_k * 4 * a["latent"] * a["intermediate"] * M
    if k == "attention":
        keys = T * S + T * (T + 1) // 2  # sum over new queries of the keys each sees
        return 4 * a["heads"] * a["head_dim"] * keys * B
    if k == "ssd_scan":
        return 5 * a["heads"] * a["head_dim"] * a["state_size"] * M
    if k == "causal_conv1d":
        return 2 * a["kernel"] * a["channels"] * M
    return 0  # elementwise and lookups


def _specs_shape(layer: Layer, name: str) -> tuple[int, ...]:
    return next(t.shape for t in layer.params if t.name == name)


def state_bytes(graph: Graph, batch: int, context: int) -> int:
    """Carried state of `batch` sequences holding `context` tokens (conv + SSM + KV), from the IR."""
    return batch * (graph.state_bytes_per_sequence + context * graph.state_bytes_per_token)


@dataclass(frozen=True)
class StepCost:
    batch: int
    new_tokens: int
    context: int
    flops: int
    flops_by_kind: dict[str, int]
    param_bytes: int
    state_read_bytes: int
    state_write_bytes: int

    @property
    def bytes(self) -> int:
        return self.param_bytes + self.state_read_bytes + self.state_write_bytes

    @property
    def tokens(self) -> int:
        return self.batch * self.new_tokens

    def to_json(self) -> dict[str, Any]:
        return {"batch": self.batch, "new_tokens": self.new_tokens, "context": self.context,
                "flops": self.flops, "flops_by_kind": dict(self.flops_by_kind), "param_bytes": self.param_bytes,
                "state_read_bytes": self.state_read_bytes, "state_write_bytes": self.state_write_bytes,
                "bytes": self.bytes, "flops_per_token": self.flops / self.tokens,
                "bytes_per_token": self.bytes / self.tokens}


@dataclass(frozen=True)
class OpCost:
    """One op's share of a step: the numbers every cost figure (the bench's limits, a backend's
    per-kernel roofline) is summed from."""

    op: Op
    layer: Layer
    flops: int
    param_bytes: int
    state_read_bytes: int
    state_write_bytes: int


def op_costs(graph: Graph, batch: int, new_tokens: int, context: int, *, last_only: bool = True) -> list[OpCost]:
    """Every op of a step of `batch` sequences x `new_tokens` after `context` cached tokens, in order."""
    B, T, S = batch, new_tokens, context
    head_tokens = B if last_only else B * T
    specs, states = _specs(graph), {s.name: s for s in graph.states}
    out = []
    for b in graph.blocks:
        for op in b.ops:
            read = write = 0
            for name in op.state:
                st = states[name]
                if st.per_token:  # the KV cache: S cached tokens read, T new ones written
                    read, write = read + B * S * st.nbytes, write + B * T * st.nbytes
                else:  # conv and SSM state: read when there is one, always written back
                    read, write = read + (B * st.nbytes if S > 0 else 0), write + B * st.nbytes
            out.append(OpCost(op, b, op_flops(op, b, B, T, S, head_tokens), op_param_bytes(op, b, specs, B * T),
                              read, write))
    return out


def step_cost(graph: Graph, batch: int, new_tokens: int, context: int, *, last_only: bool = True) -> StepCost:
    """FLOPs and bytes of one forward step (see the module docstring for what is counted)."""
    ops = op_costs(graph, batch, new_tokens, context, last_only=last_only)
    by_kind: dict[str, int] = {}
    for c in ops:
        if c.flops:
            by_kind[c.op.kind] = by_kind.get(c.op.kind, 0) + c.flops
    return StepCost(batch, new_tokens, context, sum(by_kind.values()), by_kind, sum(c.param_bytes for c in ops),
                    sum(c.state_read_bytes for c in ops), sum(c.state_write_bytes for c in ops))


def decode_cost(graph: Graph, batch: int, depth: int, steps: int) -> StepCost:
    """The `steps` decode steps after a `depth`-token context, summed (step k sees depth + k tokens)."""
    costs = [step_cost(graph, batch, 1, depth + k) for k in range(steps)]
    kinds: dict[str, int] = {}
    for c in costs:
        for kk, v in c.flops_by_kind.items():
            kinds[kk] = kinds.get(kk, 0) + v
    return StepCost(batch, steps, depth, sum(c.flops for c in costs), kinds, sum(c.param_bytes for c in costs),
                    sum(c.state_read_bytes for c in costs), sum(c.state_write_bytes for c in costs))


# ----------------------------------------------------------------------------------------------
# Will it fit?

def _per_token_activation_bytes(graph: Graph, context: int) -> int:
    """The widest live per-token intermediate of any op (bytes), for a prompt of `context` tokens."""
    item = dtypes.ITEMSIZE[graph.dtype]
    acc = 8 if graph.dtype == "float64" else 4
    widest = graph.config.hidden_size * acc
    for b in graph.layers:
        for op in b.ops:
            a = op.a
            if op.kind == "linear":
                w = a["out_features"] * item
            elif op.kind == "ssd_scan":  # chunk-local decay matrix and scores, [H, chunk] per token each
                w = 2 * a["heads"] * a["chunk_size"] * acc + a["heads"] * a["head_dim"] * acc
            elif op.kind == "attention":  # scores materialised by a non-flash path: [Q, S] per token
                w = a["heads"] * context * acc
            elif op.kind == "moe_experts":
                w = _router(b).a["top_k"] * a["intermediate"] * item
            else:
                continue
            widest = max(widest, w)
    return widest


def memory_estimate(graph: Graph, batch: int, max_prompt: int, max_context: int) -> dict[str, int]:
    """A rough upper estimate of the device memory one run needs, from the IR.

    params: every parameter at its storage dtype; state: the working state plus the snapshot a
    decode measurement restores from, at the longest context; activations: the widest per-token
    intermediate of any op, twice (an op's input and output live together), for the longest prompt,
    plus the fp32 logits of the kept positions.
    """
    params = sum(t.nbytes for t in graph.params)
    state = 2 * state_bytes(graph, batch, max_context)
    acc = 8 if graph.dtype == "float64" else 4
    act = 2 * batch * max_prompt * _per_token_activation_bytes(graph, max_prompt) \
        + batch * graph.config.vocab_size * acc
    return {"params_bytes": params, "state_bytes": state, "activation_bytes": act,
            "total_bytes": params + state + act}

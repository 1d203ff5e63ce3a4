"""The oracle's interpreter: walk the IR, applying the ops of nemoh.oracle.ops one by one.

`run` computes logits for a whole graph; `run_block` runs one block on given inputs, which is how
localisation checks a layer on the executor's own input to it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from nemoh.model.ir import Graph, Op
from nemoh.oracle import ops
from nemoh.model.quant import act_quant_of, kv_quant_of
from nemoh.oracle.ops import (
    DEFAULT_QUANT,
    QuantOptions,
    attention,
    causal_conv1d,
    embedding,
    gated_rmsnorm,
    linear,
    linear_by_rows,
    moe_experts,
    moe_router,
    quant_act,
    quant_act_fp8,
    relu2,
    rmsnorm,
    ssd_chunked,
    ssd_recurrent,
)


@dataclass
class OracleState:
    """Carried state, keyed by the IR's StateSpec names, plus the key mask of every cached token."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    mask: torch.Tensor | None = None  # [B, S]


def run(graph: Graph, params: Mapping[str, torch.Tensor], ids: torch.Tensor, *, mask: torch.Tensor | None = None,
        state: OracleState | None = None, ssd: str = "chunked", trace: dict | None = None,
        dt_clamp_min: float | None = None, qopts: QuantOptions = DEFAULT_QUANT) -> torch.Tensor:
    """Logits [B, T, V] for `ids` [B, T], continuing `state` (updated in place) if given.

    `mask` [B, T] marks real tokens (1) and left padding (0). Pad positions are zeroed before
    in_proj, before the conv and before the scan. `trace`, if a dict, receives each op's first
    output under the op's name and the residual stream after each layer under `layers.{i}`.
    `dt_clamp_min` overrides the lower dt clamp (to reproduce a reference quirk, nothing else).
    A quantized checkpoint's params (Checkpoint.load) hold its linears dequantized and, for each linear whose
    activations are quantized, the input scale under nemoh.model.quant.act_key: the input is then
    quantized (nemoh.oracle.ops.quant_act, choices in `qopts`) before the product. An FP8 KV cache's scales
    (nemoh.model.quant.kv_key) make each attention layer cache its new K and V as FP8.
    """
    state = state if state is not None else OracleState()
    Bsz, T = ids.shape
    m = torch.ones(Bsz, T, dtype=torch.bool, device=ids.device) if mask is None else mask.bool()
    key_mask = m if state.mask is None else torch.cat([state.mask.bool(), m], dim=1)
    vals: dict[str, torch.Tensor] = {"ids": ids}
    for block in graph.blocks:
        vals = run_block(block, vals, params, state, m, key_mask, ssd=ssd, trace=trace, dt_clamp_min=dt_clamp_min,
                         qopts=qopts)
    state.mask = key_mask
    return vals["logits"]


def run_block(block, vals: dict[str, torch.Tensor], params: Mapping[str, torch.Tensor], state: OracleState,
              mask: torch.Tensor, key_mask: torch.Tensor, *, ssd: str = "chunked", trace: dict | None = None,
              dt_clamp_min: float | None = None, qopts: QuantOptions = DEFAULT_QUANT) -> dict[str, torch.Tensor]:
    """Run one block's ops on `vals` (its input values, e.g. {"x": ...}); returns all values after it.

    mask [B, T] marks the new tokens' real positions, key_mask [B, S+T] every cached and new one.
    Used by `run` and by localisation, which feeds a block the executor's own input to that block.
    """
    vals = dict(vals)
    pad = None if bool(mask.all()) else mask
    for op in block.ops:
        ins = [vals[n] for n in op.inputs]
        ps = [params[n] for n in op.params]
        aq = [act_quant_of(params, n) for n in op.params] if op.kind in ("linear", "moe_experts") else []
        if op.kind == "attention" and qopts.kv_cache == "checkpoint":
            aq = list(kv_quant_of(params, block.index) or ())  # the FP8 KV cache's (k_scale, v_scale)
        outs = _apply(op, ins, ps, state, pad, key_mask, ssd, dt_clamp_min, aq, qopts)
        for name, v in zip(op.outputs, outs):
            vals[name] = v
        if trace is not None:
            trace[op.name] = outs[0]
    if trace is not None and block.index >= 0:
        trace[f"layers.{block.index}"] = vals["x"]
    return vals


def _apply(op: Op, ins, ps, state: OracleState, pad_mask, key_mask, ssd, dt_clamp_min, aq=(),
           qopts: QuantOptions = DEFAULT_QUANT):
    a, k = op.a, op.kind
    if k == "embedding":
        return [embedding(ins[0], ps[0])]
    if k == "rmsnorm":
        return [rmsnorm(ins[0], ps[0], a["eps"])]
    if k == "linear":
        x = ins[0]
        if pad_mask is not None and a.get("zero_padding"):
            x = x * pad_mask[..., None].to(x.dtype)
        if aq and aq[0] is not None:
            x = quant_act(x, aq[0][0], aq[0][1], qopts)
        if op.outputs == ("logits",):  # the LM head: by row slices, so that a streamed one is bit-equal
            return [linear_by_rows(x, ps[0], ops.HEAD_ROWS)]
        return [linear(x, *ps)]
    if k == "split":
        return list(torch.split(ins[0], list(a["sizes"]), dim=-1))
    if k == "relu2":
        return [relu2(ins[0])]
    if k == "add":
        return [ins[0] + ins[1]] if len(ins) == 2 else [ins[0]]
    if k == "causal_conv1d":
        (x,), (name,) = ins, op.state
        if pad_mask is not None:
            x = x * pad_mask[..., None].to(x.dtype)
        y, state.tensors[name] = causal_conv1d(x, ps[0], ps[1] if len(ps) > 1 else None, state.tensors.get(name))
        if pad_mask is not None:
            y = y * pad_mask[..., None].to(y.dtype)
        return [y]
    if k == "ssd_scan":
        x, dt, B, C = ins
        A_log, D, dt_bias = ps
        (name,) = op.state
        H, P, G, N = a["heads"], a["head_dim"], a["groups"], a["state_size"]
        Bsz, T = x.shape[:2]
        args = (x.view(Bsz, T, H, P), dt, A_log, B.view(Bsz, T, G, N), C.view(Bsz, T, G, N), D, dt_bias,
                state.tensors.get(name))
        lo = a["dt_min"] if dt_clamp_min is None else dt_clamp_min
        if ssd == "recurrent":
            y, s = ssd_recurrent(*args, dt_min=lo, dt_max=a["dt_max"])
        else:
            y, s = ssd_chunked(*args, chunk_size=a["chunk_size"], dt_min=lo, dt_max=a["dt_max"])
        state.tensors[name] = s
        return [y.reshape(Bsz, T, H * P)]  # stays fp32/fp64 into the gated norm
    if k == "gated_rmsnorm":
        y, z = ins
        return [gated_rmsnorm(y, z, ps[0], a["group_size"], a["eps"], out_dtype=z.dtype)]
    if k == "attention":
        q, kn, vn = ins
        Bsz, T = q.shape[:2]
        Q, KV, Dh = a["heads"], a["kv_heads"], a["head_dim"]
        kname, vname = op.state
        kn, vn = kn.view(Bsz, T, KV, Dh), vn.view(Bsz, T, KV, Dh)
        if aq:  # an FP8 KV cache: the new K and V are stored quantized (what is cached stays so)
            kn, vn = quant_act_fp8(kn, aq[0]).to(kn.dtype), quant_act_fp8(vn, aq[1]).to(vn.dtype)
        if kname in state.tensors:
            kn = torch.cat([state.tensors[kname], kn], dim=1)
            vn = torch.cat([state.tensors[vname], vn], dim=1)
        state.tensors[kname], state.tensors[vname] = kn, vn
        return [attention(q.view(Bsz, T, Q, Dh), kn, vn, key_mask).reshape(Bsz, T, Q * Dh)]
    if k == "moe_router":
        h = ins[0]
        w, idx = moe_router(h.reshape(-1, h.shape[-1]), ps[0], ps[1], top_k=a["top_k"], n_group=a["n_group"],
                            topk_group=a["topk_group"], norm_topk_prob=a["norm_topk_prob"],
                            routed_scaling_factor=a["routed_scaling_factor"])
        return [w, idx]
    if k == "moe_experts":
        x, w, idx = ins
        act = None
        if aq and aq[0] is not None and aq[1] is not None:
            act = (aq[0][0], aq[0][1], aq[1][1], qopts)
        return [moe_experts(x.reshape(-1, x.shape[-1]), w, idx, ps[0], ps[1], act=act).view(x.shape)]
    raise NotImplementedError(f"oracle has no op kind {k!r} ({op.name})")

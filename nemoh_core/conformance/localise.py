"""Localisation: replay a failing case with traces and name where the divergence starts.

Each layer is checked in isolation: the fp64 oracle runs that layer on the executor's own input to
it (and on carried state it built the same way), so an error is charged to the layer that makes
it, not to every layer after it.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from nemoh import oracle
from nemoh.conformance.tolerances import tol
from nemoh.runtime.backend import capability


def _sq(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(sum (a-b)^2, sum b^2) in fp64: summed over calls, then rel RMS = sqrt(num / den)."""
    a, b = a.double(), b.double()
    return (a - b).pow(2).sum().item(), b.pow(2).sum().item()


def _rel(num: float, den: float) -> float:
    return math.sqrt(num / den) if den else math.sqrt(num)


def _at_real(t: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Rows of `t` at the real (unpadded) positions; [M, ...] tensors are viewed as [B, T, ...]."""
    B, T = real.shape
    if t.shape[:2] != (B, T) and t.shape[0] == B * T:
        t = t.reshape(B, T, *t.shape[1:])
    return t[real]


def localise(ctx, forwards: list[tuple[torch.Tensor, torch.Tensor | None]]) -> dict[str, Any]:
    """Replay `forwards` with traces and name the first layer, then op, that leaves tolerance.

    Each layer is checked in isolation: the fp64 oracle runs that layer on the executor's own input
    to it (and on carried state it built the same way), so an error is charged to the layer that
    makes it, not to every layer after it. Errors are relative RMS over every real position of
    every call (a single decode token is too few to judge at bf16); the call where a layer's error
    was largest is reported with it.
    """
    be, g64, params = ctx.model.backend, ctx.ref.graph64, ctx.ref.params
    t_layer = tol("layer_rel_rms", ctx.dtype)
    if t_layer is None:  # every dtype an executor runs at has a row: a missing one is a table bug
        raise ValueError(f"the tolerance table has no layer_rel_rms row for {ctx.dtype} "
                         "(nemoh/conformance/tolerances.py)")
    B = forwards[0][0].shape[0]
    st_b, st_o = be.new_state(B), oracle.OracleState()
    acc: dict[str, list[float]] = {}  # op or layer name -> [num, den]
    worst_call: dict[str, tuple[float, int]] = {}
    first_bad: dict[str, int] = {}  # name -> first call where its own error left tolerance
    op_meta: dict[str, tuple[int, str, str]] = {}  # op name -> (layer index, layer kind, op kind)
    non_finite: dict[str, Any] | None = None  # where NaN/inf first appears in the executor's own outputs

    def scan(name: str, t: torch.Tensor, layer, call: int) -> None:
        nonlocal non_finite
        if non_finite is None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            what = "NaN" if bool(torch.isnan(t).any()) else "inf"
            non_finite = {"what": what, "call": call, "op": name, "layer": layer.index if layer else None,
                          "kind": layer.kind if layer else None}

    def add(name: str, a: torch.Tensor, b: torch.Tensor, call: int) -> None:
        num, den = _sq(a, b)
        cur = acc.setdefault(name, [0.0, 0.0])
        cur[0] += num
        cur[1] += den
        e = _rel(num, den)
        if name not in worst_call or not e <= worst_call[name][0]:
            worst_call[name] = (e, call)
        if not e <= t_layer and name not in first_bad:
            first_bad[name] = call

    for call, (ids, mask) in enumerate(forwards):
        tr: dict[str, torch.Tensor] = {}
        be.forward(st_b, ids, mask, trace=tr)
        if "embeddings" not in tr or not any(k.startswith("layers.") for k in tr):
            return {"available": False, "reason": f"backend '{be.name}' returns no trace (see Backend.forward)"}
        m = torch.ones_like(ids, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
        key_mask = m if st_o.mask is None else torch.cat([st_o.mask.bool(), m], dim=1)
        x = tr["embeddings"]
        scan("embeddings", _at_real(x, m), None, call)
        for layer in g64.layers:
            ot: dict[str, torch.Tensor] = {}
            oracle.run_block(layer, {"x": x.double()}, params, st_o, m, key_mask, trace=ot)
            for op in layer.ops:
                if op.name in tr:
                    scan(op.name, _at_real(tr[op.name], m), layer, call)
                if op.name in tr and op.name in ot:
                    a, b = _at_real(tr[op.name], m), _at_real(ot[op.name], m)
                    if a.shape == b.shape:
                        op_meta[op.name] = (layer.index, layer.kind, op.kind)
                        add(op.name, a, b, call)
            x = tr[f"layers.{layer.index}"]
        st_o.mask = key_mask
        if non_finite is None and capability(be, "state_export", ctx.dtype).ok:  # carried state, too
            for name, t in be.export_state(st_b).items():
                scan(f"{name} (carried state)", t, None, call)

    layers: list[dict[str, Any]] = []
    for layer in g64.layers:
        mixer_out = layer.ops[-2].name  # the op feeding the residual add
        if mixer_out not in acc:
            continue
        err = _rel(*acc[mixer_out])
        layers.append({"layer": layer.index, "kind": layer.kind, "error": err, "worst_call": worst_call[mixer_out][1]})
    culprit = next((l for l in layers if not l["error"] <= t_layer), None)  # NaN fails too
    out: dict[str, Any] = {"available": True, "found": culprit is not None, "calls": len(forwards),
                           "tolerance": t_layer, "metric": "layer_rel_rms", "layers": layers}
    if non_finite is not None:
        nf = non_finite
        at = f"layer {nf['layer']} ({nf['kind']}), op {nf['op']}" if nf["layer"] is not None else nf["op"]
        out["non_finite"] = {**nf, "message": f"{nf['what']} first produced by {at}, in forward call {nf['call'] + 1}"}
    if culprit is None:
        out["message"] = ("every layer is within tolerance when checked in isolation; the error is in the "
                          "embedding or the head, or builds up from within-tolerance differences")
        return out
    ops: list[dict[str, Any]] = [{"op": n, "kind": k, "error": _rel(*acc[n]), "worst_call": worst_call[n][1],
            "first_call_out_of_tolerance": first_bad.get(n)}
           for n, (li, _, k) in op_meta.items() if li == culprit["layer"]]
    first = next((o for o in ops if not o["error"] <= t_layer), None) or ops[-1]
    op_name = str(first["op"])  # its first call out of tolerance, else its worst call
    call = first_bad.get(op_name, worst_call[op_name][1])
    out.update(layer=culprit["layer"], kind=culprit["kind"], error=culprit["error"], op=first["op"],
               op_kind=first["kind"], call=call, call_tokens=int(forwards[call][0].shape[1]), ops=ops)
    return out


_STATE_LABEL = re.compile(r"^(?P<side>.*?)\s*\bstate (?P<state>layers\.(?P<layer>\d+)\.\w+)")


def diverging_state(metrics: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The carried state a case found out of tolerance (from its metrics' JSON), or None.

    A localisation that finds every layer within tolerance cannot see a state that is carried wrong
    between calls (each layer is replayed on the executor's own state); the case's state metrics can.
    Returns the worst failing state metric: {"state", "layer", "side", "metric", "value_repr", "where",
    "states"} where `where` says that the state diverges and at which layer, and `states` lists
    every diverging state once."""
    bad = []
    for m in metrics:
        hit = _STATE_LABEL.match(m.get("label") or "")
        if hit and m.get("ok") is False:
            b = m.get("badness")
            bad.append((float("inf") if b is None else float(b), hit, m))
    if not bad:
        return None
    _, hit, m = max(bad, key=lambda t: t[0])
    states = list(dict.fromkeys(h["state"] for _, h, _ in sorted(bad, key=lambda t: int(t[1]["layer"]))))
    return {"state": hit["state"], "layer": int(hit["layer"]), "side": hit["side"].strip() or None,
            "metric": m["name"], "value_repr": m.get("value_repr"), "states": states,
            "where": f"carried state {hit['state']} diverges (layer {hit['layer']}), although every layer is "
                     "within tolerance in isolation"}

"""The PyTorch executor: runs the IR on CPU or CUDA in float64, float32, bfloat16 and float16.

It follows the model's precision rules (see ../shared/model-facts.md and nemoh.oracle): hidden
states and matmuls at the compute dtype; RMSNorm, the gated norm, the SSM (state kept in fp32),
the router and the attention softmax in fp32 (fp64 when computing in fp64). It is measured against
nemoh.oracle op by op; unlike the oracle it is vectorised: chunked SSD with batched chunks, the
single-token state update for decode, experts dispatched by token groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from nemoh import dtypes
from nemoh.model.ir import Graph, Layer
from nemoh.model.quant import act_quant_of, aux_name, kv_quant_of
from nemoh.model.weights import Checkpoint
from nemoh.runtime.backend import BackendBase

E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # midpoints between e2m1 magnitudes
E2M1_TIES_UP = (0.75, 1.75, 3.5)  # midpoints whose even neighbour is the upper one


def _byte_table(nibble_low_first: bool = True) -> torch.Tensor:
    """[256, 2] fp64: the two e2m1 values a byte holds, in element order."""
    mag = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
    val = torch.cat([mag, -mag])  # code 8..15: negative
    b = torch.arange(256)
    lo, hi = val[b & 15], val[b >> 4]
    return torch.stack([lo, hi] if nibble_low_first else [hi, lo], dim=-1)


@dataclass
class TorchState:
    conv: dict[int, torch.Tensor] = field(default_factory=dict)  # [B, C, K-1], pre-conv inputs
    ssm: dict[int, torch.Tensor] = field(default_factory=dict)  # [B, H, P, N], fp32
    k: dict[int, torch.Tensor] = field(default_factory=dict)  # [B, S, KV, Dh]
    v: dict[int, torch.Tensor] = field(default_factory=dict)
    mask: torch.Tensor = field(kw_only=True)  # [B, S] bool, True for real tokens; every state has one
    batch: int = 1


def segsum(a: torch.Tensor) -> torch.Tensor:
    """a [..., l] -> [..., l, l] with out[t, s] = a[s+1] + ... + a[t] for s <= t, -inf above.

    Built from a masked cumulative sum rather than cum[t] - cum[s]: no cancellation between two
    large cumulative sums, so the decays stay accurate in fp32 over long chunks.
    """
    l = a.shape[-1]
    strict = torch.ones(l, l, dtype=torch.bool, device=a.device).tril(-1)
    x = torch.cumsum(a[..., None].expand(*a.shape, l).masked_fill(~strict, 0), dim=-2)  # x[t, s], t > s
    return x.masked_fill(~torch.ones(l, l, dtype=torch.bool, device=a.device).tril(), float("-inf"))


def ssd_prefill(x, dt, A, B, C, D, s0, chunk: int):
    """Chunked SSD. x [b, T, H, P], dt [b, T, H] discretised, A [H] (negative), B/C [b, T, H, N]
    (already expanded to heads), D [H], s0 [b, H, P, N] -> y [b, T, H, P], final state."""
    b, T, H, P = x.shape
    pad = (-T) % chunk
    if pad:  # zero dt and x: padded positions neither decay nor feed the state
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    nc = x.shape[1] // chunk
    x, dt, B, C = (t.reshape(b, nc, chunk, *t.shape[2:]) for t in (x, dt, B, C))
    dA = (dt * A).permute(0, 1, 3, 2)  # [b, c, H, l]
    cum = torch.cumsum(dA, dim=-1)  # [b, c, H, l]
    xdt = x * dt[..., None]  # [b, c, l, H, P]
    # within each chunk: decayed, masked C.B "attention"
    Lmat = torch.exp(segsum(dA))  # [b, c, H, l, l]
    scores = torch.einsum("bclhn,bcshn->bchls", C, B) * Lmat
    y = torch.einsum("bchls,bcshp->bclhp", scores, xdt)
    # each chunk's own contribution to the state at its end
    to_end = torch.exp(cum[..., -1:] - cum)  # [b, c, H, l]
    chunk_states = torch.einsum("bclhn,bchl,bclhp->bchpn", B, to_end, xdt)
    # carry the state across chunks (few chunks: a plain loop is clear and cheap)
    starts = []
    s = s0
    chunk_decay = torch.exp(cum[..., -1])  # [b, c, H]
    for c in range(nc):
        starts.append(s)
        s = chunk_decay[:, c, :, None, None] * s + chunk_states[:, c]
    start = torch.stack(starts, dim=1)  # [b, c, H, P, N]
    y = y + torch.einsum("bclhn,bchpn->bclhp", C, start) * torch.exp(cum).permute(0, 1, 3, 2)[..., None]
    y = y + D[:, None] * x
    return y.reshape(b, nc * chunk, H, P)[:, :T], s


def ssd_step(x, dt, A, B, C, D, s):
    """One token. x [b, H, P], dt [b, H], B/C [b, H, N], s [b, H, P, N] -> y [b, H, P], new state."""
    s = torch.exp(dt * A)[..., None, None] * s + (dt[..., None] * x)[..., None] * B[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", s, C) + D[:, None] * x
    return y, s


class TorchBackend(BackendBase):
    """Implements nemoh.runtime.backend.Backend with plain PyTorch, in every dtype of nemoh.dtypes."""

    name = "torch"

    def __init__(self) -> None:
        self.graph: Graph | None = None
        self.p: dict[str, torch.Tensor] = {}
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    def describe(self) -> dict[str, Any]:
        d = {**super().describe(), "device": str(self.device), "torch": torch.__version__,
             "dtype": str(self.dtype).removeprefix("torch.")}
        if self.device.type == "cuda":
            d["device_name"] = torch.cuda.get_device_name(self.device)
        return d

    # -- loading ------------------------------------------------------------------------------
    def load(self, graph: Graph, checkpoint: Checkpoint, *, device: str | None = None) -> None:
        self.graph = graph
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtypes.torch_dtype(graph.dtype)
        p = checkpoint.load(graph)
        # quantized linears: the stored codes and scales are kept as read (verify and the weights suite compare
        # them with the file), and dequantized here by this executor's own decoder (not the oracle's)
        self.stored = {k: v.clone() for k, v in checkpoint.stored(graph).items()}
        self.formats = checkpoint.formats(graph)
        specs = {t.name: t for t in graph.params}
        for name, fmt in self._quantized(graph, checkpoint).items():
            p[name] = self._dequant(name, fmt, checkpoint).to(dtypes.torch_dtype(specs[name].dtype))
        self.p = {k: v.to(self.device) for k, v in p.items()}
        self.aq = {t.name: a for t in graph.params if (a := act_quant_of(self.p, t.name)) is not None}
        self.kvq = {l.index: s for l in graph.layers if (s := kv_quant_of(self.p, l.index)) is not None}
        self.acc = dtypes.acc(self.dtype)
        # derived once: A = -exp(A_log) exactly once, in the accumulation dtype
        self.A = {l.index: -torch.exp(self.p[f"layers.{l.index}.mixer.A_log"].to(self.acc))
                  for l in graph.layers if l.kind == "mamba"}

    def read_param(self, name: str) -> torch.Tensor:
        return self.p[name].detach().cpu().clone()

    def read_stored(self, name: str) -> torch.Tensor:
        """A quantized linear's codes or scale as this executor holds them (names as Checkpoint.stored)."""
        return self.stored[name].detach().cpu().clone()

    # -- quantized checkpoints: seams (tests plant the bugs a port of a quantized format can make here) ------
    def _quantized(self, graph: Graph, checkpoint: Checkpoint) -> dict[str, str]:
        """The linears to dequantize: those the checkpoint's quantization config quantizes."""
        return self.formats

    def _codes(self, name: str, fmt: str) -> torch.Tensor:
        """FP8: the e4m3 weight as fp64. NVFP4: the e2m1 values of the packed bytes, fp64 [..., out, in]."""
        w = self.stored[name]
        if fmt == "fp8":
            return w.to(torch.float64)
        return _byte_table()[w.to(torch.int64)].flatten(-2)

    def _block_scales(self, v: torch.Tensor, bs: torch.Tensor) -> torch.Tensor:
        """v [..., out, in] times its e4m3 block scale bs [..., out, in/16]: one scale per 16 elements."""
        return v * bs.to(torch.float64).repeat_interleave(16, dim=-1)

    def _global_scale(self, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """v [..., out, in] times the per-tensor scale g ([] or [E])."""
        return v * g.to(torch.float64).reshape(*g.shape, 1, 1)

    def _dequant(self, name: str, fmt: str, checkpoint: Checkpoint) -> torch.Tensor:
        """Weight `name` dequantized to fp64 (exact), from the stored tensors."""
        v = self._codes(name, fmt)
        if fmt == "fp8":
            return self._global_scale(v, self.stored[aux_name(name, "weight_scale")])
        v = self._block_scales(v, self.stored[aux_name(name, "weight_scale")])
        return self._global_scale(v, self.stored[aux_name(name, "weight_scale_2")])

    def _act_fp8(self, x, s):
        """Static FP8 activation quantization: e4m3(x / s) * s, saturating at +-448."""
        s = s.to(self.acc)
        return ((x.to(self.acc) / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).to(self.acc) * s).to(x.dtype)

    def _act_nvfp4(self, x, input_scale):
        """NVFP4 activation quantization (per 16-element block: e4m3 scale of g * amax / 6, g = 1 / input_scale;
        values to e2m1 with ties to even and saturation at +-6), returned dequantized at x's dtype."""
        acc = self.acc
        xb = x.to(acc).unflatten(-1, (-1, 16))
        g = 1.0 / input_scale.to(acc)
        s = (g * xb.abs().amax(-1, keepdim=True) / 6.0).clamp(max=448.0).to(torch.float8_e4m3fn).to(acc)
        y = torch.where(s > 0, xb * g / torch.where(s > 0, s, 1.0), 0.0)
        a = y.abs().clamp(max=6.0)
        bounds = torch.tensor(E2M1_BOUNDS, dtype=acc, device=x.device)
        i = torch.bucketize(a, bounds) + torch.isin(a, torch.tensor(E2M1_TIES_UP, dtype=acc, device=x.device))
        mag = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=acc, device=x.device)[i]
        return (torch.copysign(mag, y) * s / g).flatten(-2).to(x.dtype)

    def _quant_act(self, weight: str, x, expert: int | None = None):
        """The input of quantized linear `weight` quantized as its format prescribes (identity otherwise)."""
        a = self.aq.get(weight)
        if a is None:
            return x
        fmt, s = a
        s = s if expert is None else s[expert]
        return self._act_fp8(x, s) if fmt == "fp8" else self._act_nvfp4(x, s)

    def _loaded(self) -> Graph:
        if self.graph is None:
            raise RuntimeError("no model loaded: call load(graph, checkpoint) first")
        return self.graph

    # -- state --------------------------------------------------------------------------------
    def new_state(self, batch: int) -> TorchState:
        g = self._loaded()
        st = TorchState(batch=batch, mask=torch.zeros(batch, 0, dtype=torch.bool, device=self.device))
        for l in g.layers:
            for s in l.states:
                dt = dtypes.torch_dtype(s.dtype)
                if s.kind in ("conv", "ssm"):
                    getattr(st, s.kind)[l.index] = torch.zeros(batch, *s.shape, dtype=dt, device=self.device)
                else:  # k, v: [B, S, KV, Dh], S grows from 0
                    getattr(st, s.kind)[l.index] = torch.zeros(batch, 0, *s.shape, dtype=dt, device=self.device)
        return st

    def copy_state(self, state: TorchState) -> TorchState:
        return TorchState(**{k: {i: t.clone() for i, t in v.items()} for k, v in
                             (("conv", state.conv), ("ssm", state.ssm), ("k", state.k), ("v", state.v))},
                          mask=state.mask.clone(), batch=state.batch)

    def export_state(self, state: TorchState) -> dict[str, torch.Tensor]:
        out = {"mask": state.mask.to(torch.int64).cpu()}
        for kind in ("conv", "ssm", "k", "v"):
            for i, t in getattr(state, kind).items():
                out[f"layers.{i}.{kind}"] = t.cpu()
        return out

    def import_state(self, tensors: dict[str, torch.Tensor]) -> TorchState:
        mask = tensors["mask"].to(self.device).bool()
        st = TorchState(mask=mask, batch=mask.shape[0])
        for name, t in tensors.items():
            if name == "mask":
                continue
            _, i, kind = name.split(".")
            getattr(st, kind)[int(i)] = t.to(self.device).clone()
        return st

    # -- compute ------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, state: TorchState, ids: torch.Tensor, mask: torch.Tensor | None = None, *,
                last_only: bool = False, trace: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        g = self._loaded()
        ids = ids.to(self.device)
        B, T = ids.shape
        m = torch.ones(B, T, dtype=torch.bool, device=self.device) if mask is None else mask.to(self.device).bool()
        pad = None if bool(m.all()) else m[..., None]
        key_mask = torch.cat([state.mask, m], dim=1)
        rec = (lambda name, v: trace.__setitem__(name, v)) if trace is not None else (lambda name, v: None)

        x = self.p["embeddings.weight"][ids]
        rec("embeddings", x)
        for layer in g.layers:
            i = layer.index
            norm = layer.ops[0]
            h = self._rmsnorm(x, self.p[f"layers.{i}.norm.weight"], norm.a["eps"])
            rec(norm.name, h)
            with self.at(f"layers.{i}.mixer ({layer.kind})"):
                if layer.kind == "mamba":
                    out = self._mamba(layer, h, state, pad, rec)
                elif layer.kind == "attention":
                    out = self._attention(layer, h, state, key_mask, rec)
                elif layer.kind == "mlp":
                    out = self._mlp(f"layers.{i}.mixer.", h, rec)
                else:
                    out = self._moe(layer, h, rec)
            x = x + out
            rec(f"layers.{i}.residual", x)
            rec(f"layers.{i}", x)
        state.mask = key_mask
        if last_only:
            x = x[:, -1:]
        h = self._rmsnorm(x, self.p["norm_f.weight"], g.head.ops[0].a["eps"])
        rec("norm_f", h)
        logits = self._linear("lm_head", h)
        rec("lm_head", logits)
        return logits.to(torch.float64 if self.dtype == torch.float64 else torch.float32).cpu()

    def _rmsnorm(self, x, w, eps):
        xf = x.to(self.acc)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (w.to(self.acc) * y).to(x.dtype)

    def _linear(self, name: str, x):
        return F.linear(self._quant_act(f"{name}.weight", x), self.p[f"{name}.weight"], self.p.get(f"{name}.bias"))

    # -- seams: one natural sub-step each (tests inject the bugs real engines shipped here) ------
    def _pad(self, x, pad):
        """Zero the padding positions (pad [B, T, 1] bool, or None for no padding)."""
        return x if pad is None else x * pad

    def _heads(self, t, H: int):
        """[B, T, G, N] -> [B, T, H, N]: contiguous heads share a group, g(h) = h // (H/G)."""
        return t.repeat_interleave(H // t.shape[2], dim=2)

    def _conv(self, conv_state, xBC, w, b, K: int):
        """Causal depthwise conv + SiLU over [carried K-1 inputs | new inputs] -> (y [B,T,C], new state:
        the last K-1 *inputs*, not outputs)."""
        full = torch.cat([conv_state, xBC.transpose(1, 2)], dim=-1)  # [B, C, K-1+T]
        y = F.silu(F.conv1d(full, w, b, groups=w.shape[0])).transpose(1, 2)
        return y, full[:, :, -(K - 1):].clone()

    def _dt(self, dt, dt_bias, a):
        """softplus(dt + dt_bias) clamped to time_step_limit (default (0, inf): no clamp)."""
        d = F.softplus(dt.to(self.acc) + dt_bias.to(self.acc))
        return d.clamp(min=a["dt_min"], max=a["dt_max"] if a["dt_max"] is not None else float("inf"))

    def _ssd(self, x, dt, A, B, C, D, s0, chunk: int):
        """The scan continuing from the carried state s0: single-step update for one token."""
        if x.shape[1] == 1:
            y, s = ssd_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, s0)
            return y[:, None], s
        return ssd_prefill(x, dt, A, B, C, D, s0, chunk)

    def _gated_norm(self, y, z, w, group_size: int, eps: float):
        """Gate first, then RMS-normalise each group of `group_size` contiguous channels."""
        v = (y * F.silu(z.to(self.acc))).unflatten(-1, (-1, group_size))
        v = (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2)
        return (w.to(self.acc) * v).to(self.dtype)

    def _mamba(self, layer: Layer, h, state: TorchState, pad, rec):
        i, pre = layer.index, f"layers.{layer.index}.mixer."
        ops = {o.name.removeprefix(pre): o for o in layer.ops}
        a = ops["ssd"].a
        H, P, G, N = a["heads"], a["head_dim"], a["groups"], a["state_size"]
        Bsz, T, _ = h.shape
        zxbcdt = self._linear(pre + "in_proj", self._pad(h, pad))
        rec(pre + "in_proj", zxbcdt)
        z, xBC, dt = torch.split(zxbcdt, list(ops["split_zxbcdt"].a["sizes"]), dim=-1)
        xBC, state.conv[i] = self._conv(state.conv[i], self._pad(xBC, pad), self.p[pre + "conv1d.weight"],
                                        self.p.get(pre + "conv1d.bias"), ops["conv1d"].a["kernel"])
        xBC = self._pad(xBC, pad)
        rec(pre + "conv1d", xBC)
        xs, Bm, Cm = torch.split(xBC, list(ops["split_xbc"].a["sizes"]), dim=-1)
        # SSM in fp32 (fp64 for fp64)
        acc = self.acc
        dtd = self._dt(dt, self.p[pre + "dt_bias"], a)
        xs = xs.reshape(Bsz, T, H, P).to(acc)
        Bm = self._heads(Bm.reshape(Bsz, T, G, N).to(acc), H)
        Cm = self._heads(Cm.reshape(Bsz, T, G, N).to(acc), H)
        y, s = self._ssd(xs, dtd, self.A[i], Bm, Cm, self.p[pre + "D"].to(acc), state.ssm[i].to(acc), a["chunk_size"])
        state.ssm[i] = s.to(state.ssm[i].dtype)
        y = y.reshape(Bsz, T, H * P)
        rec(pre + "ssd", y)
        yn = self._gated_norm(y, z, self.p[pre + "norm.weight"], ops["gated_norm"].a["group_size"],
                              ops["gated_norm"].a["eps"])
        rec(pre + "gated_norm", yn)
        out = self._linear(pre + "out_proj", yn)
        rec(pre + "out_proj", out)
        return out

    def _qk(self, q, k):
        """q [B, T, Q, Dh] (the last T of the S cached positions), k [B, S, KV, Dh] (positions 0..S-1):
        Nemotron-H attention has no positional encoding, so they pass through unchanged."""
        return q, k

    def _attention(self, layer: Layer, h, state: TorchState, key_mask, rec):
        i, pre = layer.index, f"layers.{layer.index}.mixer."
        a = next(o for o in layer.ops if o.kind == "attention").a
        Q, KV, Dh = a["heads"], a["kv_heads"], a["head_dim"]
        Bsz, T, _ = h.shape
        q = self._linear(pre + "q_proj", h).view(Bsz, T, Q, Dh)
        k = self._linear(pre + "k_proj", h).view(Bsz, T, KV, Dh)
        v = self._linear(pre + "v_proj", h).view(Bsz, T, KV, Dh)
        if i in self.kvq:  # an FP8 KV cache: new K and V are stored as e4m3(x / scale) * scale
            k, v = self._act_fp8(k, self.kvq[i][0]), self._act_fp8(v, self.kvq[i][1])
        state.k[i] = k = torch.cat([state.k[i], k], dim=1)
        state.v[i] = v = torch.cat([state.v[i], v], dim=1)
        S_all = k.shape[1]
        q, k = self._qk(q, k)
        pos = torch.arange(S_all, device=h.device)
        visible = (pos[None, :] <= pos[S_all - T:, None])[None, None] & key_mask[:, None, None, :]  # [B,1,T,S]
        has_key = visible.any(-1, keepdim=True)
        visible = visible | ~has_key  # a padding query row with nothing to see: keep it finite, zero it below
        acc = self.acc
        o = F.scaled_dot_product_attention(q.transpose(1, 2).to(acc), k.transpose(1, 2).to(acc),
                                           v.transpose(1, 2).to(acc), attn_mask=visible, scale=a["scale"],
                                           enable_gqa=True)  # [B, Q, T, Dh]
        o = (o * has_key).transpose(1, 2).reshape(Bsz, T, Q * Dh).to(self.dtype)
        rec(pre + "attention", o)
        out = self._linear(pre + "o_proj", o)
        rec(pre + "o_proj", out)
        return out

    def _mlp(self, pre: str, h, rec):
        u = self._linear(pre + "up_proj", h)
        rec(pre + "up_proj", u)
        out = self._linear(pre + "down_proj", torch.relu(u).square())
        rec(pre + "down_proj", out)
        return out

    def _router_bias(self, pre: str):
        """The correction bias, kept in fp32: large values with a tiny spread."""
        return self.p[pre + "gate.e_score_correction_bias"]

    def _route_weights(self, scores, choice, idx):
        """Weights are the raw sigmoid scores of the chosen experts (the bias only chooses)."""
        return scores.gather(1, idx)

    def _shared_input(self, h, pre: str):
        """The shared expert reads the original (normed) hidden state, not the latent."""
        return h

    def _moe(self, layer: Layer, h, rec):
        pre = f"layers.{layer.index}.mixer."
        a = next(o for o in layer.ops if o.kind == "moe_router").a
        acc = self.acc
        shape = h.shape
        hf = h.reshape(-1, shape[-1])
        scores = torch.sigmoid(hf.to(acc) @ self.p[pre + "gate.weight"].to(acc).T)  # [M, E]
        choice = scores + self._router_bias(pre).to(acc)
        M, E = choice.shape
        ng, per = a["n_group"], E // a["n_group"]
        if ng > 1:
            gscore = choice.view(M, ng, per).topk(min(2, per), dim=-1).values.sum(-1)
            keep = torch.zeros(M, ng, dtype=torch.bool, device=h.device)
            keep.scatter_(1, gscore.topk(a["topk_group"], dim=-1).indices, True)
            choice = choice.masked_fill(~keep.repeat_interleave(per, dim=1), float("-inf"))
        idx = choice.topk(a["top_k"], dim=-1).indices  # [M, k]
        w = self._route_weights(scores, choice, idx)
        if a["norm_topk_prob"]:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        w = w * a["routed_scaling_factor"]
        rec(pre + "router", w)
        x = self._linear(pre + "fc1_latent_proj", hf) if pre + "fc1_latent_proj.weight" in self.p else hf
        up, down = self.p[pre + "experts.up_proj"], self.p[pre + "experts.down_proj"]
        routed = torch.zeros(x.shape, dtype=acc, device=h.device)
        flat_e = idx.reshape(-1)
        order = torch.argsort(flat_e, stable=True)
        counts = torch.bincount(flat_e, minlength=E).tolist()
        tok = order // idx.shape[1]
        wt = w.reshape(-1)[order]
        start = 0
        for e, n in enumerate(counts):  # tokens grouped per expert: one matmul pair per used expert
            if n:
                t = tok[start:start + n]
                xe = self._quant_act(pre + "experts.up_proj", x[t], e)
                he = self._quant_act(pre + "experts.down_proj", torch.relu(F.linear(xe, up[e])).square(), e)
                ye = F.linear(he, down[e])
                routed.index_add_(0, t, ye.to(acc) * wt[start:start + n, None])
                start += n
        routed = routed.to(self.dtype)
        rec(pre + "experts", routed.view(*shape[:-1], -1))
        if pre + "fc2_latent_proj.weight" in self.p:
            routed = self._linear(pre + "fc2_latent_proj", routed)
        out = routed.view(shape)
        if pre + "shared_experts.up_proj.weight" in self.p:
            out = out + self._mlp(pre + "shared_experts.", self._shared_input(h, pre), rec)
        rec(pre + "combine", out)
        return out

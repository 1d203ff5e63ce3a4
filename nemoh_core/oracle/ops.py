"""The oracle: a readable definition of every Nemotron-H op in plain PyTorch.

This is the living definition each executor is measured against, op by op. It is written to be
read, not to be fast. Run it in float64 for the precise reference; at a lower dtype it applies the
same upcasts the model prescribes (norms, SSM, router and softmax in at least fp32).

Dimension letters (see nemoh.model.config for the config names): B batch, T new tokens, S cached tokens,
D hidden, H mamba heads, P mamba head dim, G groups, N state size, K conv kernel, C channels,
Q query heads, KV key/value heads, Dh attention head dim, E experts, k experts per token,
L expert input size (latent or D), I expert hidden size, M tokens flattened (B*T), V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nemoh import dtypes

# ----------------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------------

def embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """ids [B, T] int -> x [B, T, D]."""
    return weight[ids]


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D], weight [D] -> [..., D]. Normalised and scaled in fp32 (or fp64), cast back."""
    a = dtypes.acc(x.dtype)
    xf = x.to(a)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.to(a) * y).to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in], weight [out, in], bias [out] -> [..., out]."""
    return F.linear(x, weight, bias)


HEAD_ROWS = 8192  # output rows per slice of the LM head (256 MiB of fp64 weight at a hidden width of 4096)


def linear_by_rows(x: torch.Tensor, weight, rows: int = HEAD_ROWS) -> torch.Tensor:
    """The LM head: `linear(x, weight)` computed over slices of `rows` output rows. Each logit is still
    one dot product over the whole hidden width; the slicing fixes which BLAS calls compute it, so that
    the streamed oracle (nemoh.oracle.stream), which converts one slice of a stored weight at a time,
    gives the same logits bit for bit. `weight` is a tensor, or anything whose `[r0:r1]` is a slice
    of one in x's dtype."""
    N = weight.shape[0]
    out = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    for r in range(0, N, rows):
        out[..., r:r + rows] = F.linear(x, weight[r:r + rows])
    return out


def relu2(x: torch.Tensor) -> torch.Tensor:
    """Squared ReLU, elementwise."""
    return torch.relu(x).square()


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv over time, then SiLU.

    x [B, T, C], weight [C, 1, K], bias [C], state [B, C, K-1] (the K-1 inputs before x; zeros
    for a fresh sequence) -> y [B, T, C], new state [B, C, K-1].
    The carried state is the last K-1 *inputs* (pre-conv); a prompt shorter than K-1 keeps part of
    the old state (the zero padding) inside it.
    """
    Bsz, T, C = x.shape
    K = weight.shape[-1]
    if state is None:
        state = x.new_zeros(Bsz, C, K - 1)
    full = torch.cat([state.to(x.dtype), x.transpose(1, 2)], dim=-1)  # [B, C, K-1+T]
    w = weight[:, 0, :]  # [C, K]
    y = w[:, 0, None] * full[:, :, 0:T]  # [B, C, T]
    for k in range(1, K):
        y = y + w[:, k, None] * full[:, :, k:k + T]
    if bias is not None:
        y = y + bias[:, None]
    return F.silu(y).transpose(1, 2), full[:, :, -(K - 1):]


def discretize_dt(dt: torch.Tensor, dt_bias: torch.Tensor, dt_min: float, dt_max: float | None) -> torch.Tensor:
    """dt [B, T, H] raw from in_proj -> softplus(dt + dt_bias) clamped to time_step_limit, in fp32/fp64."""
    a = dtypes.acc(dt.dtype)
    d = F.softplus(dt.to(a) + dt_bias.to(a))
    return d.clamp(min=dt_min, max=dt_max if dt_max is not None else float("inf"))


def expand_groups(t: torch.Tensor, H: int) -> torch.Tensor:
    """[B, T, G, N] -> [B, T, H, N]: contiguous heads share a group, g(h) = h // (H/G)."""
    return t.repeat_interleave(H // t.shape[2], dim=2)


def ssd_recurrent(x, dt, A_log, B, C, D, dt_bias, state=None, *, dt_min=0.0, dt_max=None):
    """The Mamba2 selective scan as its defining recurrence, one token at a time.

    x [B, T, H, P], dt [B, T, H] (raw), A_log [H], B/C [B, T, G, N], D [H], dt_bias [H],
    state [B, H, P, N] -> y [B, T, H, P], state [B, H, P, N]. Computed in fp32 (fp64 for fp64).
        s_t = exp(dt_t*A) * s_{t-1} + dt_t * B_t[g(h)] x_t     (outer product over P x N)
        y_t = C_t[g(h)] . s_t + D * x_t
    """
    a = dtypes.acc(x.dtype)
    Bsz, T, H, P = x.shape
    N = B.shape[-1]
    d = discretize_dt(dt, dt_bias, dt_min, dt_max)  # [B, T, H]
    A = -torch.exp(A_log.to(a))  # [H], applied once
    Bh, Ch, xf = expand_groups(B.to(a), H), expand_groups(C.to(a), H), x.to(a)
    s = torch.zeros(Bsz, H, P, N, dtype=a, device=x.device) if state is None else state.to(a)
    ys = []
    for t in range(T):
        decay = torch.exp(d[:, t] * A)  # [B, H]
        s = decay[:, :, None, None] * s + (d[:, t, :, None, None] * xf[:, t, :, :, None] * Bh[:, t, :, None, :])
        ys.append(torch.einsum("bhpn,bhn->bhp", s, Ch[:, t]) + D.to(a)[:, None] * xf[:, t])
    y = torch.stack(ys, dim=1) if ys else xf.new_zeros(Bsz, 0, H, P)
    return y, s


def ssd_chunked(x, dt, A_log, B, C, D, dt_bias, state=None, *, chunk_size, dt_min=0.0, dt_max=None):
    """The same scan in the chunked (SSD) form: exact for any T, any chunk size, any start state.

    Shapes as `ssd_recurrent`. Within a chunk of length l the output is a masked, decayed
    attention-like product; between chunks only the state [B, H, P, N] is carried. Decays are
    cumulative sums of dt*A from the chunk start, so the segment decay between positions s <= t is
    exp(cum[t] - cum[s]) and the decay applied to the incoming state is exp(cum[t]).
    """
    a = dtypes.acc(x.dtype)
    Bsz, T, H, P = x.shape
    N = B.shape[-1]
    d = discretize_dt(dt, dt_bias, dt_min, dt_max)  # [B, T, H]
    A = -torch.exp(A_log.to(a))
    Bh, Ch, xf = expand_groups(B.to(a), H), expand_groups(C.to(a), H), x.to(a)
    s = torch.zeros(Bsz, H, P, N, dtype=a, device=x.device) if state is None else state.to(a)
    ys = []
    for c0 in range(0, T, chunk_size):
        sl = slice(c0, min(c0 + chunk_size, T))
        dA = d[:, sl] * A  # [B, l, H]
        cum = torch.cumsum(dA, dim=1)  # [B, l, H]
        l = dA.shape[1]
        causal = torch.ones(l, l, dtype=torch.bool, device=x.device).tril()
        # seg[b, t, s, h] = cum[t] - cum[s] for s <= t, masked before exp so nothing overflows
        seg = (cum[:, :, None, :] - cum[:, None, :, :]).masked_fill(~causal[None, :, :, None], float("-inf"))
        xdt = xf[:, sl] * d[:, sl, :, None]  # [B, l, H, P]
        scores = torch.einsum("bthn,bshn->btsh", Ch[:, sl], Bh[:, sl]) * torch.exp(seg)  # [B, l, l, H]
        y_in = torch.einsum("btsh,bshp->bthp", scores, xdt)
        y_state = torch.einsum("bthn,bhpn->bthp", Ch[:, sl], s) * torch.exp(cum)[..., None]
        ys.append(y_in + y_state + D.to(a)[:, None] * xf[:, sl])
        to_end = torch.exp(cum[:, -1:, :] - cum)  # [B, l, H]: decay from each position to the chunk end
        s = torch.exp(cum[:, -1])[:, :, None, None] * s + torch.einsum("bsh,bshn,bshp->bhpn", to_end, Bh[:, sl], xdt)
    y = torch.cat(ys, dim=1) if ys else xf.new_zeros(Bsz, 0, H, P)
    return y, s


def gated_rmsnorm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y, z [..., d_inner], weight [d_inner] -> [..., d_inner].

    Gate first (v = y * silu(z)), then RMS-normalise each group of `group_size` contiguous channels
    on its own, then scale by the weight.
    """
    a = dtypes.acc(y.dtype if out_dtype is None else out_dtype)
    v = y.to(a) * F.silu(z.to(a))
    g = v.unflatten(-1, (-1, group_size))  # [..., G, d_inner/G]
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.to(a) * g.flatten(-2)).to(out_dtype or y.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Causal GQA without positional encoding; scale Dh^-0.5; softmax in fp32 (fp64 for fp64).

    q [B, T, Q, Dh] (the new tokens), k/v [B, S+T, KV, Dh] (cache then new), key_mask [B, S+T]
    (1 = a real token) -> [B, T, Q, Dh]. Query head j reads KV head j // (Q/KV). A query row with no
    visible key (a padding position) outputs zeros.
    """
    a = dtypes.acc(q.dtype)
    Bsz, T, Q, Dh = q.shape
    S_all, KV = k.shape[1], k.shape[2]
    kq = k.to(a).repeat_interleave(Q // KV, dim=2)  # [B, S+T, Q, Dh]
    vq = v.to(a).repeat_interleave(Q // KV, dim=2)
    scores = torch.einsum("btqd,bsqd->bqts", q.to(a), kq) * Dh ** -0.5  # [B, Q, T, S+T]
    pos_q = torch.arange(S_all - T, S_all, device=q.device)  # absolute position of each new token
    visible = (torch.arange(S_all, device=q.device)[None, :] <= pos_q[:, None])[None, None]  # [1,1,T,S+T]
    visible = visible & key_mask.bool()[:, None, None, :]
    p = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # rows with nothing visible
    return torch.einsum("bqts,bsqd->btqd", p, vq).to(q.dtype)


def moe_router(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, top_k: int, n_group: int,
               topk_group: int, norm_topk_prob: bool, routed_scaling_factor: float):
    """h [M, D], weight [E, D], bias [E] (fp32) -> weights [M, k] (fp32/fp64), indices [M, k].

    Scores are sigmoid(logits) computed in fp32. Experts are *chosen* by scores + bias, limited to
    the `topk_group` groups with the best sum of their top-2 choice values; the *weights* are the
    raw scores of the chosen experts (no bias), normalised if asked, times the scaling factor.
    """
    a = dtypes.acc(h.dtype)
    scores = torch.sigmoid(h.to(a) @ weight.to(a).T)  # [M, E]
    choice = scores + bias.to(a)
    M, E = choice.shape
    grouped = choice.view(M, n_group, E // n_group)
    group_score = grouped.topk(min(2, E // n_group), dim=-1).values.sum(-1)  # [M, n_group]
    keep = torch.zeros_like(group_score, dtype=torch.bool)
    keep.scatter_(1, group_score.topk(topk_group, dim=-1).indices, True)
    choice = choice.masked_fill(~keep.repeat_interleave(E // n_group, dim=1), float("-inf"))
    idx = choice.topk(top_k, dim=-1).indices  # [M, k]
    w = scores.gather(1, idx)
    if norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * routed_scaling_factor, idx


def moe_experts(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, up: torch.Tensor,
                down: torch.Tensor, act=None) -> torch.Tensor:
    """x [M, L], w [M, k], idx [M, k], up [E, I, L], down [E, L, I] -> [M, L].

    out_m = sum_j w[m, j] * down[e] relu2(up[e] x_m), e = idx[m, j]. Each expert runs at the
    model dtype; the weighted sum accumulates in fp32 (fp64 for fp64) and is cast back.
    `act` = (format, up input scales [E], down input scales [E], QuantOptions) quantizes each expert's two
    inputs with that expert's own input scale (a quantized checkpoint's experts).
    """
    a = dtypes.acc(x.dtype)
    out = torch.zeros(x.shape, dtype=a, device=x.device)
    for m in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[m, j])
            xm = x[m] if act is None else quant_act(x[m], act[0], act[1][e], act[3])
            h = relu2(up[e] @ xm)
            h = h if act is None else quant_act(h, act[0], act[2][e], act[3])
            out[m] += w[m, j].to(a) * (down[e] @ h).to(a)
    return out.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Quantized linears: ModelOpt's FP8 and NVFP4 (nemoh.model.quant reads them; docs/quantized-formats.md)
#
# Sources: ModelOpt's NVFP4QTensor (modelopt/torch/quantization/qtensor/nvfp4_tensor.py: the e2m1 table,
# `packed = (q[..., 1::2] << 4) | q[..., 0::2]`, block scales = block amax / (6 * weight_scale_2) cast to
# e4m3, weight_scale_2 = amax / (6 * 448), rounding of `_cast_fp4` half-to-even with saturation at 6) and
# vLLM's NVFP4 activation reference (per 16-element block of a row: scale = global * amax / 6 cast to e4m3,
# values x * global / scale clamped to +-6 and rounded to e2m1; global = 1 / input_scale).
# Everything here computes in fp64, where each step is exact but the two roundings it names.
# ----------------------------------------------------------------------------------------------

#: e2m1 magnitudes of codes 0..7; bit 3 is the sign (code 8 is -0)
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E4M3_MAX = 448.0


@dataclass(frozen=True)
class QuantOptions:
    """The choices the sources leave open, with nemoh's defaults (docs/quantized-formats.md measures each).

    nibble_order   'low_first': element 2j is the byte's low nibble (ModelOpt's packing), or 'high_first'.
    scale_rounding 'nearest': an activation block scale rounds to the nearest e4m3 value, ties to even
                   (torch's cast, PTX cvt.rn); 'up': to the next e4m3 value at or above (never clips).
    scale_overflow 'saturate': a block scale above 448 (a block larger than the calibration amax) becomes
                   448 and the block's values clip at +-6; 'inf': it is kept unrounded (no clipping).
    value_rounding 'even': e2m1 rounding ties to even (ModelOpt's _cast_fp4); 'away': ties away from zero.
    act_quant      False: activations stay unquantized (weight-only reading of a W4A4/W8A8 checkpoint).
    kv_cache       'checkpoint': where kv_cache_quant_algo is FP8, each attention layer's new K and V are cached as
                   e4m3(x / scale) * scale (k_scale / v_scale, per tensor, saturating; vLLM honours the directive
                   by default); 'compute': the cache stays at the compute dtype (an engine that ignores it).
    input_dtype    None: a quantizer sees its input exactly (fp64); 'float32' / 'bfloat16' / 'float16': the input is
                   first rounded to that dtype, as an executor computing at it holds the tensor it quantizes (not a
                   choice of the format: how far this alone moves the logits says whether a run at that dtype can be
                   judged against the fp64 meaning at all; suites/logits.py asks it).
    """

    nibble_order: str = "low_first"
    scale_rounding: str = "nearest"
    scale_overflow: str = "saturate"
    value_rounding: str = "even"
    act_quant: bool = True
    kv_cache: str = "checkpoint"
    input_dtype: str | None = None


DEFAULT_QUANT = QuantOptions()


def round_e4m3(v: torch.Tensor, *, mode: str = "nearest", saturate: bool = True) -> torch.Tensor:
    """fp64 [...] -> the nearest float8_e4m3fn value (fp64), ties to even; beyond +-448: +-448 if `saturate`.

    e4m3fn: 3 mantissa bits, exponents -6..8, subnormals down to 2^-9, no infinity. `mode='up'` rounds
    the magnitude up instead (to the next representable value at or above it).
    """
    a = v.abs().to(torch.float64)
    e = torch.floor(torch.log2(a.clamp(min=2.0 ** -6)))  # subnormals share the quantum of exponent -6
    q = torch.exp2(e - 3)  # spacing of e4m3 values in [2^e, 2^(e+1))
    r = (torch.ceil(a / q) if mode == "up" else torch.round(a / q)) * q  # torch.round: half to even
    if saturate:
        r = r.clamp(max=E4M3_MAX)
    return torch.copysign(r, v.to(torch.float64))


def round_e2m1(v: torch.Tensor, *, ties: str = "even") -> torch.Tensor:
    """fp64 [...] -> the nearest e2m1 value (fp64) with saturation at +-6; ties to even (ModelOpt's
    `_cast_fp4`: 0.25 -> 0, 0.75 -> 1, 2.5 -> 2, 5 -> 4) or away from zero."""
    a = v.abs().to(torch.float64).clamp(max=6.0)
    q = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))  # spacing of e2m1 values at a
    r = (torch.round(a / q) if ties == "even" else torch.floor(a / q + 0.5)) * q
    return torch.copysign(r, v.to(torch.float64))


def unpack_e2m1(packed: torch.Tensor, nibble_order: str = "low_first") -> torch.Tensor:
    """uint8 [..., n/2] -> e2m1 codes int64 [..., n]: two codes a byte, element 2j in the low nibble."""
    p = packed.to(torch.int64)
    lo, hi = p & 0x0F, p >> 4
    first, second = (lo, hi) if nibble_order == "low_first" else (hi, lo)
    return torch.stack([first, second], dim=-1).flatten(-2)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """e2m1 codes [...] (0..15) -> fp64 values: E2M1[code & 7], negated when bit 3 is set."""
    mag = torch.tensor(E2M1, dtype=torch.float64, device=codes.device)[codes & 7]
    return torch.where(codes >= 8, -mag, mag)


def dequant_fp8(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 weight: w float8_e4m3fn [..., out, in], scale fp32 per tensor ([] or [E] for stacked experts)
    -> fp64 [..., out, in] = w * scale. Exact in fp64 (4 + 24 significant bits)."""
    s = scale.to(torch.float64).reshape(*scale.shape, *([1] * (w.dim() - scale.dim())))
    return w.to(torch.float64) * s


def dequant_nvfp4(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor, *,
                  group: int = 16, nibble_order: str = "low_first") -> torch.Tensor:
    """NVFP4 weight -> fp64 [..., out, in] = e2m1(code) * block_scale[block] * global_scale.

    packed uint8 [..., out, in/2] (element 2j in the low nibble of byte j), block_scale float8_e4m3fn
    [..., out, in/group] (block b covers elements b*group .. b*group+group-1 of its row), global_scale
    (weight_scale_2) fp32 [] or [E]. Exact in fp64 (2 + 4 + 24 significant bits).
    """
    v = decode_e2m1(unpack_e2m1(packed, nibble_order))  # [..., out, in]
    blocks = v.unflatten(-1, (-1, group)) * block_scale.to(torch.float64)[..., None]  # [..., out, in/g, g]
    g = global_scale.to(torch.float64).reshape(*global_scale.shape, *([1] * (v.dim() - global_scale.dim())))
    return blocks.flatten(-2) * g


def quant_act_fp8(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """FP8 static activation quantization, dequantized: x [..., K] -> e4m3(x / input_scale) * input_scale
    (round to nearest even, saturating at +-448), fp64."""
    s = input_scale.to(torch.float64)
    return round_e4m3(x.to(torch.float64) / s) * s


def quant_act_nvfp4(x: torch.Tensor, input_scale: torch.Tensor, *, group: int = 16,
                    opts: QuantOptions = DEFAULT_QUANT) -> torch.Tensor:
    """NVFP4 activation quantization (W4A4), dequantized: x [..., K] -> fp64 [..., K].

    Per block of `group` consecutive elements of a row, with the global scale g = 1 / input_scale:
        s = e4m3(g * amax(|block|) / 6)            the block scale (rounded per opts.scale_rounding)
        y = e2m1(clamp(x * g / s, -6, 6))           each value (zero where s == 0)
        x_hat = y * s / g
    """
    g = 1.0 / input_scale.to(torch.float64)
    xb = x.to(torch.float64).unflatten(-1, (-1, group))  # [..., K/g, g]
    s = round_e4m3(g * xb.abs().amax(-1, keepdim=True) / 6.0, mode=opts.scale_rounding,
                   saturate=opts.scale_overflow == "saturate")
    y = round_e2m1(torch.where(s > 0, xb * g / torch.where(s > 0, s, 1.0), 0.0), ties=opts.value_rounding)
    return (y * s / g).flatten(-2)


def quant_act(x: torch.Tensor, fmt: str, input_scale: torch.Tensor, opts: QuantOptions = DEFAULT_QUANT):
    """The activation quantizer of format `fmt` ('fp8' or 'nvfp4'), at x's dtype; identity if turned off."""
    if not opts.act_quant:
        return x
    if opts.input_dtype is not None:
        x = x.to(dtypes.torch_dtype(opts.input_dtype)).to(x.dtype)
    y = quant_act_fp8(x, input_scale) if fmt == "fp8" else quant_act_nvfp4(x, input_scale, opts=opts)
    return y.to(x.dtype)

"""The one table of random-weight rules: which kind each tensor is, and how each kind is drawn, for
the tiny presets (nemoh.model.presets) and the bench models (nemoh.bench.models) alike.

`kind_of(name, shape)` classifies a tensor by its name (hub, in-memory or IR spelling). `RULES`
then gives, per kind, one rule for each profile:

  pitfalls  the presets: statistics chosen so that known implementation bugs change the outputs,
            which transformers' own init (dt_bias = 1, D = 1, zero router bias, one norm scale)
            would hide (see nemoh.model.presets for the list);
  plain     the bench models: trained-like magnitudes that keep a 50-layer stack at a unit-scale
            residual stream; no pitfall is needed, only stable numbers at real shapes.

Every tensor's values depend only on (seed, name, shape): one generator per tensor, keyed by a
hash of the seed and the name, so no value depends on which other tensors exist or their order.
The presets draw in float64 on the CPU (then the writer casts); the bench draws in float32 on the
device it runs on and casts to the compute dtype.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# -- pitfalls (presets): see nemoh.model.presets' docstring for what each one reveals --------------
OUT_PROJ_SCALE = 0.5  # out_proj / o_proj / down_proj: keep the residual stream from blowing up
LOGIT_STD = 3.0  # lm_head ~ N(0, LOGIT_STD^2 / D) on unit-RMS final states: top-1 is not a coin toss
NORM_JITTER = 0.1  # RMSNorm weights 1 + 0.1 N(0, 1)
DT0_RANGE = (1e-4, 5e-2)  # per-head dt at zero input, log-uniform; time_step_min = 1e-3 lies inside
DT_PROJ_SCALE = 1.0  # in_proj dt rows: dt_raw ~ N(0, 1), i.e. dt spreads by a factor e around dt0
BC_SCALE = 2.0  # in_proj B and C rows x2: the SSM term is 10-60% of the logits, not a few %, so
#                 scan bugs and the time_step_min clamp move the logits visibly (0.6% to 9% RMS here)
A_RANGE = (1.0, 16.0)  # A = -U(1, 16) per head (both profiles)
D_RANGE = (0.5, 1.5)
CONV_W_STD, CONV_B_STD = 0.5, 0.1
GATED_NORM_JITTER = 0.05
ROUTER_BIAS_MEAN, ROUTER_BIAS_STD = 4.0, 5e-3  # bf16 spacing at 4 is 2^-5 = 0.03: the spread rounds away
# -- plain (bench models) ------------------------------------------------------------------------
PLAIN_DT_RANGE = (1e-3, 1e-1)  # per-head dt at zero input, log-uniform (Mamba2's own init range)

#: (kind, test on the name's dot-separated parts and the shape), first match wins
KINDS: tuple[tuple[str, Callable[[list[str], tuple[int, ...]], bool]], ...] = (
    ("embedding", lambda p, s: p[-2:] == ["embeddings", "weight"]),
    ("lm_head", lambda p, s: p == ["lm_head", "weight"]),
    ("gated_norm", lambda p, s: p[-3:] == ["mixer", "norm", "weight"]),
    ("norm", lambda p, s: p[-1] == "weight" and p[-2] in ("norm", "norm_f")),
    ("A_log", lambda p, s: p[-1] == "A_log"),
    ("D", lambda p, s: p[-1] == "D"),
    ("dt_bias", lambda p, s: p[-1] == "dt_bias"),
    ("conv_weight", lambda p, s: p[-2:] == ["conv1d", "weight"]),
    ("conv_bias", lambda p, s: p[-2:] == ["conv1d", "bias"]),
    ("router_bias", lambda p, s: p[-1] == "e_score_correction_bias"),
    ("bias", lambda p, s: p[-1] == "bias"),  # only with use_bias / mlp_bias, off in every preset
    ("in_proj", lambda p, s: p[-2:] == ["in_proj", "weight"] and "mixer" in p),
    ("out_proj", lambda p, s: len(s) >= 2 and any(x in p for x in ("out_proj", "o_proj", "down_proj"))),
    ("latent_out", lambda p, s: len(s) >= 2 and "fc2_latent_proj" in p),
    ("linear", lambda p, s: len(s) >= 2),  # every other matrix, stacked experts [E, out, in] and router too
)


def kind_of(name: str, shape: tuple[int, ...]) -> str:
    parts = name.split(".")
    for kind, test in KINDS:
        if test(parts, shape):
            return kind
    raise AssertionError(f"no initialisation rule for tensor {name} {list(shape)}")


def generator(seed: int, name: str, device: Any = "cpu") -> torch.Generator:
    """The tensor's own generator, keyed by (seed, name)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@dataclass
class Draw:
    """What a rule draws with: the tensor's name, shape, config and generator, in one precision."""

    name: str
    shape: tuple[int, ...]
    cfg: Any  # a nemoh ModelConfig or a transformers NemotronHConfig: same field names for what rules read
    gen: torch.Generator
    draw_dtype: torch.dtype  # float64 for presets, float32 for the bench
    dtype: torch.dtype  # the result's dtype
    device: Any = "cpu"
    n_layers: int = 1

    def normal(self, std: float) -> torch.Tensor:
        x = torch.randn(self.shape, generator=self.gen, device=self.device, dtype=self.draw_dtype) * std
        return x.to(self.dtype)

    def uniform(self, lo: float, hi: float, n: tuple[int, ...] | None = None) -> torch.Tensor:
        u = torch.rand(n or self.shape, generator=self.gen, device=self.device, dtype=self.draw_dtype)
        return lo + (hi - lo) * u

    def stratified(self, n: int) -> torch.Tensor:
        """n values in (0, 1), one in each of n equal strata, in random order: uniform marginals that
        cover the whole range even for n = 4 heads."""
        perm = torch.randperm(n, generator=self.gen, device=self.device).to(self.draw_dtype)
        return (perm + torch.rand(n, generator=self.gen, device=self.device, dtype=self.draw_dtype)) / n

    def full(self, value: float) -> torch.Tensor:
        return torch.full(self.shape, value, device=self.device, dtype=self.dtype)


def _inv_softplus(dt: torch.Tensor) -> torch.Tensor:
    return dt + torch.log(-torch.expm1(-dt))


def _gated_norm_pitfalls(d: Draw) -> torch.Tensor:
    # group g of the d_inner/G contiguous channels is scaled by (0.5 + g)
    G, d_inner = d.cfg.n_groups, d.cfg.mamba_num_heads * d.cfg.mamba_head_dim
    group_scale = (0.5 + torch.arange(G, dtype=d.draw_dtype)).repeat_interleave(d_inner // G)
    return group_scale * (1 + d.normal(GATED_NORM_JITTER))


def _dt_bias_pitfalls(d: Draw) -> torch.Tensor:
    lo, hi = (torch.tensor(v, dtype=d.draw_dtype).log() for v in DT0_RANGE)
    return _inv_softplus(torch.exp(lo + (hi - lo) * d.stratified(d.cfg.mamba_num_heads)))


def _dt_bias_plain(d: Draw) -> torch.Tensor:
    lo, hi = (math.log(v) for v in PLAIN_DT_RANGE)
    return _inv_softplus(torch.exp(d.uniform(lo, hi))).to(d.dtype)


def _in_proj_pitfalls(d: Draw) -> torch.Tensor:
    # rows: [z d_inner | x d_inner | B G*N | C G*N | dt H]
    c = d.cfg
    G, d_inner, gN = c.n_groups, c.mamba_num_heads * c.mamba_head_dim, c.n_groups * c.ssm_state_size
    w = d.normal(d.shape[-1] ** -0.5)
    # each SSM group gets its own activation scale (2^(g - (G-1)/2)) so that normalising the gated
    # output per group differs clearly from normalising all of d_inner
    x_scale = (2.0 ** (torch.arange(G, dtype=d.draw_dtype) - (G - 1) / 2)).repeat_interleave(d_inner // G)
    w[d_inner : 2 * d_inner] *= x_scale[:, None]
    w[2 * d_inner : 2 * d_inner + 2 * gN] *= BC_SCALE
    w[2 * d_inner + 2 * gN :] *= DT_PROJ_SCALE
    return w


def _residual_out_plain(d: Draw) -> torch.Tensor:
    return d.normal(d.shape[-1] ** -0.5 / math.sqrt(d.n_layers))


#: kind -> {profile: rule}. Linear weights are N(0, 1/fan_in): unit-RMS inputs give unit-RMS outputs.
RULES: dict[str, dict[str, Callable[[Draw], torch.Tensor]]] = {
    "embedding": {"pitfalls": lambda d: d.normal(1.0), "plain": lambda d: d.normal(1.0)},
    "lm_head": {"pitfalls": lambda d: d.normal(LOGIT_STD / d.shape[-1] ** 0.5),
                "plain": lambda d: d.normal(LOGIT_STD / math.sqrt(d.shape[-1]))},
    "gated_norm": {"pitfalls": _gated_norm_pitfalls, "plain": lambda d: d.full(1.0)},
    "norm": {"pitfalls": lambda d: 1 + d.normal(NORM_JITTER), "plain": lambda d: d.full(1.0)},
    "A_log": {"pitfalls": lambda d: torch.log(A_RANGE[0] + (A_RANGE[1] - A_RANGE[0])
                                              * d.stratified(d.cfg.mamba_num_heads)),
              "plain": lambda d: torch.log(d.uniform(*A_RANGE)).to(d.dtype)},
    "D": {"pitfalls": lambda d: d.uniform(*D_RANGE), "plain": lambda d: d.full(1.0)},
    "dt_bias": {"pitfalls": _dt_bias_pitfalls, "plain": _dt_bias_plain},
    "conv_weight": {"pitfalls": lambda d: d.normal(CONV_W_STD), "plain": lambda d: d.normal(d.shape[-1] ** -0.5)},
    "conv_bias": {"pitfalls": lambda d: d.normal(CONV_B_STD), "plain": lambda d: d.full(0.0)},
    "router_bias": {"pitfalls": lambda d: ROUTER_BIAS_MEAN + d.normal(ROUTER_BIAS_STD), "plain": lambda d: d.full(0.0)},
    "bias": {"pitfalls": lambda d: d.full(0.0), "plain": lambda d: d.full(0.0)},
    "in_proj": {"pitfalls": _in_proj_pitfalls, "plain": lambda d: d.normal(d.shape[-1] ** -0.5)},
    "out_proj": {"pitfalls": lambda d: d.normal(d.shape[-1] ** -0.5) * OUT_PROJ_SCALE, "plain": _residual_out_plain},
    "latent_out": {"pitfalls": lambda d: d.normal(d.shape[-1] ** -0.5), "plain": _residual_out_plain},
    "linear": {"pitfalls": lambda d: d.normal(d.shape[-1] ** -0.5), "plain": lambda d: d.normal(d.shape[-1] ** -0.5)},
}
PROFILES = ("pitfalls", "plain")


def init_tensor(profile: str, d: Draw) -> torch.Tensor:
    """The value of tensor `d.name` under `profile`."""
    return RULES[kind_of(d.name, d.shape)][profile](d)

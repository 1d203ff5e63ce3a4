"""Parse any Nemotron-H `config.json` into a frozen, validated `ModelConfig`.

Glossary (config name -> letter used in shape comments across nemoh):
    D  hidden_size              H  mamba_num_heads       P  mamba_head_dim
    N  ssm_state_size           G  n_groups              K  conv_kernel
    Q  num_attention_heads      KV num_key_value_heads   Dh head_dim (attention)
    I  intermediate_size / moe_intermediate_size         E  n_routed_experts
    L  moe_latent_size (or D)   V  vocab_size            T  tokens, B batch, S cached tokens
Derived: d_inner = H*P (NOT expand*D), conv_dim = d_inner + 2*G*N.

Accepted spellings follow transformers 5 (`NemotronHConfig`): the pattern string
`hybrid_override_pattern` or the list `layers_block_type` (names mamba/attention/mlp/moe or
linear_attention/full_attention/mlp/moe), the legacy `mamba_*` keys, `attention_head_dim` for
`head_dim` and `rms_norm_eps`/`norm_eps` for `layer_norm_epsilon`. Missing keys take transformers'
defaults. The layer list's length is the layer count; `num_hidden_layers` may disagree and loses.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemoh import dtypes
from nemoh.errors import ConfigError
from nemoh.model.config_checks import (
    BOUNDS,
    KIND_TO_CHAR,
    LAYER_KINDS,
    LIST_NAMES,
    MAX_LAYERS,
    MAX_PARAMS,
    PATTERN_CHARS,
    check_json_values,
    check_transformers_types,
    decode_float_tags,
    is_int,
    is_num,
    read_json_file,
    show,
)

LEGACY_WINS = {"mamba_n_groups", "mamba_d_conv", "mamba_expand", "mamba_chunk_size", "mamba_conv_bias",
               "mamba_dt_min", "mamba_dt_max", "mamba_dt_limit", "mamba_dt_init_floor"}
ALIASES = {
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_expand": "expand",
    "mamba_chunk_size": "chunk_size",
    "mamba_conv_bias": "use_conv_bias",
    "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max",
    "mamba_dt_limit": "time_step_limit",
    "mamba_dt_init_floor": "time_step_floor",
    "attention_head_dim": "head_dim",
    "rms_norm_eps": "layer_norm_epsilon",
    "norm_eps": "layer_norm_epsilon",
}

@dataclass(frozen=True)
class ModelConfig:
    """A Nemotron-H model's shape and hyper-parameters, validated.

    Field names follow transformers' `NemotronHConfig`; defaults are its defaults.
    `layer_types` holds canonical kinds: mamba | attention | mlp | moe.
    """

    layer_types: tuple[str, ...]
    vocab_size: int = 131072
    hidden_size: int = 4096
    # attention
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    # dense MLP
    intermediate_size: int = 21504
    mlp_hidden_act: str = "relu2"
    mlp_bias: bool = False
    # Mamba2
    mamba_num_heads: int = 128
    mamba_head_dim: int = 64
    ssm_state_size: int = 128
    n_groups: int = 8
    conv_kernel: int = 4
    expand: int = 2
    chunk_size: int = 128
    use_conv_bias: bool = True
    use_bias: bool = False
    mamba_hidden_act: str = "silu"
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    mamba_ssm_cache_dtype: str = "float32"
    # MoE
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 7688
    moe_shared_expert_intermediate_size: int = 7688
    n_shared_experts: int = 1
    moe_latent_size: int | None = None
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    # model
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    num_nextn_predict_layers: int = 0
    max_position_embeddings: int = 4096
    torch_dtype: str = "bfloat16"
    source: str = field(default="<dict>", compare=False)

    # -- derived sizes ------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    @property
    def pattern(self) -> str:
        return "".join(KIND_TO_CHAR[k] for k in self.layer_types)

    @property
    def d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_groups * self.ssm_state_size

    @property
    def in_proj_dim(self) -> int:
        # [z (d_inner) | xBC (conv_dim) | dt (H)]
        return self.d_inner + self.conv_dim + self.mamba_num_heads

    @property
    def moe_input_size(self) -> int:
        return self.moe_latent_size if self.moe_latent_size is not None else self.hidden_size

    def params_estimate(self) -> int:
        """A quick upper estimate of the parameter count (no graph built), for the sanity bound."""
        D, V = self.hidden_size, self.vocab_size
        per = {
            "mamba": D * self.in_proj_dim + self.conv_dim * (self.conv_kernel + 1) + self.d_inner * (D + 1),
            "attention": 2 * D * self.head_dim * (self.num_attention_heads + self.num_key_value_heads),
            "mlp": 2 * D * self.intermediate_size,
            "moe": (self.n_routed_experts * (D + 1 + 2 * self.moe_input_size * self.moe_intermediate_size)
                    + 2 * D * self.moe_input_size
                    + 2 * D * self.moe_shared_expert_intermediate_size),
        }
        return 2 * V * D + sum(per[k] + D for k in self.layer_types)

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"{self.source}: field '{name}' {why}")

        if not self.layer_types:
            raise bad("hybrid_override_pattern/layers_block_type", "gives no layers")
        if len(self.layer_types) > MAX_LAYERS:
            raise bad("hybrid_override_pattern/layers_block_type",
                      f"gives {len(self.layer_types)} layers, more than the maximum {MAX_LAYERS}")
        for i, k in enumerate(self.layer_types):
            if k not in LAYER_KINDS:
                raise bad("layers_block_type", f"has unknown layer kind {k!r} at index {i}")
        positive = [
            "vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel", "chunk_size",
            "expand", "max_position_embeddings",
        ]
        if "mlp" in self.layer_types:
            positive.append("intermediate_size")
        if "moe" in self.layer_types:
            positive += ["n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "n_group",
                         "topk_group"]
        for name in positive:
            v = getattr(self, name)
            if not is_int(v) or v <= 0:
                raise bad(name, f"must be a positive integer, got {show(v)}")
        for name in ("moe_shared_expert_intermediate_size", "n_shared_experts", "num_nextn_predict_layers"):
            v = getattr(self, name)
            if not is_int(v) or v < 0:
                raise bad(name, f"must be a non-negative integer, got {show(v)}")
        if self.moe_latent_size is not None and (not is_int(self.moe_latent_size) or self.moe_latent_size <= 0):
            raise bad("moe_latent_size", f"must be a positive integer or null, got {show(self.moe_latent_size)}")
        for name in ("intermediate_size", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
                     "n_group", "topk_group"):
            v = getattr(self, name)
            if not is_int(v):  # read only by some layer kinds, but passed to transformers all the same
                raise bad(name, f"must be an integer, got {show(v)}")
        for name, limit in BOUNDS.items():
            v = getattr(self, name)
            if v is not None and v > limit:
                raise bad(name, f"is {show(v)}, more than the maximum {limit:,}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            for x in (v if isinstance(v, tuple) else (v,)):
                if x is not None and (not is_int(x) or not 0 <= x < self.vocab_size):
                    raise bad(name, f"must be a token id in [0, {self.vocab_size}) (vocab_size) or null, "
                              f"got {show(v)}")
        if self.mamba_num_heads % self.n_groups:
            raise bad("mamba_num_heads", f"({self.mamba_num_heads}) must be divisible by n_groups ({self.n_groups})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad("num_attention_heads", f"({self.num_attention_heads}) must be divisible by "
                      f"num_key_value_heads ({self.num_key_value_heads})")
        if "moe" in self.layer_types:
            E = self.n_routed_experts
            if E % self.n_group:
                raise bad("n_routed_experts", f"({E}) must be divisible by n_group ({self.n_group})")
            if self.topk_group > self.n_group:
                raise bad("topk_group", f"({self.topk_group}) must be <= n_group ({self.n_group})")
            if E // self.n_group < 2 and self.n_group > 1:
                raise bad("n_group", "leaves fewer than 2 experts per group (group score = sum of top-2)")
            if self.num_experts_per_tok > self.topk_group * (E // self.n_group):
                raise bad("num_experts_per_tok", f"({self.num_experts_per_tok}) exceeds the experts reachable "
                          f"in topk_group={self.topk_group} groups of {E // self.n_group}")
        if self.mlp_hidden_act != "relu2":
            raise bad("mlp_hidden_act", f"must be 'relu2' (squared ReLU), got {self.mlp_hidden_act!r}")
        if self.mamba_hidden_act != "silu":
            raise bad("mamba_hidden_act", f"must be 'silu', got {self.mamba_hidden_act!r}")
        if self.params_estimate() > MAX_PARAMS:
            raise bad("hidden_size", f"and the other sizes give about {self.params_estimate():.3g} parameters, "
                      f"more than the maximum {MAX_PARAMS:.3g}")
        if self.tie_word_embeddings:
            raise bad("tie_word_embeddings", "is true, but Nemotron-H has an untied lm_head")
        for name in ("layer_norm_epsilon", "time_step_min", "time_step_max", "time_step_floor"):
            v = getattr(self, name)
            if not is_num(v) or not (v > 0) or not math.isfinite(float(v) if abs(v) < 1e300 else math.inf):
                raise bad(name, f"must be a positive finite number, got {show(v)}")
        lim = self.time_step_limit
        if not (isinstance(lim, tuple) and len(lim) == 2 and all(isinstance(x, float) for x in lim)
                and 0.0 <= lim[0] < lim[1]):
            raise bad("time_step_limit", f"must be [low, high] with 0 <= low < high, got {show(list(lim))}")
        if not is_num(self.routed_scaling_factor) or not math.isfinite(self.routed_scaling_factor):
            raise bad("routed_scaling_factor", f"must be a finite number, got {show(self.routed_scaling_factor)}")
        for f in dataclasses.fields(self):
            if f.type == "bool" and not isinstance(getattr(self, f.name), bool):
                raise bad(f.name, f"must be true or false, got {show(getattr(self, f.name))}")
        for name in ("torch_dtype", "mamba_ssm_cache_dtype"):
            if not isinstance(getattr(self, name), str) or getattr(self, name) not in dtypes.NAMES:
                raise bad(name, f"must be one of {', '.join(dtypes.NAMES)}, got {show(getattr(self, name))}")

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Canonical JSON-ready form (round-trips through `from_dict`)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "source"}
        d["layers_block_type"] = list(d.pop("layer_types"))
        lo, hi = self.time_step_limit
        d["time_step_limit"] = [lo, "inf" if math.isinf(hi) else hi]
        if isinstance(self.eos_token_id, tuple):
            d["eos_token_id"] = list(self.eos_token_id)
        return d

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<dict>") -> ModelConfig:
        return parse_config(raw, source)


def _layer_types(raw: dict[str, Any], source: str) -> tuple[str, ...]:
    lst = raw.get("layers_block_type", raw.get("layer_types"))
    pat = raw.get("hybrid_override_pattern")
    if lst is not None:
        if not isinstance(lst, list) or not all(isinstance(x, str) for x in lst):
            raise ConfigError(f"{source}: field 'layers_block_type' must be a list of strings")
        if len(lst) > MAX_LAYERS:
            raise ConfigError(f"{source}: field 'layers_block_type' gives {len(lst)} layers, more than the "
                              f"maximum {MAX_LAYERS}")
        kinds = []
        for i, name in enumerate(lst):
            if name not in LIST_NAMES:
                raise ConfigError(
                    f"{source}: field 'layers_block_type' has unknown layer kind {show(name)} at index {i} "
                    f"(expected one of {', '.join(sorted(LIST_NAMES))})")
            kinds.append(LIST_NAMES[name])
        return tuple(kinds)
    if pat is not None:
        if not isinstance(pat, str):
            raise ConfigError(f"{source}: field 'hybrid_override_pattern' must be a string")
        if len(pat) > MAX_LAYERS:
            raise ConfigError(f"{source}: field 'hybrid_override_pattern' gives {len(pat)} layers, more than the "
                              f"maximum {MAX_LAYERS}")
        for i, ch in enumerate(pat):
            if ch not in PATTERN_CHARS:
                raise ConfigError(
                    f"{source}: field 'hybrid_override_pattern' has unknown layer kind {ch!r} at index {i} "
                    "(expected M, *, - or E)")
        return tuple(PATTERN_CHARS[ch] for ch in pat)
    # transformers' default when neither is given
    return ("mamba", "moe", "attention", "mlp")


_INT_FIELDS = {f.name for f in dataclasses.fields(ModelConfig) if f.type in ("int", "int | None")}


def parse_config(raw: Any, source: str = "<dict>") -> ModelConfig:
    """Build a ModelConfig from a parsed config.json dict, resolving every spelling."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object at the top level, got {type(raw).__name__}")
    check_json_values(raw, source)
    raw = decode_float_tags(raw, source)
    mt = raw.get("model_type", "nemotron_h")
    if mt != "nemotron_h":
        raise ConfigError(f"{source}: field 'model_type' is {show(mt)}, expected 'nemotron_h'")
    vals: dict[str, Any] = {}
    fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"layer_types", "source"}
    for key, value in raw.items():
        canon = ALIASES.get(key, key)
        if canon not in fields:
            continue
        if canon != key and canon in raw and key not in LEGACY_WINS:
            continue  # canonical spelling present and preferred
        if canon == key and any(raw_key in raw for raw_key in LEGACY_WINS if ALIASES[raw_key] == canon):
            continue  # a mamba_* legacy spelling overrides it, as in transformers
        vals[canon] = value
    if "dtype" in raw and "torch_dtype" not in raw:
        vals["torch_dtype"] = raw["dtype"]
    for name in list(vals):
        v = vals[name]
        if name in _INT_FIELDS and isinstance(v, float) and v.is_integer():
            vals[name] = int(v)
    if "time_step_limit" in vals:
        lim = vals["time_step_limit"]
        try:
            # tagged floats ({"__float__": "Infinity"}) are decoded above; "inf" strings come from nemoh's own
            # ModelConfig.to_dict
            lo, hi = (float(x) for x in lim)
        except (TypeError, ValueError, KeyError, OverflowError):
            raise ConfigError(f"{source}: field 'time_step_limit' must be a pair of numbers, got {show(lim)}") from None
        vals["time_step_limit"] = (lo, hi)
    if isinstance(vals.get("eos_token_id"), list):
        vals["eos_token_id"] = tuple(vals["eos_token_id"])
    if vals.get("num_key_value_heads") is None and "num_attention_heads" in vals:
        vals["num_key_value_heads"] = vals["num_attention_heads"]
    for name in ("num_key_value_heads",):
        if vals.get(name, 0) is None:
            vals.pop(name)
    if vals.get("torch_dtype") is None:
        vals.pop("torch_dtype", None)
    if raw.get("attention_bias") is True:
        raise ConfigError(f"{source}: field 'attention_bias' is true, but Nemotron-H attention has no bias "
                          "(transformers ignores it)")
    try:
        return ModelConfig(layer_types=_layer_types(raw, source), source=source, **vals)
    except (TypeError, ValueError, OverflowError) as e:  # a wrong type inside a comparison
        raise ConfigError(f"{source}: {str(e).splitlines()[0][:200]}") from None


def load_config(path: str | Path) -> ModelConfig:
    """Read `config.json` (or a directory holding one).

    A file on disk is also held to the types transformers insists on (`check_transformers_types`),
    since `conformance` hands the same file to transformers.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise ConfigError(f"{p}: no such file (a checkpoint directory needs a config.json)")
    raw = read_json_file(p, "config.json")
    if isinstance(raw, dict):
        check_json_values(raw, str(p))
        raw = decode_float_tags(raw, str(p))
        check_transformers_types(raw, str(p))
    return parse_config(raw, str(p))

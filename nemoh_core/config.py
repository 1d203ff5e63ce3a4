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
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

# Canonical layer kinds and every spelling that names them.
LAYER_KINDS = ("mamba", "attention", "mlp", "moe")
PATTERN_CHARS = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
KIND_TO_CHAR = {v: k for k, v in PATTERN_CHARS.items()}
LIST_NAMES = {
    "mamba": "mamba",
    "linear_attention": "mamba",
    "attention": "attention",
    "full_attention": "attention",
    "mlp": "mlp",
    "moe": "moe",
}

# Legacy spelling -> canonical key. Priority when both spellings are present follows transformers:
# it pops the `mamba_*` keys over the canonical field (legacy wins), and does not know the last three
# at all (canonical wins).
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

DTYPES = ("float64", "float32", "bfloat16", "float16")


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

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"{self.source}: field '{name}' {why}")

        if not self.layer_types:
            raise bad("hybrid_override_pattern/layers_block_type", "gives no layers")
        for i, k in enumerate(self.layer_types):
            if k not in LAYER_KINDS:
                raise bad("layers_block_type", f"has unknown layer kind {k!r} at index {i}")
        positive = [
            "vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel", "chunk_size",
        ]
        if "mlp" in self.layer_types:
            positive.append("intermediate_size")
        if "moe" in self.layer_types:
            positive += ["n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "n_group",
                         "topk_group"]
        for name in positive:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise bad(name, f"must be a positive integer, got {v!r}")
        for name in ("moe_shared_expert_intermediate_size", "n_shared_experts", "num_nextn_predict_layers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise bad(name, f"must be a non-negative integer, got {v!r}")
        if self.moe_latent_size is not None and (not isinstance(self.moe_latent_size, int)
                                                 or self.moe_latent_size <= 0):
            raise bad("moe_latent_size", f"must be a positive integer or null, got {self.moe_latent_size!r}")
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
        if self.tie_word_embeddings:
            raise bad("tie_word_embeddings", "is true, but Nemotron-H has an untied lm_head")
        for name in ("layer_norm_epsilon", "time_step_min", "time_step_max", "time_step_floor"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not (v > 0) or not math.isfinite(v):
                raise bad(name, f"must be a positive finite number, got {v!r}")
        lo, hi = self.time_step_limit
        if not (0.0 <= lo < hi):
            raise bad("time_step_limit", f"must be [low, high] with 0 <= low < high, got {[lo, hi]}")
        if not isinstance(self.routed_scaling_factor, (int, float)) or isinstance(self.routed_scaling_factor, bool):
            raise bad("routed_scaling_factor", f"must be a number, got {self.routed_scaling_factor!r}")
        for f in dataclasses.fields(self):
            if f.type == "bool" and not isinstance(getattr(self, f.name), bool):
                raise bad(f.name, f"must be true or false, got {getattr(self, f.name)!r}")
        for name in ("torch_dtype", "mamba_ssm_cache_dtype"):
            if getattr(self, name) not in DTYPES:
                raise bad(name, f"must be one of {', '.join(DTYPES)}, got {getattr(self, name)!r}")

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
        kinds = []
        for i, name in enumerate(lst):
            if name not in LIST_NAMES:
                raise ConfigError(
                    f"{source}: field 'layers_block_type' has unknown layer kind {name!r} at index {i} "
                    f"(expected one of {', '.join(sorted(LIST_NAMES))})")
            kinds.append(LIST_NAMES[name])
        return tuple(kinds)
    if pat is not None:
        if not isinstance(pat, str):
            raise ConfigError(f"{source}: field 'hybrid_override_pattern' must be a string")
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
        raise ConfigError(f"{source}: expected a JSON object at the top level")
    mt = raw.get("model_type", "nemotron_h")
    if mt != "nemotron_h":
        raise ConfigError(f"{source}: field 'model_type' is {mt!r}, expected 'nemotron_h'")
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
            # transformers 5 writes infinity as {"__float__": "Infinity"}; others write "inf" or Infinity
            lo, hi = (float(x["__float__"] if isinstance(x, dict) else x) for x in lim)
        except (TypeError, ValueError, KeyError):
            raise ConfigError(f"{source}: field 'time_step_limit' must be a pair of numbers, got {lim!r}") from None
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
    if raw.get("attention_bias"):
        raise ConfigError(f"{source}: field 'attention_bias' is true, but Nemotron-H attention has no bias "
                          "(transformers ignores it)")
    try:
        return ModelConfig(layer_types=_layer_types(raw, source), source=source, **vals)
    except TypeError as e:  # a wrong type inside a comparison
        raise ConfigError(f"{source}: {e}") from None


def load_config(path: str | Path) -> ModelConfig:
    """Read `config.json` (or a directory holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ConfigError(f"{p}: no such file (a checkpoint directory needs a config.json)")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    return parse_config(raw, str(p))

"""What a config.json may hold before nemoh builds anything from it: sane bounds on every size (a
1M-character pattern or a 10^30 hidden size is refused by field name, not met with MemoryError), the
types transformers insists on for the keys nemoh hands it, and reading the file itself safely
(regular files only, bounded size and nesting, integers of absurd length refused by name).

nemoh.model.config applies these while it parses; they live apart so the model's own fields stay
readable there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nemoh import dtypes
from nemoh.errors import ConfigError

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

# Sane maxima, far above every released model (Nemotron-H 56B: 118 layers, D 8192, V 131072), so a
# hostile or corrupted config is refused with the field named instead of running out of memory.
MAX_LAYERS = 4096
MAX_VOCAB = 1 << 22
MAX_DIM = 1 << 18  # hidden, intermediate, head and state sizes
MAX_HEADS = 1 << 14  # attention and Mamba heads, groups, experts
MAX_CONV_KERNEL = 1024
MAX_CHUNK = 1 << 16
MAX_POSITIONS = 1 << 24
MAX_NEXTN = 64
MAX_PARAMS = 1 << 45  # ~35T parameters
MAX_JSON_DEPTH = 64
MAX_JSON_DIGITS = 100

BOUNDS = {
    "vocab_size": MAX_VOCAB, "hidden_size": MAX_DIM, "num_attention_heads": MAX_HEADS,
    "num_key_value_heads": MAX_HEADS, "head_dim": MAX_DIM, "intermediate_size": MAX_DIM,
    "mamba_num_heads": MAX_HEADS, "mamba_head_dim": MAX_DIM, "ssm_state_size": MAX_DIM, "n_groups": MAX_HEADS,
    "conv_kernel": MAX_CONV_KERNEL, "expand": MAX_HEADS, "chunk_size": MAX_CHUNK, "n_routed_experts": MAX_HEADS,
    "num_experts_per_tok": MAX_HEADS, "moe_intermediate_size": MAX_DIM, "moe_shared_expert_intermediate_size": MAX_DIM,
    "n_shared_experts": MAX_HEADS, "moe_latent_size": MAX_DIM, "n_group": MAX_HEADS, "topk_group": MAX_HEADS,
    "num_nextn_predict_layers": MAX_NEXTN, "max_position_embeddings": MAX_POSITIONS,
}

# The types transformers' NemotronHConfig (a strict dataclass) insists on, for every key of a
# config.json it reads: `conformance` hands the same file to transformers, which raises on a wrong
# type; nemoh refuses it first, naming the field. (Keys transformers does not know, such as
# rms_norm_eps or attention_head_dim, it stores unchecked; nemoh's own checks cover those it reads.)
#   int, int?, bool, bool?, float (a JSON float, not 1), number (float or int), str, ids (int, list of
#   ints or null), floats (a list of JSON floats), strs? (a list of strings or null), dict?
TRANSFORMERS_TYPES: dict[str, str] = {
    **dict.fromkeys((
        "vocab_size", "hidden_size", "num_attention_heads", "head_dim", "max_position_embeddings",
        "intermediate_size", "ssm_state_size", "mamba_num_heads", "mamba_head_dim", "n_groups", "conv_kernel",
        "expand", "chunk_size", "n_routed_experts", "n_shared_experts", "moe_intermediate_size",
        "moe_shared_expert_intermediate_size", "num_experts_per_tok", "n_group", "topk_group",
        "num_nextn_predict_layers", "num_logits_to_keep", "chunk_size_feed_forward", "num_labels",
        "mamba_n_groups", "mamba_d_conv", "mamba_expand", "mamba_chunk_size", "num_local_experts"), "int"),
    **dict.fromkeys(("num_key_value_heads", "pad_token_id", "bos_token_id", "sliding_window", "moe_latent_size"),
                    "int?"),
    **dict.fromkeys((
        "tie_word_embeddings", "use_cache", "attention_bias", "mlp_bias", "use_mamba_kernels", "use_conv_bias",
        "mamba_proj_bias", "output_router_logits", "moe_shared_expert_overlap", "norm_topk_prob", "use_bias",
        "residual_in_fp32", "rescale_prenorm_residual", "is_encoder_decoder", "mamba_conv_bias"), "bool"),
    **dict.fromkeys(("output_hidden_states", "return_dict", "output_attentions"), "bool?"),
    **dict.fromkeys(("time_step_min", "time_step_max", "time_step_floor", "initializer_range", "layer_norm_epsilon",
                     "mamba_dt_min", "mamba_dt_max", "mamba_dt_init_floor"), "float"),
    **dict.fromkeys(("attention_dropout", "hidden_dropout", "routed_scaling_factor"), "number"),
    **dict.fromkeys(("mlp_hidden_act", "mamba_hidden_act", "mamba_ssm_cache_dtype", "model_type"), "str"),
    **dict.fromkeys(("torch_dtype", "dtype", "transformers_version", "problem_type"), "str?"),
    "eos_token_id": "ids",
    **dict.fromkeys(("time_step_limit", "mamba_dt_limit"), "floats"),
    **dict.fromkeys(("layers_block_type", "layer_types", "mtp_layers_block_type", "architectures"), "strs?"),
    **dict.fromkeys(("id2label", "label2id", "auto_map"), "dict?"),
    **dict.fromkeys(("hybrid_override_pattern", "mtp_hybrid_override_pattern"), "str"),
}


def show(v: Any, limit: int = 60) -> str:
    """A short, safe repr for error messages (huge ints and long strings are summarised)."""
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10 ** 30:
        return f"an integer of {len(str(abs(v))) if abs(v) < 10 ** 4000 else 'over 4000'} digits"
    if isinstance(v, _TooLong):
        return f"an integer of {v.digits} digits"
    try:
        r = repr(v)
    except (ValueError, RecursionError):
        r = f"<{type(v).__name__}>"
    return r if len(r) <= limit else r[:limit - 3] + "..."


class _TooLong:
    """A JSON integer with more digits than MAX_JSON_DIGITS (Python would refuse or choke on it)."""

    def __init__(self, digits: int):
        self.digits = digits

    def __repr__(self) -> str:
        return f"<integer of {self.digits} digits>"


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _type_ok(kind: str, v: Any) -> bool:
    if kind.endswith("?") and v is None:
        return True
    kind = kind.rstrip("?")
    if kind == "int":
        return is_int(v)
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "float":
        return isinstance(v, float)
    if kind == "number":
        return is_num(v)
    if kind == "str":
        return isinstance(v, str)
    if kind == "ids":
        return v is None or is_int(v) or (isinstance(v, list) and all(is_int(x) for x in v))
    if kind == "floats":
        return isinstance(v, list) and all(isinstance(x, float) for x in v)
    if kind == "strs":
        return isinstance(v, list) and all(isinstance(x, str) for x in v)
    if kind == "dict":
        return isinstance(v, dict)
    return True


_KIND_TEXT = {
    "int": "an integer", "int?": "an integer or null", "bool": "true or false", "bool?": "true, false or null",
    "float": "a JSON number with a decimal point or exponent (transformers refuses an integer here, e.g. 1.0 not 1)",
    "number": "a number", "str": "a string", "str?": "a string or null",
    "ids": "a token id, a list of token ids, or null",
    "floats": "a list of JSON floats such as [0.0, Infinity] (transformers refuses integers and strings here)",
    "strs?": "a list of strings or null", "dict?": "an object or null",
}


PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


def check_transformers_types(raw: dict[str, Any], source: str) -> None:
    """Every key transformers' NemotronHConfig reads has the type it insists on (see TRANSFORMERS_TYPES)."""
    for key, kind in TRANSFORMERS_TYPES.items():
        if key in raw and not _type_ok(kind, raw[key]):
            raise ConfigError(f"{source}: field '{key}' must be {_KIND_TEXT[kind]}, got {show(raw[key])}")
    for key in ("is_heterogeneous", "per_layer_attributes", "sub_configs", "use_return_dict"):
        if key in raw:  # read-only properties of transformers' config: setting one raises
            raise ConfigError(f"{source}: field '{key}' cannot be set (transformers computes it)")
    for key in ("rope_scaling", "rope_parameters"):
        if raw.get(key) not in (None, {}):  # transformers validates it against RoPE types nemoh has no use for
            raise ConfigError(f"{source}: field '{key}' must be null: Nemotron-H attention has no rotary "
                              f"embedding, got {show(raw[key])}")
    for key in ("dtype", "torch_dtype"):
        if isinstance(raw.get(key), str) and raw[key] not in dtypes.NAMES:
            raise ConfigError(f"{source}: field '{key}' must be one of {', '.join(dtypes.NAMES)}, "
                              f"got {show(raw[key])}")
    id2label = raw.get("id2label")
    if isinstance(id2label, dict):
        for k, v in id2label.items():
            if not k.strip().lstrip("+-").isdigit() or not k.isascii() or not isinstance(v, str):
                raise ConfigError(f"{source}: field 'id2label' must map integer strings to label strings, "
                                  f"got {show(k)}: {show(v)}")
    label2id = raw.get("label2id")
    if isinstance(label2id, dict) and not all(is_int(v) or isinstance(v, str) for v in label2id.values()):
        raise ConfigError(f"{source}: field 'label2id' must map labels to integers")
    if "num_labels" in raw and is_int(raw["num_labels"]) and not 0 <= raw["num_labels"] <= 1 << 16:
        raise ConfigError(f"{source}: field 'num_labels' must be in [0, 65536], got {show(raw['num_labels'])}")
    problem = raw.get("problem_type")
    if problem is not None and problem not in PROBLEM_TYPES:
        raise ConfigError(f"{source}: field 'problem_type' must be null or one of {', '.join(PROBLEM_TYPES)}, "
                          f"got {show(problem)}")
    labels = len(id2label) if isinstance(id2label, dict) else raw.get("num_labels", 2)
    if problem == "single_label_classification" and labels == 1:
        raise ConfigError(f"{source}: field 'problem_type' is single_label_classification with one label")
    mtp = raw.get("mtp_layers_block_type")
    if isinstance(mtp, list):
        for i, name in enumerate(mtp):
            if name not in LIST_NAMES:
                raise ConfigError(f"{source}: field 'mtp_layers_block_type' has unknown layer kind {show(name)} "
                                  f"at index {i}")


def check_json_values(raw: Any, source: str) -> None:
    """No JSON value nested deeper than MAX_JSON_DEPTH and no integer over MAX_JSON_DIGITS digits
    anywhere in the file (iterative: a deep file cannot exhaust the stack here)."""
    stack: list[tuple[str, Any, int]] = [("", raw, 0)]
    while stack:
        where, v, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ConfigError(f"{source}: field '{where.split('.')[0].split('[')[0]}' is nested more than "
                              f"{MAX_JSON_DEPTH} levels deep")
        if isinstance(v, _TooLong) or (is_int(v) and abs(v) >= 10 ** MAX_JSON_DIGITS):
            raise ConfigError(f"{source}: field '{where or '(top level)'}' is {show(v)}; integers are limited "
                              f"to {MAX_JSON_DIGITS} digits")
        if isinstance(v, dict):
            stack.extend((f"{where}.{k}" if where else str(k), x, depth + 1) for k, x in v.items())
        elif isinstance(v, list):
            stack.extend((f"{where}[{i}]", x, depth + 1) for i, x in enumerate(v))



#: transformers >= 5.3 writes the floats JSON has no literal for as tagged objects ({"__float__": "Infinity"}) in
#: config.json, and reads them back as floats (PreTrainedConfig._encode/_decode_special_floats); older writers
#: (and Python's json) use the bare literals Infinity, -Infinity and NaN, which json.loads reads as they are
FLOAT_TAG = "__float__"
FLOAT_TAGS = {"Infinity": float("inf"), "-Infinity": float("-inf"), "NaN": float("nan")}


def decode_float_tags(raw: Any, source: str) -> Any:
    """`raw` with every {"__float__": "Infinity" | "-Infinity" | "NaN"} replaced by that float, as transformers
    reads it. Any other {"__float__": ...} object is refused, naming the field (transformers would leave it an
    object, and then refuse the field's type)."""

    def walk(v: Any, where: str) -> Any:
        if isinstance(v, dict):
            if FLOAT_TAG in v:
                tag = v[FLOAT_TAG]
                if len(v) != 1 or not isinstance(tag, str) or tag not in FLOAT_TAGS:
                    raise ConfigError(f"{source}: field '{where or '(top level)'}' is {show(v)}; a tagged float is "
                                      f'{{"{FLOAT_TAG}": "Infinity"}}, "-Infinity" or "NaN", as transformers writes it')
                return FLOAT_TAGS[tag]
            return {k: walk(x, f"{where}.{k}" if where else str(k)) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x, f"{where}[{i}]") for i, x in enumerate(v)]
        return v

    return walk(raw, "")


MAX_CONFIG_BYTES = 64 << 20


def _parse_int(text: str) -> int | _TooLong:
    digits = len(text.lstrip("-"))
    return _TooLong(digits) if digits > MAX_JSON_DIGITS else int(text)


def read_json_file(p: Path, what: str = "file", max_bytes: int = MAX_CONFIG_BYTES, error=ConfigError) -> Any:
    """Parse a small JSON file: a regular file (never a FIFO or device: no hang), at most `max_bytes`,
    UTF-8, nested at most MAX_JSON_DEPTH deep, integers of at most MAX_JSON_DIGITS digits (larger ones
    come back as a marker the field checks refuse by name). Any failure is one `error` line."""
    check_regular_file(p, what, error)
    try:
        with open(p, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise error(f"{p}: cannot be read ({e.strerror})") from None
    if len(data) > max_bytes:
        raise error(f"{p}: larger than {max_bytes >> 20} MiB; not a {what}")
    try:
        return json.loads(data.decode("utf-8"), parse_int=_parse_int)
    except json.JSONDecodeError as e:
        raise error(f"{p}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError:
        raise error(f"{p}: not UTF-8 text") from None
    except RecursionError:
        raise error(f"{p}: malformed JSON: nested too deeply") from None
    except ValueError as e:
        raise error(f"{p}: malformed JSON: {str(e).splitlines()[0][:200]}") from None


def check_regular_file(p: Path, what: str = "file", error=ConfigError) -> None:
    """`p` exists and is a regular file (a symlink to one is fine); a FIFO, device or folder is refused."""
    import os
    import stat

    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise error(f"{p}: no such file") from None
    except OSError as e:
        raise error(f"{p}: cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else \
            "a device or socket"
        raise error(f"{p}: is {kind}, expected a regular {what}")

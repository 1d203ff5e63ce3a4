"""Tiny random-weight Nemotron-H checkpoints, written in the real hub layout.

A preset is a release-style `config.json` dict plus a seed. `write_checkpoint` builds the model with
transformers, overwrites every tensor from its own seeded generator, lets `save_pretrained` write the
hub layout (`backbone.*`, one tensor per expert), then puts the preset's own `config.json` on disk (so
loaders see pattern strings, layer lists and legacy key spellings as releases have them) and a
byte-level BPE tokenizer trained offline on the shipped corpus.

The weight statistics are chosen so that known implementation bugs change the outputs, which
transformers' own init (dt_bias = 1, D = 1, zero router bias, one norm scale) would hide:
  * dt lands on both sides of time_step_min, so a dt clamp (or a missing one) is visible;
  * A, D, dt differ per head, so a head/group mix-up is visible;
  * each SSM group has its own activation scale and gated-norm weight scale, so normalising all of
    d_inner at once, or tiling instead of repeat-interleaving groups, is visible;
  * the router correction bias is large with a tiny spread, so rounding it to bf16 changes routing;
  * lm_head gives logits with a std of a few units, so top-1 is meaningful.

Presets made from released configs (`tiny-8b`, `tiny-nano-30b`) come from `shrink_release`, applied to
the release files in `releases/`.

Importing this module imports neither torch nor transformers and writes nothing.

Why one file: a preset's name resolves to its config, its bytes and its cache entry here; the hand-made
table, the shrunk releases, the writer and the cache change together (the cache key hashes them).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from nemoh.errors import NemohError, did_you_mean

# Bump when the bytes written for a given preset and seed change (weights, tokenizer, file set):
# it is part of the cache fingerprint, so stale cached checkpoints are not reused.
GENERATOR_VERSION = 1
QUANT_WRITER_VERSION = 1  # the same for the bytes of quantized presets (nemoh.model.quant_writer)

VOCAB_SIZE = 512
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3 = pad, bos, eos, unk
CORPUS_FILE = "tokenizer_corpus.txt"  # package data next to this module
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# Weight statistics: the `pitfalls` profile of nemoh.model.init (one table for presets and bench models).


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    config: dict[str, Any] = field(hash=False)  # release-style config.json
    seed: int


# Keys every preset shares; release files carry this boilerplate too.
_COMMON: dict[str, Any] = {
    "architectures": ["NemotronHForCausalLM"],
    "model_type": "nemotron_h",
    "vocab_size": VOCAB_SIZE,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "time_step_min": 0.001,
    "time_step_max": 0.1,
    "time_step_floor": 1e-4,
    "layer_norm_epsilon": 1e-5,
    "use_conv_bias": True,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "mamba_ssm_cache_dtype": "float32",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "hidden_dropout": 0.0,
    "initializer_range": 0.02,
    "conv_kernel": 4,
    "expand": 2,
    "mamba_hidden_act": "silu",
    "mamba_proj_bias": False,
    "mlp_bias": False,
    "mlp_hidden_act": "relu2",
    "max_position_embeddings": 4096,
    "num_logits_to_keep": 1,
    "rescale_prenorm_residual": True,
    "residual_in_fp32": False,
    "use_bias": False,
    "use_cache": True,
    "use_mamba_kernels": True,
}


def _preset(name: str, description: str, seed: int, **keys: Any) -> Preset:
    return Preset(name, description, {**_COMMON, **keys}, seed)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        _preset(
            "tiny-dense",
            "Nemotron-H 8B / Nano 9B v2 style (M, -, *): pattern string, 8B key spellings",
            1001,
            hybrid_override_pattern="M-M*-M-",
            num_hidden_layers=7,
            hidden_size=64,
            mamba_num_heads=8,
            mamba_head_dim=12,  # d_inner 96 != expand * hidden 128
            n_groups=2,
            ssm_state_size=16,
            chunk_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,  # != 64 / 4; transformers reads only `head_dim`
            attention_head_dim=24,  # the 8B file's spelling, kept alongside
            rms_norm_eps=1e-5,  # ditto for layer_norm_epsilon
            intermediate_size=160,
        ),
        _preset(
            "tiny-moe",
            "Nemotron 3 Nano 30B-A3B style (M, E, *): sigmoid top-k routing with correction bias",
            1002,
            hybrid_override_pattern="MEM*EME",
            num_hidden_layers=7,
            hidden_size=64,
            mamba_num_heads=6,
            mamba_head_dim=16,  # d_inner 96 != 128
            n_groups=2,
            ssm_state_size=16,
            chunk_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,
            intermediate_size=48,
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            moe_shared_expert_intermediate_size=96,
            n_shared_experts=1,
            n_group=1,
            topk_group=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            norm_eps=1e-5,  # the Nano file's duplicate spelling
            rope_theta=10000,  # present in the release, unused by the model (no RoPE)
            partial_rotary_factor=1.0,
        ),
        _preset(
            "tiny-latent-moe",
            "Nemotron 3 Super style latent MoE (M, E, *): group-limited routing, latent projections",
            1003,
            hybrid_override_pattern="ME*EME",
            num_hidden_layers=6,
            hidden_size=48,
            mamba_num_heads=8,
            mamba_head_dim=10,  # d_inner 80 != 96
            n_groups=4,
            ssm_state_size=16,
            chunk_size=128,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,  # != 48 / 4
            intermediate_size=40,
            n_routed_experts=16,
            num_experts_per_tok=4,
            moe_intermediate_size=40,
            moe_shared_expert_intermediate_size=64,
            moe_latent_size=32,
            n_shared_experts=1,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
        ),
        _preset(
            "tiny-list",
            "layer-list config: legacy `layers_block_type` names and mamba_* keys, stale num_hidden_layers",
            1004,
            layers_block_type=["mamba", "mlp", "attention", "mamba", "mlp", "mamba"],
            num_hidden_layers=52,  # disagrees with the list on purpose: the list wins
            hidden_size=64,
            mamba_num_heads=4,
            mamba_head_dim=20,  # d_inner 80 != 128
            mamba_n_groups=2,
            ssm_state_size=8,
            mamba_chunk_size=32,  # a 64-token prompt spans two chunks
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=40,  # != 64 / 2
            intermediate_size=128,
        ),
    )
}


# --------------------------------------------------------------------------------------------
# Presets made from released configs

RELEASES_DIR = Path(__file__).with_name("releases")  # released config.json files, as package data
WIDTH_DIVISOR = 32  # model widths (hidden, d_inner, MLP and expert sizes) shrink by this, to multiples of
WIDTH_QUANTUM = 32  # this: llama.cpp's Q8_0/Q4_0 block, so quantized tables cover every matrix


def _width(n: int) -> int:
    return max(WIDTH_QUANTUM, round(n / WIDTH_DIVISOR / WIDTH_QUANTUM) * WIDTH_QUANTUM)


def shrink_release(release: dict[str, Any], source: str) -> dict[str, Any]:
    """A tiny config made from a released `config.json`, keeping what an engine's mapping depends on.

    Every key of the release stays, under the release's own spelling (legacy `attention_head_dim`,
    `rms_norm_eps`, `norm_eps`, the `auto_map` nemoh never follows), plus `head_dim` where only the
    legacy spelling is there (transformers reads no other); only sizes change:
      * the layer pattern is cut after the first prefix that holds every block kind the release uses,
        plus one layer (8B: `M-M-M-M*-`, Nano 30B: `MEMEM*E`), and num_hidden_layers follows it;
      * widths (hidden, d_inner, MLP, expert and shared-expert sizes) divided by WIDTH_DIVISOR, rounded
        to multiples of WIDTH_QUANTUM, so d_inner == expand * hidden exactly where the release has it;
      * per-head sizes divided by 8 (mamba head dim, attention head dim), the SSM state by 8, the scan
        chunk by 4 (a 64-token prompt spans two chunks); counts kept: SSM groups, conv taps, experts,
        top-k, routing groups, shared experts, scaling; attention heads follow hidden / head_dim where
        the release has that equality, the query:KV ratio is kept and KV heads divided by 4;
      * vocab is the presets' tokenizer's; torch_dtype says float32, as the written weights are.
    """
    from nemoh.model.config import parse_config

    cfg = parse_config(release, source)
    kinds = cfg.layer_types
    used = set(kinds)
    cut = next(i + 1 for i in range(len(kinds)) if set(kinds[: i + 1]) == used)
    cut = min(cut + 1, len(kinds))
    out = copy.deepcopy(release)

    def put(canonical: str, value: Any, *spellings: str) -> None:
        keys = [k for k in (canonical, *spellings) if k in release] or [canonical]
        for k in keys:
            out[k] = value

    if "hybrid_override_pattern" in release:
        out["hybrid_override_pattern"] = release["hybrid_override_pattern"][:cut]
    else:
        key = "layers_block_type" if "layers_block_type" in release else "layer_types"
        out[key] = list(release[key][:cut])
    put("num_hidden_layers", cut)
    d_inner = cfg.mamba_num_heads * cfg.mamba_head_dim
    hidden = _width(cfg.hidden_size)
    if d_inner == cfg.expand * cfg.hidden_size:
        small_inner = cfg.expand * hidden
    else:
        small_inner = _width(d_inner)
        if small_inner == cfg.expand * hidden:  # keep the release's inequality
            small_inner += WIDTH_QUANTUM
    mamba_head_dim = max(4, cfg.mamba_head_dim // 8)
    head_dim = max(8, cfg.head_dim // 8)
    ratio = cfg.num_attention_heads // cfg.num_key_value_heads
    if cfg.head_dim * cfg.num_attention_heads == cfg.hidden_size:
        q_heads = hidden // head_dim
        kv_heads = max(1, q_heads // ratio)
    else:
        kv_heads = max(1, cfg.num_key_value_heads // 4)
        q_heads = kv_heads * ratio
    put("hidden_size", hidden)
    put("vocab_size", VOCAB_SIZE)
    put("mamba_head_dim", mamba_head_dim)
    put("mamba_num_heads", small_inner // mamba_head_dim)
    put("ssm_state_size", max(8, cfg.ssm_state_size // 8))
    put("chunk_size", max(16, cfg.chunk_size // 4), "mamba_chunk_size")
    # transformers 5 reads only `head_dim` (default 128, which the 8B release happens to equal): written
    # next to a legacy `attention_head_dim`, as in tiny-dense, so both readers see the shrunk size
    out["head_dim"] = head_dim
    put("head_dim", head_dim, "attention_head_dim")
    put("num_attention_heads", q_heads)
    put("num_key_value_heads", kv_heads)
    for key in ("intermediate_size", "moe_intermediate_size", "moe_shared_expert_intermediate_size",
                "moe_latent_size"):
        if release.get(key):
            out[key] = _width(release[key])
    put("torch_dtype", "float32")
    parse_config(out, f"{source} (shrunk)")  # what is written must load
    return out


def _from_release(name: str, file: str, seed: int) -> Preset:
    path = RELEASES_DIR / file
    release = json.loads(path.read_text(encoding="utf-8"))
    return Preset(name, f"made from the released {file} by shrink_release (its keys, pattern prefix, ratios)",
                  shrink_release(release, str(path)), seed)


@functools.lru_cache(maxsize=1)
def release_presets() -> dict[str, Preset]:
    """Tiny presets made from the released configs in RELEASES_DIR (read on first use)."""
    return {p.name: p for p in (
        _from_release("tiny-8b", "Nemotron-H-8B-Base-8K.json", 1005),
        _from_release("tiny-nano-30b", "NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.json", 1006),
    )}


def all_presets() -> dict[str, Preset]:
    """The hand-made tiny presets, then those made from released configs."""
    return {**PRESETS, **release_presets()}


# --------------------------------------------------------------------------------------------
# Quantized presets: an unquantized preset's weights quantized the ModelOpt way (nemoh.model.quant_writer),
# written in ModelOpt's unified HF layout. Not in all_presets() (what tests sweep for every unquantized model);
# nox -s conformance adds them, and a backend that cannot run them as they mean answers NOT_SUPPORTED.


@dataclass(frozen=True)
class QuantSpec:
    name: str
    description: str
    base: str  # the unquantized preset
    algo: str  # quant_algo: FP8 | NVFP4
    exclude: tuple[str, ...]  # exclude_modules, as ModelOpt writes them
    overrides: dict[str, Any] = field(default_factory=dict, hash=False)  # config keys changed in the original
    shards: int = 1


QUANT_SPECS: dict[str, QuantSpec] = {q.name: q for q in (
    QuantSpec("tiny-moe-fp8", "tiny-moe in FP8 (W8A8, per-tensor scales), lm_head excluded", "tiny-moe", "FP8",
              ("lm_head",)),
    QuantSpec("tiny-nano-30b-nvfp4", "tiny-nano-30b in NVFP4 (W4A4), excluded as NVIDIA's Nano NVFP4 release: "
              "lm_head, the attention layer and the Mamba layer before it", "tiny-nano-30b", "NVFP4",
              ("lm_head", "backbone.layers.4.mixer.in_proj", "backbone.layers.4.mixer.out_proj",
               "backbone.layers.5.mixer.*_proj"), shards=2),
    QuantSpec("tiny-wide-nvfp4", "tiny-dense widened to rows of 256-512 (16-32 NVFP4 blocks a row), NVFP4 but "
              "lm_head and the attention layer", "tiny-dense", "NVFP4", ("lm_head", "backbone.layers.3.mixer.*"),
              {"hidden_size": 256, "intermediate_size": 512}),
    QuantSpec("tiny-nvfp4-64", "tiny-moe with every quantized row a multiple of 64 wide (ggml's NVFP4 block: "
              "d_inner 128, attention 4 x 16, experts 64, shared expert 128), NVFP4, excluded as NVIDIA's Nano "
              "NVFP4 release: lm_head, the attention layer and the Mamba layer before it", "tiny-moe", "NVFP4",
              ("lm_head", "backbone.layers.2.mixer.in_proj", "backbone.layers.2.mixer.out_proj",
               "backbone.layers.3.mixer.*_proj"),
              {"mamba_num_heads": 8, "head_dim": 16, "intermediate_size": 64, "moe_intermediate_size": 64,
               "moe_shared_expert_intermediate_size": 128}),
)}
ORIGINAL_SUFFIX = ".original"  # the unquantized original of a quantized preset whose base config it overrides


def _original(q: QuantSpec) -> Preset:
    base = all_presets()[q.base]
    if not q.overrides:
        return base
    return Preset(q.name + ORIGINAL_SUFFIX, f"{q.base} with {q.overrides}: the original of {q.name}",
                  {**base.config, **q.overrides}, base.seed)


def original_of(name: str) -> str | None:
    """The preset a quantized preset was quantized from (its unquantized original), or None."""
    q = QUANT_SPECS.get(name)
    return None if q is None else _original(q).name


@functools.lru_cache(maxsize=1)
def quant_presets() -> dict[str, Preset]:
    """The quantized presets, each with the config.json its checkpoint carries (quantization_config too)."""
    out = {}
    for q in QUANT_SPECS.values():
        orig = _original(q)
        qcfg = {"quant_method": "modelopt", "quant_algo": q.algo, "kv_cache_quant_algo": None,
                "group_size": 16 if q.algo == "NVFP4" else None, "exclude_modules": list(q.exclude),
                "producer": {"name": "nemoh", "version": "quant-writer-1"}}
        out[q.name] = Preset(q.name, q.description, {**orig.config, "quantization_config": qcfg}, orig.seed)
    return out


def known_presets() -> dict[str, Preset]:
    """Every preset a name resolves to: all_presets(), the quantized ones and their widened originals."""
    extra = {o.name: o for o in (_original(q) for q in QUANT_SPECS.values()) if o.name.endswith(ORIGINAL_SUFFIX)}
    return {**all_presets(), **quant_presets(), **extra}


def get_preset(name: str) -> Preset:
    presets = known_presets()
    try:
        return presets[name]
    except KeyError:
        raise NemohError(did_you_mean("preset", name, presets)) from None


# --------------------------------------------------------------------------------------------
# Weights


def randomize_(model, seed: int) -> None:
    """Overwrite every parameter and buffer of a transformers NemotronH model in place."""
    import torch

    from nemoh.model.init import Draw, generator, init_tensor

    cfg = model.config
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            d = Draw(name, tuple(t.shape), cfg, generator(seed, name), torch.float64, torch.float64)
            t.copy_(init_tensor("pitfalls", d).to(t.dtype))


def build_model(name: str, *, seed: int | None = None):
    """A transformers `NemotronHForCausalLM` in fp32 with this preset's deterministic weights."""
    import torch
    from transformers import NemotronHConfig, NemotronHForCausalLM

    preset = get_preset(name)
    config = NemotronHConfig(**copy.deepcopy(preset.config))
    # transformers' own init draws from the global RNG; keep the caller's RNG untouched
    with torch.random.fork_rng(devices=[]):
        # (transformers wraps .to with functools.wraps(nn.Module.to); typeshed's _Wrapped binds no self)
        model = NemotronHForCausalLM(config).to(torch.float32)  # type: ignore[arg-type]  # wraps'd .to: self unbound
    randomize_(model, preset.seed if seed is None else seed)
    return model.eval()


def write_checkpoint(
    name: str, out_dir, *, seed: int | None = None, max_shard_size: str | None = None
) -> Path:
    """Write preset `name` as a hub-layout checkpoint directory and return its path.

    `max_shard_size` (e.g. "200KB") makes save_pretrained shard the weights, with
    `model.safetensors.index.json`. The same (name, seed) always gives the same bytes.
    """
    if name in QUANT_SPECS:
        return _write_quantized(name, out_dir)
    preset = get_preset(name)
    model = build_model(name, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # save_pretrained leaves weight files of an earlier write in place (a stale model.safetensors
    # next to new shards, or a stale index): remove them so the directory has one weight set
    for stale in (*out.glob("model*.safetensors"), out / "model.safetensors.index.json"):
        stale.unlink(missing_ok=True)
    with _quiet_progress():
        # transformers 5 always writes safetensors (the old `safe_serialization` flag is gone);
        # it renames `model.` to `backbone.` and unstacks the experts: the hub layout.
        kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(out, **kwargs)
    # The preset's own config, not transformers' normalised one: loaders must face the release
    # spellings (pattern string, legacy list names and keys, stale num_hidden_layers).
    _write_json(out / "config.json", preset.config)
    write_tokenizer(out)
    return out


def _write_quantized(name: str, out_dir) -> Path:
    from nemoh.model.quant import parse_quant_config
    from nemoh.model.quant_writer import write_quantized

    q = QUANT_SPECS[name]
    qc = parse_quant_config(quant_presets()[name].config["quantization_config"], f"preset {name}")
    return write_quantized(cached_checkpoint(_original(q).name), out_dir, qc, shards=q.shards)


@contextlib.contextmanager
def _quiet_progress():
    """No transformers progress bars for these tiny writes and loads; restore the caller's setting."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Tokenizer


def corpus_text() -> str:
    """The shipped English corpus: the tokenizer's training text, and handy eval prompt text."""
    return resources.files("nemoh.model").joinpath(CORPUS_FILE).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=1)
def tokenizer_json() -> str:
    """A byte-level BPE (GPT-2 style) trained on the corpus; `<s>` is prepended to every sequence.

    Deterministic: the `tokenizers` BPE trainer breaks count ties by pair order, and the corpus is
    fixed, so the same JSON comes out every time.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is unknown
        show_progress=False,
    )
    tok.train_from_iterator(corpus_text().splitlines(keepends=True), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", SPECIAL_TOKENS.index("<s>"))]
    )
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert tok.get_vocab_size() <= VOCAB_SIZE
    return tok.to_str(pretty=True)


def write_tokenizer(out_dir) -> None:
    """tokenizer.json plus the transformers side files, so that both `tokenizers.Tokenizer.from_file`
    and `transformers.AutoTokenizer.from_pretrained` load it offline."""
    out = Path(out_dir)
    (out / "tokenizer.json").write_text(tokenizer_json(), encoding="utf-8")
    special = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    _write_json(out / "special_tokens_map.json", special)
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": _COMMON["max_position_embeddings"],
        },
    )


# --------------------------------------------------------------------------------------------
# Cache


def cache_root() -> Path:
    return Path(os.environ.get("NEMOH_CACHE") or "~/.cache/nemoh").expanduser()


def fingerprint(name: str, seed: int | None = None) -> str:
    """Short hash of what determines a preset's bytes: its config, seed, the corpus, the generator."""
    preset = get_preset(name)
    key = {
        "config": preset.config,
        "seed": preset.seed if seed is None else seed,
        "generator": GENERATOR_VERSION,
        "corpus": hashlib.sha256(corpus_text().encode()).hexdigest(),
    }
    if name in QUANT_SPECS:  # the writer's version and sharding; unquantized fingerprints stay as they were
        key["quant_writer"] = [QUANT_WRITER_VERSION, QUANT_SPECS[name].shards]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def cached_checkpoint(name: str) -> Path:
    """The cached checkpoint of preset `name`, generated on first use.

    Generated into a temp dir next to the final one and renamed into place: rename is atomic, so a
    reader sees either nothing or a complete checkpoint, and of two racing writers one wins and the
    other discards its copy.
    """
    root = cache_root() / "checkpoints"
    final = root / f"{name}-{fingerprint(name)}"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        write_checkpoint(name, tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_model(name_or_path: str) -> Path:
    """A checkpoint directory, a path to its config.json, or a preset name -> a checkpoint directory."""
    path = Path(name_or_path).expanduser()
    if name_or_path and path.is_dir():  # Path("") is ".": an empty name is not the cwd
        return path
    if path.is_file() and path.name == "config.json":
        return path.parent
    if name_or_path in known_presets():
        return cached_checkpoint(name_or_path)
    raise NemohError(
        did_you_mean("model or preset", name_or_path, {**all_presets(), **quant_presets()})
        + f" ('{name_or_path}' is neither a checkpoint directory nor a preset name.)"
    )


# --------------------------------------------------------------------------------------------
# transformers' in-memory layout


def write_in_memory_layout(checkpoint_dir, out_dir) -> Path:
    """Re-write a checkpoint in transformers' in-memory state_dict layout: `model.*` names and
    experts stacked into 3-D `mixer.experts.up_proj` [E, I, L] / `down_proj` [E, L, I], one
    model.safetensors, with the same config.json and tokenizer files."""
    import torch
    from safetensors.torch import save_file
    from transformers import NemotronHForCausalLM

    src, out = Path(checkpoint_dir), Path(out_dir)
    with _quiet_progress():
        model = NemotronHForCausalLM.from_pretrained(src, dtype=torch.float32)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    for fname in ("config.json", "generation_config.json", *TOKENIZER_FILES):
        if (src / fname).is_file():
            shutil.copyfile(src / fname, out / fname)
    return out

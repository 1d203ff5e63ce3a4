"""Config parsing: every spelling, transformers' defaults, exact sizes, errors that name the field."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nemoh.errors import ConfigError
from nemoh.model.config import ModelConfig, load_config, parse_config
from nemoh.model.ir import build_graph
from nemoh.model.presets import RELEASES_DIR, release_presets, shrink_release

SHARED = RELEASES_DIR
RELEASED = sorted(SHARED.glob("*.json"))
assert len(RELEASED) == 2, SHARED


def hf_meta_model(raw: dict):
    from transformers import NemotronHConfig, NemotronHForCausalLM

    hc = NemotronHConfig(**raw)
    with torch.device("meta"):
        return hc, NemotronHForCausalLM(hc)


def mine_names(g) -> set[str]:
    return {t.name for t in g.params}


def hf_kinds(hc) -> list[str]:
    names = {"linear_attention": "mamba", "full_attention": "attention", "mlp": "mlp", "moe": "moe"}
    return [names[t] for t in hc.layers_block_type]


CONFIGS = [(p.stem, json.loads(p.read_text())) for p in RELEASED] + \
    [(n, p.config) for n, p in release_presets().items()]  # the releases, and the presets made from them


@pytest.mark.parametrize("name,raw", CONFIGS, ids=[n for n, _ in CONFIGS])
def test_released_configs_match_transformers(name, raw):
    cfg = parse_config(raw, name)
    hc, model = hf_meta_model(raw)
    assert list(cfg.layer_types) == hf_kinds(hc)
    g = build_graph(cfg)
    sd = model.state_dict()
    # params_total is transformers' num_parameters(); the router's correction-bias buffers are counted
    # apart, and the checkpoint holds both
    assert g.params_total == model.num_parameters() == sum(p.numel() for p in model.parameters())
    assert g.buffers_total == sum(t.numel() for n, t in sd.items() if "e_score_correction_bias" in n)
    assert g.checkpoint_tensors_total == g.params_total + g.buffers_total == sum(t.numel() for t in sd.values())
    assert {t.name for t in g.params if t.buffer} == {n.removeprefix("model.") for n, _ in model.named_buffers()
                                                      if n.removeprefix("model.") in mine_names(g)}
    # and tensor by tensor: the same names and shapes
    mine = {t.name: t.shape for t in g.params}
    theirs = {n.removeprefix("model."): tuple(t.shape) for n, t in sd.items()}
    assert mine == theirs


def test_nano30b_derived_sizes():
    cfg = load_config(SHARED / "NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.json")
    assert cfg.d_inner == 64 * 64 != cfg.expand * cfg.hidden_size  # 4096 vs 5376
    assert cfg.head_dim == 128 != cfg.hidden_size // cfg.num_attention_heads  # 128 vs 84
    assert cfg.conv_dim == 4096 + 2 * 8 * 128
    assert cfg.num_layers == 52 and cfg.pattern.count("*") == 6


def test_8b_legacy_spellings():
    cfg = load_config(SHARED / "Nemotron-H-8B-Base-8K.json")
    assert cfg.head_dim == 128 and cfg.layer_norm_epsilon == 1e-5  # attention_head_dim, rms_norm_eps
    assert cfg.pattern.count("-") == 24 and "E" not in cfg.pattern


BASE = dict(model_type="nemotron_h", vocab_size=64, hidden_size=16, mamba_num_heads=4, mamba_head_dim=4,
            ssm_state_size=4, n_groups=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
            intermediate_size=24, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
            moe_shared_expert_intermediate_size=8)


@pytest.mark.parametrize("spelling", [
    {"hybrid_override_pattern": "M*-E"},
    {"layers_block_type": ["mamba", "attention", "mlp", "moe"]},
    {"layers_block_type": ["linear_attention", "full_attention", "mlp", "moe"]},
    {"layer_types": ["linear_attention", "full_attention", "mlp", "moe"]},
    {"layers_block_type": ["mamba", "attention", "mlp", "moe"], "hybrid_override_pattern": "MMMM"},
    {"hybrid_override_pattern": "M*-E", "num_hidden_layers": 52},
])
def test_layer_spellings(spelling):
    cfg = parse_config({**BASE, **spelling})
    assert cfg.layer_types == ("mamba", "attention", "mlp", "moe") and cfg.num_layers == 4


@pytest.mark.parametrize("legacy,canonical,value", [
    ("mamba_n_groups", "n_groups", 4), ("mamba_d_conv", "conv_kernel", 3), ("mamba_expand", "expand", 3),
    ("mamba_chunk_size", "chunk_size", 64), ("mamba_conv_bias", "use_conv_bias", False),
    ("mamba_dt_min", "time_step_min", 0.002), ("mamba_dt_max", "time_step_max", 0.2),
    ("mamba_dt_init_floor", "time_step_floor", 1e-3), ("attention_head_dim", "head_dim", 12),
    ("rms_norm_eps", "layer_norm_epsilon", 1e-6), ("norm_eps", "layer_norm_epsilon", 1e-6),
])
def test_legacy_keys(legacy, canonical, value):
    base = {k: v for k, v in BASE.items() if k != canonical}
    cfg = parse_config({**base, "hybrid_override_pattern": "M*", legacy: value})
    assert getattr(cfg, canonical) == value
    # with both spellings present, the winner is transformers' winner: it pops mamba_* over the
    # canonical field and does not know attention_head_dim / rms_norm_eps / norm_eps at all
    default = getattr(ModelConfig(("mamba",)), canonical)
    both = parse_config({**base, "hybrid_override_pattern": "M*", legacy: value, canonical: default})
    assert getattr(both, canonical) == (value if legacy.startswith("mamba_") else default)
    if legacy.startswith("mamba_") or legacy == "attention_head_dim":
        from transformers import NemotronHConfig

        hc = NemotronHConfig(**{**base, "hybrid_override_pattern": "M*", legacy: value, canonical: default})
        assert getattr(hc, canonical) == getattr(both, canonical)


def test_defaults_are_transformers_defaults():
    from transformers import NemotronHConfig

    hc = NemotronHConfig()
    cfg = parse_config({"model_type": "nemotron_h"})
    assert list(cfg.layer_types) == hf_kinds(hc)
    for f in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
              "intermediate_size", "mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups",
              "conv_kernel", "expand", "chunk_size", "use_conv_bias", "use_bias", "time_step_min",
              "time_step_max", "time_step_floor", "n_routed_experts", "num_experts_per_tok",
              "moe_intermediate_size", "moe_shared_expert_intermediate_size", "moe_latent_size", "n_group",
              "topk_group", "norm_topk_prob", "routed_scaling_factor", "layer_norm_epsilon", "mlp_bias",
              "mamba_ssm_cache_dtype"):
        assert getattr(cfg, f) == getattr(hc, f), f
    assert tuple(cfg.time_step_limit) == tuple(hc.time_step_limit)


def test_time_step_limit_spellings():
    for lim in ([0.0, "inf"], [0.0, {"__float__": "Infinity"}], [0.0, float("inf")]):
        assert parse_config({**BASE, "time_step_limit": lim}).time_step_limit == (0.0, math.inf)
    assert parse_config({**BASE, "mamba_dt_limit": [0.001, 0.5]}).time_step_limit == (0.001, 0.5)


def test_to_dict_round_trip():
    cfg = load_config(SHARED / "NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.json")
    assert parse_config(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("patch,field", [
    ({"hybrid_override_pattern": "M*X"}, "hybrid_override_pattern"),
    ({"layers_block_type": ["mamba", "transformer"]}, "layers_block_type"),
    ({"layers_block_type": "M*"}, "layers_block_type"),
    ({"mamba_num_heads": 6, "n_groups": 4}, "mamba_num_heads"),
    ({"num_attention_heads": 3, "num_key_value_heads": 2}, "num_attention_heads"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"hidden_size": -8}, "hidden_size"),
    ({"hidden_size": "64"}, "hidden_size"),
    ({"ssm_state_size": 2.5}, "ssm_state_size"),
    ({"use_conv_bias": "yes"}, "use_conv_bias"),
    ({"mlp_hidden_act": "gelu"}, "mlp_hidden_act"),
    ({"layer_norm_epsilon": -1}, "layer_norm_epsilon"),
    ({"n_routed_experts": 6, "n_group": 4, "hybrid_override_pattern": "E"}, "n_routed_experts"),
    ({"topk_group": 3, "n_group": 2, "hybrid_override_pattern": "E"}, "topk_group"),
    ({"num_experts_per_tok": 4, "n_group": 2, "topk_group": 1, "hybrid_override_pattern": "E"},
     "num_experts_per_tok"),
    ({"time_step_limit": [0.5, 0.1]}, "time_step_limit"),
    ({"time_step_limit": "wide"}, "time_step_limit"),
    ({"model_type": "llama"}, "model_type"),
    ({"torch_dtype": "float8"}, "torch_dtype"),
    ({"hybrid_override_pattern": ""}, "hybrid_override_pattern"),
])
def test_invalid_values_name_the_field_and_file(patch, field):
    with pytest.raises(ConfigError) as e:
        parse_config({**BASE, "hybrid_override_pattern": "M*-", **patch}, "/x/config.json")
    msg = str(e.value)
    assert "/x/config.json" in msg and field in msg and "\n" not in msg


def test_malformed_json_names_file_and_position(tmp_path):
    p = tmp_path / "config.json"
    p.write_text('{"hidden_size": 64,, }')
    with pytest.raises(ConfigError, match=r"config\.json: malformed JSON at line 1 column"):
        load_config(tmp_path)
    p.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        load_config(p)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing")


def test_cli_bad_config_is_one_line_exit_2(tmp_path, capsys):
    from nemoh.cli import main

    (tmp_path / "config.json").write_text(json.dumps({**BASE, "hybrid_override_pattern": "M*Q"}))
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hybrid_override_pattern" in err and "Traceback" not in err
    (tmp_path / "config.json").write_text("{not json")
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nemoh: error:") and "config.json" in err and err.count("\n") == 1


# -- property: any valid small config sizes exactly like transformers --------------------------

@st.composite
def small_configs(draw):
    G = draw(st.sampled_from([1, 2, 4]))
    H = G * draw(st.integers(1, 3))
    KV = draw(st.integers(1, 3))
    n_group = draw(st.sampled_from([1, 2]))
    E = n_group * draw(st.integers(2, 4))
    topk_group = draw(st.integers(1, n_group))
    pattern = draw(st.text(alphabet="M*-E", min_size=1, max_size=6))
    raw = {
        "model_type": "nemotron_h", "vocab_size": draw(st.integers(8, 64)), "hidden_size": draw(st.integers(4, 24)),
        "mamba_num_heads": H, "mamba_head_dim": draw(st.integers(1, 6)), "n_groups": G,
        "ssm_state_size": draw(st.integers(1, 8)), "conv_kernel": draw(st.integers(2, 5)),
        "num_attention_heads": KV * draw(st.integers(1, 3)), "num_key_value_heads": KV,
        "head_dim": draw(st.integers(2, 10)), "intermediate_size": draw(st.integers(2, 20)),
        "n_routed_experts": E, "n_group": n_group, "topk_group": topk_group,
        "num_experts_per_tok": draw(st.integers(1, topk_group * (E // n_group))),
        "moe_intermediate_size": draw(st.integers(2, 12)),
        "moe_shared_expert_intermediate_size": draw(st.integers(1, 12)),
        "moe_latent_size": draw(st.one_of(st.none(), st.integers(2, 10))),
        "use_conv_bias": draw(st.booleans()), "use_bias": draw(st.booleans()), "mlp_bias": draw(st.booleans()),
    }
    if draw(st.booleans()):
        raw["hybrid_override_pattern"] = pattern
    else:
        names = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
        raw["layers_block_type"] = [names[c] for c in pattern]
    return raw


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_configs())
def test_any_config_sizes_like_transformers(raw):
    cfg = parse_config(raw)
    g = build_graph(cfg, "float32")
    hc, model = hf_meta_model(raw)
    assert list(cfg.layer_types) == hf_kinds(hc)
    theirs = {n.removeprefix("model."): tuple(t.shape) for n, t in model.state_dict().items()}
    assert {t.name: t.shape for t in g.params} == theirs
    assert g.checkpoint_tensors_total == sum(math.prod(s) for s in theirs.values())
    assert g.params_total == model.num_parameters()


@pytest.mark.parametrize("path", RELEASED, ids=lambda p: p.stem)
def test_presets_made_from_releases_keep_what_mappings_depend_on(path):
    raw = json.loads(path.read_text())
    big = parse_config(raw, path.name)
    shrunk = shrink_release(raw, path.name)
    small = parse_config(shrunk, "shrunk")
    assert set(raw) <= set(shrunk)  # every key, under the release's own spelling
    assert {k for k in shrunk if k not in raw} <= {"head_dim"}
    # the pattern is a prefix of the release's holding every block kind, and the layer count follows it
    assert big.pattern.startswith(small.pattern) and set(small.pattern) == set(big.pattern)
    assert small.num_layers == len(small.pattern) < big.num_layers
    # equalities and inequalities an engine's mapping can get wrong stay as the release has them
    assert (small.d_inner == small.expand * small.hidden_size) == (big.d_inner == big.expand * big.hidden_size)
    assert (small.head_dim * small.num_attention_heads == small.hidden_size) == \
        (big.head_dim * big.num_attention_heads == big.hidden_size)
    assert small.num_attention_heads // small.num_key_value_heads == \
        big.num_attention_heads // big.num_key_value_heads
    assert small.mamba_num_heads % small.n_groups == 0 and small.mamba_num_heads > small.n_groups
    for key in ("n_groups", "conv_kernel", "expand", "n_routed_experts", "num_experts_per_tok", "n_group",
                "topk_group", "n_shared_experts", "routed_scaling_factor", "norm_topk_prob", "time_step_limit",
                "layer_norm_epsilon", "tie_word_embeddings"):
        assert getattr(small, key) == getattr(big, key), key
    assert small.chunk_size < 64  # a 64-token prompt spans two scan chunks
    assert small.hidden_size % 32 == 0  # every matrix quantizes in 32-wide blocks (llama.cpp Q8_0, Q4_0)
    assert build_graph(small).params_total < 10_000_000


@pytest.mark.parametrize("limit", [(0.0, math.inf), (0.0, 0.5)])
def test_checkpoint_saved_by_installed_transformers_is_read(tmp_path, limit, capsys):
    """transformers >= 5.3 writes non-finite floats in config.json as {"__float__": "Infinity"}; a checkpoint
    saved by the installed transformers with time_step_limit=(0, inf) loads, inspects and verifies."""
    transformers = pytest.importorskip("transformers")
    from nemoh.cli import main
    from nemoh.model.presets import resolve_model

    raw = json.loads((resolve_model("tiny-list") / "config.json").read_text())
    hc = transformers.NemotronHConfig(**{**raw, "time_step_limit": limit})
    model = transformers.NemotronHForCausalLM(hc)
    model.save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text()
    assert ('"__float__": "Infinity"' in text) == math.isinf(limit[1])  # what the installed version writes
    assert load_config(tmp_path).time_step_limit == limit
    assert tuple(transformers.AutoConfig.from_pretrained(tmp_path).time_step_limit) == limit
    assert main(["inspect", str(tmp_path)]) == 0
    assert main(["verify", str(tmp_path)]) == 0, capsys.readouterr()


@pytest.mark.parametrize("tagged,field", [
    ({"time_step_limit": [0.0, {"__float__": "Inf"}]}, "time_step_limit[1]"),
    ({"time_step_limit": [0.0, {"__float__": "Infinity", "x": 1}]}, "time_step_limit[1]"),
    ({"time_step_limit": [0.0, {"__float__": 1e9}]}, "time_step_limit[1]"),
    ({"time_step_limit": [{"__float__": "NaN"}, 1.0]}, "time_step_limit"),
    ({"time_step_limit": [0.0, {"__float__": "-Infinity"}]}, "time_step_limit"),
    ({"layer_norm_epsilon": {"__float__": "NaN"}}, "layer_norm_epsilon"),
])
def test_tagged_floats_other_than_transformers_spellings_are_refused_by_name(tmp_path, tagged, field):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "hybrid_override_pattern": "M*-", **tagged}))
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path)
    msg = str(e.value)
    assert f"field '{field}'" in msg and "config.json" in msg and "\n" not in msg


def test_every_spelling_transformers_reads(tmp_path):
    for text in ('[0.0, Infinity]', '[0.0, {"__float__": "Infinity"}]'):
        (tmp_path / "config.json").write_text(
            json.dumps({**BASE, "hybrid_override_pattern": "M*-"})[:-1] + f', "time_step_limit": {text}}}')
        assert load_config(tmp_path).time_step_limit == (0.0, math.inf), text

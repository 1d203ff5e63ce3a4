"""Tiny preset checkpoints: layout, determinism, transformers round trip, and the weight statistics
that make known implementation bugs observable."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from nemoh.errors import NemohError  # noqa: E402
from nemoh.model import presets as P  # noqa: E402

MOE_PRESETS = [n for n, p in P.PRESETS.items() if "n_routed_experts" in p.config]
PROMPT_LEN = 64


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("presets")
    return {name: P.write_checkpoint(name, root / name) for name in P.PRESETS}


@pytest.fixture(scope="module")
def models(checkpoints):
    from transformers import NemotronHForCausalLM

    return {
        name: NemotronHForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for name, path in checkpoints.items()
    }


@pytest.fixture(scope="module")
def prompt(checkpoints) -> torch.Tensor:
    """The first 64 tokens of the corpus (with <s>): real text, as the statistics are meant for."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(checkpoints["tiny-dense"] / "tokenizer.json"))
    ids = tok.encode(P.corpus_text()).ids[:PROMPT_LEN]
    assert len(ids) == PROMPT_LEN
    return torch.tensor([ids])


def file_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def to_memory_layout(hub: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hub names -> transformers' in-memory names, stacking `experts.{e}.{up,down}_proj.weight`."""
    out, experts = {}, {}
    for name, t in hub.items():
        name = re.sub(r"^backbone\.", "model.", name)
        m = re.fullmatch(r"(.*\.experts)\.(\d+)\.(up_proj|down_proj)\.weight", name)
        if m:
            experts.setdefault(f"{m[1]}.{m[3]}", {})[int(m[2])] = t
        else:
            out[name] = t
    for name, per_expert in experts.items():
        out[name] = torch.stack([per_expert[e] for e in range(len(per_expert))])
    return out


def capture_inputs(model, prompt, module_of):
    """Run the model once; return [(module, its input hidden states)] for every layer where
    `module_of(block)` gives a module."""
    seen, hooks = [], []
    for block in model.model.layers:
        mod = module_of(block)
        if mod is not None:
            hooks.append(mod.register_forward_pre_hook(lambda m, args: seen.append((m, args[0].detach()))))
    try:
        with torch.no_grad():
            model(prompt)
    finally:
        for h in hooks:
            h.remove()
    return seen


def sha256_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ---------------------------------------------------------------------------------- presets


def test_import_has_no_side_effects(tmp_path):
    code = (
        "import sys, nemoh.model.presets as p; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'; "
        "assert len(p.PRESETS) == 4"
    )
    env = {**os.environ, "NEMOH_CACHE": str(tmp_path / "cache")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("name", list(P.PRESETS))
def test_preset_shapes_are_the_tricky_ones(name, models):
    cfg = models[name].config  # as transformers parsed the on-disk release-style file
    raw = P.PRESETS[name].config
    assert cfg.n_groups > 1
    assert cfg.mamba_num_heads * cfg.mamba_head_dim != cfg.expand * cfg.hidden_size
    assert cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads
    assert cfg.vocab_size == 512 and (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (0, 1, 2)
    for key, value in {
        "model_type": "nemotron_h",
        "architectures": ["NemotronHForCausalLM"],
        "time_step_min": 0.001,
        "time_step_max": 0.1,
        "time_step_floor": 1e-4,
        "layer_norm_epsilon": 1e-5,
        "use_conv_bias": True,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "mamba_ssm_cache_dtype": "float32",
    }.items():
        assert raw[key] == value, key
    layers = raw.get("layers_block_type") or raw["hybrid_override_pattern"]
    assert cfg.num_hidden_layers == len(layers) == len(models[name].model.layers)


def test_config_on_disk_is_release_style(checkpoints, models):
    for name, path in checkpoints.items():
        assert json.loads((path / "config.json").read_text()) == P.PRESETS[name].config
    dense = json.loads((checkpoints["tiny-dense"] / "config.json").read_text())
    assert dense["hybrid_override_pattern"] == "M-M*-M-" and "layers_block_type" not in dense
    assert dense["attention_head_dim"] == dense["head_dim"] == 24 and dense["rms_norm_eps"] == 1e-5
    listed = json.loads((checkpoints["tiny-list"] / "config.json").read_text())
    assert "hybrid_override_pattern" not in listed and "chunk_size" not in listed and "n_groups" not in listed
    assert listed["num_hidden_layers"] == 52
    # transformers honours the legacy spellings and lets the list beat num_hidden_layers
    cfg = models["tiny-list"].config
    assert (cfg.chunk_size, cfg.n_groups, cfg.num_hidden_layers) == (32, 2, 6)
    M, A = "linear_attention", "full_attention"
    assert cfg.layers_block_type == [M, "mlp", A, M, "mlp", M]
    assert models["tiny-latent-moe"].config.moe_latent_size == 32


@pytest.mark.parametrize("name", list(P.release_presets()))
def test_presets_made_from_releases_round_trip(name, tmp_path):
    """Written in the hub layout, read back by transformers with nothing missing or left over, and by
    nemoh's loader against its own graph."""
    from transformers import NemotronHForCausalLM

    from nemoh.model.config import load_config
    from nemoh.model.ir import build_graph
    from nemoh.model.weights import Checkpoint

    path = P.write_checkpoint(name, tmp_path / name)
    assert json.loads((path / "config.json").read_text()) == P.get_preset(name).config
    _, info = NemotronHForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    graph = build_graph(load_config(path), "float32")
    params = Checkpoint(path).load(graph)
    assert {t.name for t in graph.params} == set(params)


def test_unknown_preset():
    with pytest.raises(NemohError, match="Did you mean: tiny-moe"):
        P.get_preset("tiny-mo")


# ---------------------------------------------------------------------------------- files


def test_hub_layout_tensor_names(checkpoints):
    for name, path in checkpoints.items():
        names = set(file_tensors(path))
        assert all(n.startswith("backbone.") or n == "lm_head.weight" for n in names), name
        assert {"backbone.embeddings.weight", "backbone.norm_f.weight", "lm_head.weight"} <= names
        pattern = P.PRESETS[name].config.get("hybrid_override_pattern")
        for i, kind in enumerate(pattern or ""):
            if kind == "E":
                E = P.PRESETS[name].config["n_routed_experts"]
                for e in range(E):
                    assert f"backbone.layers.{i}.mixer.experts.{e}.up_proj.weight" in names
                    assert f"backbone.layers.{i}.mixer.experts.{e}.down_proj.weight" in names
                assert f"backbone.layers.{i}.mixer.gate.e_score_correction_bias" in names
        assert not any(re.search(r"experts\.(up|down)_proj$", n) for n in names)


def test_byte_for_byte_deterministic(checkpoints, tmp_path):
    for name in ("tiny-moe", "tiny-list"):
        P.tokenizer_json.cache_clear()  # retrain the tokenizer too
        again = P.write_checkpoint(name, tmp_path / name)
        assert sha256_tree(again) == sha256_tree(checkpoints[name]), name
    other = file_tensors(P.write_checkpoint("tiny-list", tmp_path / "seed7", seed=7))
    base = file_tensors(checkpoints["tiny-list"])
    assert not torch.equal(other["lm_head.weight"], base["lm_head.weight"])


def test_transformers_loads_tensors_bit_equal(checkpoints, models):
    for name, path in checkpoints.items():
        want = to_memory_layout(file_tensors(path))
        got = models[name].state_dict()
        assert set(got) == set(want), name
        bad = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
        assert not bad, f"{name}: {bad}"


def test_sharded_checkpoint_has_index(checkpoints, tmp_path):
    from transformers import NemotronHForCausalLM

    path = P.write_checkpoint("tiny-moe", tmp_path / "sharded", max_shard_size="100KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not (path / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    tensors = file_tensors(path)
    assert set(index["weight_map"]) == set(tensors)
    unsharded = file_tensors(checkpoints["tiny-moe"])
    assert all(torch.equal(tensors[k], unsharded[k]) for k in unsharded)
    loaded = NemotronHForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    want = to_memory_layout(tensors)
    assert all(torch.equal(loaded[k], want[k]) for k in want)
    # re-writing unsharded into the same directory leaves one weight set, not stale shards
    P.write_checkpoint("tiny-moe", path)
    assert sorted(p.name for p in path.glob("model*")) == ["model.safetensors"]


def test_in_memory_layout(checkpoints, models, tmp_path):
    from transformers import NemotronHForCausalLM

    src = checkpoints["tiny-latent-moe"]
    out = P.write_in_memory_layout(src, tmp_path / "mem")
    tensors = load_file(out / "model.safetensors")
    assert all(n.startswith("model.") or n == "lm_head.weight" for n in tensors)
    cfg = P.PRESETS["tiny-latent-moe"].config
    E, I, L = cfg["n_routed_experts"], cfg["moe_intermediate_size"], cfg["moe_latent_size"]
    assert tensors["model.layers.1.mixer.experts.up_proj"].shape == (E, I, L)
    assert tensors["model.layers.1.mixer.experts.down_proj"].shape == (E, L, I)
    for f in ("config.json", *P.TOKENIZER_FILES):
        assert (out / f).read_bytes() == (src / f).read_bytes()
    # transformers accepts its own layout too, with the same values
    reloaded = NemotronHForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    original = models["tiny-latent-moe"].state_dict()
    assert set(reloaded) == set(tensors) == set(original)
    assert all(torch.equal(reloaded[k], original[k]) for k in original)


# ---------------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("name", list(P.PRESETS))
def test_logits_are_healthy(name, models, prompt):
    with torch.no_grad():
        logits = models[name](prompt).logits[0]
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.5
    assert logits.argmax(-1).unique().numel() > 1


@pytest.mark.parametrize("name", list(P.PRESETS))
def test_dt_straddles_time_step_min(name, models, prompt):
    """softplus(dt_raw + dt_bias) on real inputs: a clamp at time_step_min must bite, but not always."""
    model = models[name]
    seen = capture_inputs(model, prompt, lambda b: b.mixer if b.block_type == "linear_attention" else None)
    assert seen
    dts = []
    with torch.no_grad():
        for mixer, h in seen:
            dt_raw = mixer.in_proj(h)[..., -mixer.num_heads :]
            dts.append(F.softplus(dt_raw + mixer.dt_bias).flatten())
    below = (torch.cat(dts) < model.config.time_step_min).float().mean().item()
    assert 0.1 < below < 0.9, below


def topk_experts(gate, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """NemotronHTopkRouter's expert choice, with a given correction bias: sorted [T, k] indices."""
    scores = F.linear(h.reshape(-1, h.shape[-1]).float(), gate.weight.float()).sigmoid()
    choice = scores + bias
    E, G = gate.num_experts, gate.num_group
    group_scores = choice.view(-1, G, E // G).topk(2, dim=-1).values.sum(-1)
    keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(gate.topk_group, dim=-1).indices, 1)
    choice = choice.masked_fill(~keep.bool().repeat_interleave(E // G, dim=1), float("-inf"))
    return choice.topk(gate.top_k, dim=-1).indices.sort(-1).values


@pytest.mark.parametrize("name", MOE_PRESETS)
def test_router_bias_needs_fp32(name, models, prompt):
    seen = capture_inputs(models[name], prompt, lambda b: b.mixer.gate if b.block_type == "moe" else None)
    assert seen
    flips = 0
    for gate, h in seen:
        bias = gate.e_score_correction_bias
        assert bias.dtype == torch.float32
        assert 3.5 < bias.mean() < 4.5 and 0 < bias.std() < 0.02
        # our re-implementation matches transformers' router
        assert torch.equal(topk_experts(gate, h, bias), gate(h)[2].sort(-1).values)
        rounded = bias.to(torch.bfloat16).float()
        flips += (topk_experts(gate, h, bias) != topk_experts(gate, h, rounded)).any(-1).sum().item()
    assert flips >= 1


@pytest.mark.parametrize("name", list(P.PRESETS))
def test_mamba_parameter_statistics(name, models):
    cfg = models[name].config
    H, G = cfg.mamba_num_heads, cfg.n_groups
    d_inner = H * cfg.mamba_head_dim
    mixers = [b.mixer for b in models[name].model.layers if b.block_type == "linear_attention"]
    for m in mixers:
        A = m.A_log.exp()
        assert ((A >= 1) & (A <= 16)).all() and A.unique().numel() == H
        assert A.max() - A.min() > 5  # spread over the range, not bunched
        assert ((m.D >= 0.5) & (m.D <= 1.5)).all()
        dt0 = F.softplus(m.dt_bias)
        assert ((dt0 > 0.99e-4) & (dt0 < 5.01e-2)).all()
        assert (dt0 < 1e-3).any() and (dt0 > 1e-3).any()
        w = m.conv1d.weight
        assert 0.4 < w.std() < 0.6 and m.conv1d.bias.abs().max() < 0.5
        # gated norm: each of the G contiguous groups has its own scale
        group_means = m.norm.weight.view(G, d_inner // G).mean(-1)
        assert (group_means.diff() > 0.5).all(), group_means


@pytest.mark.parametrize("name", list(P.PRESETS))
def test_linear_statistics(name, models):
    model = models[name]
    D = model.config.hidden_size
    emb = model.model.embeddings.weight
    assert 0.9 < emb.std() < 1.1
    assert 0.8 * 3 / D**0.5 < model.lm_head.weight.std() < 1.2 * 3 / D**0.5
    for block in model.model.layers:
        assert 0.05 < block.norm.weight.std() < 0.2 and abs(block.norm.weight.mean() - 1) < 0.1
        if block.block_type == "full_attention":
            q, o = block.mixer.q_proj.weight, block.mixer.o_proj.weight
            assert 0.8 < q.std() * D**0.5 < 1.2
            assert 0.4 < o.std() * o.shape[1] ** 0.5 < 0.6  # output projections x0.5
        if block.block_type == "moe":
            up = block.mixer.experts.up_proj
            assert 0.8 < up.std() * up.shape[-1] ** 0.5 < 1.2
            assert 0.8 < block.mixer.gate.weight.std() * D**0.5 < 1.2


# ---------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip(checkpoints, monkeypatch):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = checkpoints["tiny-moe"]
    fast = Tokenizer.from_file(str(path / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(path)
    assert fast.get_vocab_size() <= 512 and len(hf) <= 512
    assert [fast.token_to_id(t) for t in ("<pad>", "<s>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (0, 1, 2, 3)
    texts = [
        P.corpus_text()[:2000],
        "Question: Tom has 3 apples and buys 4 more. How many? Answer: 7.",
        "  odd   spacing\tand tabs\nnew lines, unicode: café — ☕ 3.14",
    ]
    for text in texts:
        ids = fast.encode(text).ids
        assert ids[0] == 1 and 1 not in ids[1:]  # <s> prepended once
        assert hf(text).input_ids == ids
        assert fast.decode(ids) == text
        assert hf.decode(ids, skip_special_tokens=True) == text
    # the corpus is compressed: the BPE really learned merges
    assert len(fast.encode(texts[0]).ids) < len(texts[0].encode()) / 2


# ---------------------------------------------------------------------------------- resolve_model


def test_resolve_model_caches_presets(tmp_path, monkeypatch):
    monkeypatch.setenv("NEMOH_CACHE", str(tmp_path / "cache"))
    calls = []
    real_write = P.write_checkpoint
    monkeypatch.setattr(P, "write_checkpoint", lambda *a, **k: calls.append(a) or real_write(*a, **k))

    path = P.resolve_model("tiny-list")
    assert path.parent == tmp_path / "cache" / "checkpoints"
    assert path.name == f"tiny-list-{P.fingerprint('tiny-list')}"
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert P.resolve_model("tiny-list") == path and len(calls) == 1  # second call: cache hit
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp dirs left behind

    # fingerprint depends on seed and generator version
    assert P.fingerprint("tiny-list", seed=5) != P.fingerprint("tiny-list")
    monkeypatch.setattr(P, "GENERATOR_VERSION", P.GENERATOR_VERSION + 1)
    assert P.fingerprint("tiny-list") not in path.name


def test_resolve_model_lost_race(tmp_path, monkeypatch):
    """Another process renames its copy into place first: ours is discarded, theirs is used."""
    monkeypatch.setenv("NEMOH_CACHE", str(tmp_path))
    final = tmp_path / "checkpoints" / f"tiny-list-{P.fingerprint('tiny-list')}"
    real_write = P.write_checkpoint

    def racing_write(name, out_dir, **kw):
        real_write(name, final)  # the other process finishes first
        (final / "winner").touch()
        return real_write(name, out_dir, **kw)

    monkeypatch.setattr(P, "write_checkpoint", racing_write)
    assert P.resolve_model("tiny-list") == final
    assert (final / "winner").exists()
    assert [p.name for p in final.parent.iterdir()] == [final.name]


def test_resolve_model_paths(checkpoints):
    path = checkpoints["tiny-dense"]
    assert P.resolve_model(str(path)) == path
    assert P.resolve_model(str(path / "config.json")) == path


def test_resolve_model_unknown(tmp_path):
    with pytest.raises(NemohError) as err:
        P.resolve_model("tiny-dens")
    msg = str(err.value)
    assert "Unknown model or preset 'tiny-dens'" in msg and "Did you mean: tiny-dense" in msg
    assert "neither" in msg and "\n" not in msg
    with pytest.raises(NemohError, match="neither"):
        P.resolve_model(str(tmp_path / "missing"))
    with pytest.raises(NemohError, match="neither"):
        P.resolve_model("")  # not the current directory

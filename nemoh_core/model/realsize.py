"""Random-weight checkpoints at a released model's real shapes, written tensor by tensor in the hub layout.

The tiny presets go through transformers (`nemoh.model.presets.write_checkpoint`), which builds the whole
model in fp32 first: at Nemotron-H-8B's size that is 36 GB. This writer never holds more than one shard:
each tensor is drawn alone (nemoh.model.init's "plain" profile: trained-like magnitudes that keep a
52-layer stack at a unit-scale residual stream, one generator per (seed, name)), cast to the checkpoint
dtype, and written when its shard is full. Names are the hub's (`backbone.*`, one tensor per expert,
`lm_head.weight`), shards `model-0000K-of-0000N.safetensors` with `model.safetensors.index.json`, and
config.json is the given config itself (release spellings kept), so the loader faces what a user's
local snapshot holds.
"""

from __future__ import annotations

import copy
import json
import re
import time
from pathlib import Path
from typing import Any

import torch

from nemoh import display, dtypes
from nemoh.errors import NemohError
from nemoh.model.config import parse_config
from nemoh.model.ir import build_graph

SHARD_BYTES = 2 << 30  # 2 GiB shards, a common size for released checkpoints
_EXPERTS = re.compile(r"layers\.(\d+)\.mixer\.experts\.(up_proj|down_proj)")


def truncate_layers(config: dict[str, Any], n: int) -> dict[str, Any]:
    """The config with only its first `n` layers (pattern string or list cut, num_hidden_layers set)."""
    out = copy.deepcopy(config)
    pat = out.get("hybrid_override_pattern")
    if isinstance(pat, str):
        if not 0 < n <= len(pat):
            raise NemohError(f"--num-layers {n}: the model has {len(pat)} layers")
        out["hybrid_override_pattern"] = pat[:n]
    elif isinstance(out.get("layers_block_type"), list):
        out["layers_block_type"] = out["layers_block_type"][:n]
    out["num_hidden_layers"] = n
    return out


def hub_names(name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(name in the hub layout, tensor) for one canonical tensor: stacked experts become one per expert."""
    if name == "lm_head.weight":
        return [(name, t)]
    m = _EXPERTS.fullmatch(name)
    if m:
        return [(f"backbone.layers.{m[1]}.mixer.experts.{e}.{m[2]}.weight", t[e].contiguous())
                for e in range(t.shape[0])]
    return [(f"backbone.{name}", t)]


def write_random_checkpoint(config: dict[str, Any], out_dir: str | Path, *, seed: int = 0, dtype: str | None = None,
                            shard_bytes: int = SHARD_BYTES, progress: bool = True) -> Path:
    """Write `config` (a config.json dict) with random weights to `out_dir`; returns the directory."""
    from safetensors.torch import save_file

    from nemoh.bench.models import RandomWeights

    cfg = parse_config(config, "the config to write")
    dtype = dtype or str(config.get("torch_dtype") or "bfloat16")
    graph = build_graph(cfg, dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (*out.glob("model*.safetensors"), out / "model.safetensors.index.json"):
        stale.unlink(missing_ok=True)
    weights = RandomWeights(graph, seed, label="random checkpoint")
    shards: list[dict[str, torch.Tensor]] = [{}]
    files: list[Path] = []
    held = 0
    t0 = time.perf_counter()
    total = sum(t.numel * dtypes.ITEMSIZE[t.dtype] for t in graph.params)
    written = 0
    shown = t0

    def flush() -> None:
        nonlocal held
        if shards[-1]:
            f = out / f"model-{len(files) + 1:05d}.part.safetensors"
            save_file(shards[-1], str(f), metadata={"format": "pt"})
            files.append(f)
            shards[-1] = {}
            held = 0

    for spec in graph.params:
        t = weights.read(spec.name).contiguous()
        for key, part in hub_names(spec.name, t):
            nbytes = part.numel() * part.element_size()
            if held and held + nbytes > shard_bytes:
                flush()
            shards[-1][key] = part
            held += nbytes
            written += nbytes
        if progress and (time.perf_counter() - shown > 2 or spec is graph.params[-1]):
            shown = time.perf_counter()
            rate = written / max(shown - t0, 1e-9)
            print(f"\r  {display.si(written, 'B')} of {display.si(total, 'B')} ({display.si(rate, 'B')}/s)",
                  end="", flush=True)
    flush()
    if progress:
        print()
    n = len(files)
    weight_map: dict[str, str] = {}
    for i, f in enumerate(files, 1):
        final = out / f"model-{i:05d}-of-{n:05d}.safetensors"
        f.rename(final)
        from safetensors import safe_open

        with safe_open(str(final), framework="pt") as h:
            weight_map.update({k: final.name for k in h.keys()})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": written}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype}, indent=2) + "\n")
    return out


def write_real_size(config_file: Path | None, preset: str | None, out_dir: str | Path, *, seed: int = 0,
                    dtype: str | None = None, num_layers: int | None = None,
                    max_shard_size: str | None = None) -> tuple[str, Path]:
    """`nemoh make-model --config FILE | --preset BENCH_PRESET`: (what was written, where)."""
    from nemoh.bench.models import BENCH_PRESETS
    from nemoh.conformance.memory import parse_size
    from nemoh.model.config_checks import read_json_file

    if config_file is not None:
        config, what = read_json_file(config_file, "config.json"), str(config_file)
    else:
        assert preset is not None  # the CLI requires one of the two
        config, what = dict(BENCH_PRESETS[preset].config), f"bench preset {preset}"
    if num_layers is not None:
        config = truncate_layers(config, num_layers)
    shard = parse_size(max_shard_size) if max_shard_size else SHARD_BYTES
    return what, write_random_checkpoint(config, out_dir, seed=seed, dtype=dtype, shard_bytes=shard)

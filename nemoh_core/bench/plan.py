"""Planning a benchmark run: the settings, the model it targets, and whether it fits the device."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemoh.bench.cost import active_params, memory_estimate
from nemoh.bench.models import (
    BENCH_PRESETS,
    bench_preset_config,
)
from nemoh.conformance.tolerances import TOLERANCES
from nemoh.errors import NemohError, did_you_mean
from nemoh.model.config import load_config
from nemoh.model.ir import build_graph

FORMAT = "nemoh-bench/2"  # /2: the shared nemoh.environment record (`started`, not `date`)
REFERENCE = "hf"
FIT_FRACTION = 0.9  # refuse when the estimate exceeds this share of the free memory


def tie_tolerance(dtype: str) -> float:
    """Largest top-2 margin (relative to max |logit|) that counts as a near-tie at `dtype`: the tolerance
    table's `greedy_tie_margin` row, with its reason (a dtype without a row is an error, not a guess)."""
    t = TOLERANCES.get(("greedy_tie_margin", dtype))
    if t is None:
        raise NemohError(f"nemoh-bench: the tolerance table has no greedy_tie_margin row for {dtype} "
                         "(nemoh/conformance/tolerances.py)")
    return t.value


# ----------------------------------------------------------------------------------------------
# Settings

@dataclass
class Settings:
    model: str
    backends: list[str]
    dtype: str | None = None
    batch: int = 1
    prompt_lengths: list[int] = field(default_factory=lambda: [128, 512, 2048])
    decode_tokens: int = 32
    context_depths: list[int] = field(default_factory=lambda: [128, 2048])
    repeats: int = 5
    warmup: int = 1
    device: str | None = None
    reference: str = REFERENCE  # "hf" or "none"
    seed: int = 0
    progress: bool = True
    probe_copy_bytes: int | None = None  # None: the probe's default size for the device
    probe_matmul_n: int | None = None

    def check(self) -> None:
        for name in ("batch", "decode_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise NemohError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise NemohError(f"--warmup must be >= 0, got {self.warmup}")
        for name in ("prompt_lengths", "context_depths"):
            v = getattr(self, name)
            if not v or any(x < 1 for x in v):
                raise NemohError(f"--{name.replace('_', '-')} must be positive integers, got {v}")
        if not self.backends:
            raise NemohError("--backend needs at least one backend name")
        if self.reference not in (REFERENCE, "none"):
            raise NemohError(f"--reference must be '{REFERENCE}' or 'none', got {self.reference!r}")


# ----------------------------------------------------------------------------------------------
# The model under test

@dataclass
class Target:
    name: str
    kind: str  # "bench-preset" (in-memory random weights) or "checkpoint" (files, incl. tiny presets)
    config: Any
    graph: Any
    path: Path | None = None
    preset: Any = None
    source: str = ""

    def checkpoint_path(self) -> Path:
        """The checkpoint directory of a "checkpoint" target (a bench preset has none: its weights are
        made in memory)."""
        if self.path is None:
            raise NemohError(f"{self.name}: a {self.kind} target has no checkpoint directory")
        return self.path

    def describe(self) -> dict[str, Any]:
        g, c = self.graph, self.config
        return {
            "name": self.name, "kind": self.kind,
            "source": self.preset.source if self.preset else self.source,
            "seed": self.preset.seed if self.preset else None,
            "pattern": c.pattern, "num_layers": c.num_layers, "dtype": g.dtype, "hidden_size": c.hidden_size,
            "vocab_size": c.vocab_size, "params_total": g.params_total, "params_active_per_token": active_params(g),
            "params_bytes": sum(t.nbytes for t in g.params),
            "state_bytes_per_sequence": g.state_bytes_per_sequence,
            "state_bytes_per_token": g.state_bytes_per_token,
        }


def resolve_target(model: str, dtype: str | None) -> Target:
    if model in BENCH_PRESETS:
        config = bench_preset_config(model)
        return Target(model, "bench-preset", config, build_graph(config, dtype or config.torch_dtype),
                      preset=BENCH_PRESETS[model])
    from nemoh.model.presets import all_presets, resolve_model

    presets = all_presets()
    p = Path(model).expanduser()
    if not (p.exists() or model in presets):
        raise NemohError(did_you_mean("model or preset", model, [*presets, *BENCH_PRESETS])
                         + f" ('{model}' is neither a checkpoint directory nor a preset name.)")
    path = resolve_model(model)
    config = load_config(path)
    source = f"nemoh tiny preset {model} (generated checkpoint {path.name})" if model in presets else str(path)
    return Target(model, "checkpoint", config, build_graph(config, dtype or config.torch_dtype), path=path,
                  source=source)


def check_fit(target: Target, s: Settings, available: int | None, device_label: str) -> dict[str, Any]:
    """The IR's memory estimate for this run; a NemohError when it exceeds the free memory."""
    max_ctx = max(max(s.prompt_lengths), max(s.context_depths) + s.decode_tokens)
    need = memory_estimate(target.graph, s.batch, max(max(s.prompt_lengths), max(s.context_depths)), max_ctx)
    fits = available is None or need["total_bytes"] <= FIT_FRACTION * available
    est: dict[str, Any] = {**need, "available_bytes": available, "fits": fits}
    if available is not None and not fits:  # (an unknown amount of free memory always fits)
        gib = 1 << 30
        raise NemohError(
            f"{target.name} at {target.graph.dtype} will not fit {device_label}: about "
            f"{est['total_bytes'] / gib:.1f} GiB needed (params {est['params_bytes'] / gib:.1f} + state "
            f"{est['state_bytes'] / gib:.2f} + activations {est['activation_bytes'] / gib:.2f} GiB, estimated from "
            f"the IR) but {available / gib:.1f} GiB free; choose a smaller model, dtype, batch or length")
    return est

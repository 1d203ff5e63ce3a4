"""What nemoh-bench runs: bench presets with released shapes, in-memory random weights, and the
runners that put a nemoh backend and the transformers reference behind one timing surface.

Bench presets are configs only. Their weights are generated where they run (on the GPU for GPU
runs), deterministically from (seed, tensor name), and handed to the backend through
`RandomWeights`, an in-memory stand-in for `nemoh.model.weights.Checkpoint`: it has the methods a
backend's `load(graph, checkpoint, device=)` calls (`load(graph)`, `read(name)`, `validate`,
`mismatches`, `notices`, and `formats`/`stored`, empty: random weights are never quantized), so no
checkpoint is written and the backend protocol is unchanged.
`load` returns a lazy mapping that makes each tensor when it is read, so the weights exist once
(in the backend), never twice. On a GPU run the tensors are made on that device: a backend that
moves them with `.to(device)` (the PyTorch executor) takes them without a copy.

The transformers reference of a bench preset is built on the meta device and given the same
tensors (`load_state_dict(assign=True)`), with any dt clamp removed as in
`nemoh.oracle.reference.load_reference(..., intended=True)`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nemoh import dtypes
from nemoh.errors import NemohError
from nemoh.model.config import parse_config
from nemoh.model.init import Draw, generator, init_tensor
from nemoh.model.ir import Graph
from nemoh.model.weights import bit_pattern
from nemoh.runtime.session import Model

# ----------------------------------------------------------------------------------------------
# Bench presets

_COMMON = {
    "architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h", "attention_bias": False,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "conv_kernel": 4, "chunk_size": 128,
    "expand": 2, "layer_norm_epsilon": 1e-5, "mamba_hidden_act": "silu", "mlp_hidden_act": "relu2",
    "mlp_bias": False, "use_bias": False, "use_conv_bias": True, "tie_word_embeddings": False,
    "time_step_min": 0.001, "time_step_max": 0.1, "time_step_floor": 1e-4, "mamba_ssm_cache_dtype": "float32",
}


@dataclass(frozen=True)
class BenchPreset:
    name: str
    description: str
    source: str  # where the shapes come from
    config: dict[str, Any] = field(hash=False)
    seed: int = 0


BENCH_PRESETS: dict[str, BenchPreset] = {p.name: p for p in (
    BenchPreset(
        "cpu-small", "dense hybrid (M, -, *) sized so a CPU run is matmul time, not Python overhead",
        "nemoh bench preset, Nemotron-H 8B / Nano 9B v2 layout at 1/4 width",
        {**_COMMON, "hybrid_override_pattern": "M-M-M*-M", "hidden_size": 1024, "vocab_size": 32768,
         "mamba_num_heads": 32, "mamba_head_dim": 48, "n_groups": 4, "ssm_state_size": 64,
         "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 96, "intermediate_size": 3072,
         "torch_dtype": "float32"},
        seed=2001),
    BenchPreset(
        "cpu-small-moe", "MoE hybrid (M, E, *) at CPU size: 32 experts, top-4, shared expert",
        "nemoh bench preset, Nemotron 3 Nano 30B-A3B layout at CPU size",
        {**_COMMON, "hybrid_override_pattern": "MEMEM*EM", "hidden_size": 1024, "vocab_size": 32768,
         "mamba_num_heads": 32, "mamba_head_dim": 48, "n_groups": 4, "ssm_state_size": 64,
         "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 96, "intermediate_size": 3072,
         "n_routed_experts": 32, "num_experts_per_tok": 4, "moe_intermediate_size": 512,
         "moe_shared_expert_intermediate_size": 1024, "n_shared_experts": 1, "n_group": 1, "topk_group": 1,
         "norm_topk_prob": True, "routed_scaling_factor": 2.5, "torch_dtype": "float32"},
        seed=2002),
    BenchPreset(
        "nemotron-h-8b", "Nemotron-H 8B Base shapes (M, -, *), 52 layers",
        "released config.json of nvidia/Nemotron-H-8B-Base-8K (shared/configs/Nemotron-H-8B-Base-8K.json); "
        "head_dim written out (= its attention_head_dim) because transformers reads only head_dim",
        {**_COMMON, "hybrid_override_pattern": "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
         "hidden_size": 4096, "vocab_size": 131072, "mamba_num_heads": 128, "mamba_head_dim": 64, "n_groups": 8,
         "ssm_state_size": 128, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
         "attention_head_dim": 128, "intermediate_size": 21504, "max_position_embeddings": 8192,
         "torch_dtype": "bfloat16"},
        seed=2003),
    BenchPreset(
        "nemotron-nano-9b-v2", "Nemotron Nano 9B v2 shapes (M, -, *), 56 layers, d_inner 10240 != 2 x 4480",
        "NVIDIA-Nemotron-Nano-9B-v2 config as transcribed in several public third-party sources "
        "(hidden 4480, 56 layers, pattern, Mamba 128 x 80 heads, 8 groups, state 128, attention 40/8 x 128, "
        "MLP 15680, vocab 131072); keys they do not give (chunk_size, eps, dt settings, conv, "
        "max_position_embeddings) are taken "
        "from the released Nemotron-H 8B config, not from the 9B v2 file",
        {**_COMMON, "hybrid_override_pattern": "M-M-M-MM-M-M-M*-M-M-M*-M-M-M-M*-M-M-M-M*-M-MM-M-M-M-M-M-",
         "hidden_size": 4480, "vocab_size": 131072, "mamba_num_heads": 128, "mamba_head_dim": 80, "n_groups": 8,
         "ssm_state_size": 128, "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
         "intermediate_size": 15680, "max_position_embeddings": 8192, "torch_dtype": "bfloat16"},
        seed=2004),
    BenchPreset(
        "nemotron-3-nano-30b-a3b", "Nemotron 3 Nano 30B-A3B shapes (M, E, *), 52 layers, 128 experts top-6",
        "released config.json of nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16 "
        "(shared/configs/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.json)",
        {**_COMMON, "hybrid_override_pattern": "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
         "hidden_size": 2688, "vocab_size": 131072, "mamba_num_heads": 64, "mamba_head_dim": 64, "n_groups": 8,
         "ssm_state_size": 128, "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128,
         "intermediate_size": 1856, "n_routed_experts": 128, "num_experts_per_tok": 6,
         "moe_intermediate_size": 1856, "moe_shared_expert_intermediate_size": 3712, "n_shared_experts": 1,
         "n_group": 1, "topk_group": 1, "norm_topk_prob": True, "routed_scaling_factor": 2.5,
         "max_position_embeddings": 262144,
         "torch_dtype": "bfloat16"},
        seed=2005),
)}


def bench_preset_config(name: str):
    p = BENCH_PRESETS[name]
    return parse_config(p.config, f"bench preset {name}")


# ----------------------------------------------------------------------------------------------
# Random weights, made where they are used

class _LazyTensors(Mapping):
    """name -> tensor, each made when it is read and not kept: the caller holds the only copy."""

    def __init__(self, weights: RandomWeights, names: list[str]):
        self.w, self.names = weights, names

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        return self.w.read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


class RandomWeights:
    """In-memory stand-in for `nemoh.model.weights.Checkpoint` (see the module docstring)."""

    def __init__(self, graph: Graph, seed: int, device: torch.device | str = "cpu", label: str = "random"):
        self.graph, self.seed, self.device = graph, seed, torch.device(device)
        self.dir = Path(f"<{label}: random weights, seed {seed}, made on {self.device}>")
        self.notices: list[str] = []
        self.specs = {t.name: t for t in graph.params}

    def validate(self, graph: Graph) -> None:
        want = {t.name: (t.shape, t.dtype) for t in graph.params}
        have = {n: (t.shape, t.dtype) for n, t in self.specs.items()}
        if want != have:
            diff = sorted(set(want.items()) ^ set(have.items()))[:1]
            raise NemohError(f"{self.dir}: made for another graph (first difference: {diff})")

    def read(self, name: str) -> torch.Tensor:
        t = self.specs.get(name)
        if t is None:
            raise NemohError(f"{self.dir}: missing tensor '{name}'")
        d = Draw(name, t.shape, self.graph.config, generator(self.seed, name, self.device), torch.float32,
                 dtypes.torch_dtype(t.dtype), self.device, self.graph.config.num_layers)
        return init_tensor("plain", d)  # trained-like magnitudes; see nemoh.model.init

    def load(self, graph: Graph, names=None) -> Mapping[str, torch.Tensor]:
        self.validate(graph)
        return _LazyTensors(self, list(names) if names is not None else list(self.specs))

    def formats(self, graph: Graph) -> dict[str, str]:
        """Quantized linears: none (random weights are never quantized; Checkpoint.formats' interface)."""
        return {}

    def stored(self, graph: Graph) -> dict[str, torch.Tensor]:
        """A quantized linear's stored codes and scales: none (Checkpoint.stored's interface)."""
        return {}

    def kv_scales(self, graph: Graph) -> dict[str, tuple[str, str]]:
        """An FP8 KV cache's scales: none (Checkpoint.kv_scales' interface)."""
        return {}

    def mismatches(self, loaded: dict[str, torch.Tensor]) -> list[str]:
        bad = []
        for name, t in loaded.items():
            ref = self.read(name).to(t.dtype).cpu()
            if ref.shape != t.shape or not torch.equal(bit_pattern(ref), bit_pattern(t.detach().cpu())):
                bad.append(name)
        return bad


# ----------------------------------------------------------------------------------------------
# Runners: one surface for a nemoh backend (through nemoh.runtime.session) and for transformers

def tensor_bytes(obj: Any, _seen: set[int] | None = None) -> int:
    """Bytes of every distinct tensor reachable from obj (dicts, lists, tuples, object attributes)."""
    seen = set() if _seen is None else _seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
        return sum(tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


class BackendRunner:
    """A nemoh backend, driven through nemoh.runtime.session sessions (input validation included)."""

    is_reference = False

    def __init__(self, model: Model, name: str):
        self._model: Model | None = model
        self.name = name

    @property
    def model(self) -> Model:
        """The loaded model; a runner used after `close` says so."""
        if self._model is None:
            raise RuntimeError(f"bench runner '{self.name}' is closed")
        return self._model

    def describe(self) -> dict[str, Any]:
        return dict(self.model.backend.describe())

    def new(self, batch: int):
        return self.model.session(batch)

    def step(self, session, ids: torch.Tensor) -> torch.Tensor:
        """Run ids [B, T] on the session's state; host logits of the last position [B, V]."""
        return session.forward(ids, last_only=True)[:, -1]

    def snapshot(self, session):
        return session.snapshot()

    def restore(self, session, snap):
        session.restore(snap)
        return session

    def state_bytes(self, session) -> int | None:
        """Bytes of the exported state; None for a backend that cannot export it (llama.cpp keeps its
        state inside: its memory shows in peak_memory_bytes only)."""
        from nemoh.runtime.backend import capability

        if not capability(self.model.backend, "state_export", self.model.graph.dtype).ok:
            return None
        exported = self.model.backend.export_state(session.state)
        return sum(t.numel() * t.element_size() for k, t in exported.items() if k != "mask")

    def close(self) -> None:
        self._model = None


class HFRunner:
    """transformers' NemotronHForCausalLM timed the same way: prefill is one forward over the prompt
    with use_cache, decode one token with past_key_values; logits brought to the host as a
    backend's are."""

    is_reference = True

    def __init__(self, model, device: torch.device, dtype: str):
        self.model, self.device, self.name = model, device, "hf"
        self.out_dtype = torch.float64 if dtype == "float64" else torch.float32

    def describe(self) -> dict[str, Any]:
        import transformers

        return {"backend": "hf", "device": str(self.device), "transformers": transformers.__version__,
                "torch": torch.__version__, "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
                "attn_implementation": self.model.config._attn_implementation,
                "note": getattr(self.model, "nemoh_dt_note", "dt limit as shipped") + ", eager experts"
                        + ("" if _has_kernels() else ", no mamba_ssm/causal_conv1d kernels")}

    def new(self, batch: int):
        return {"cache": None}

    @torch.inference_mode()
    def step(self, handle, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids.to(self.device), past_key_values=handle["cache"], use_cache=True,
                         logits_to_keep=1)
        handle["cache"] = out.past_key_values
        return out.logits[:, -1].to(self.out_dtype).cpu()

    def snapshot(self, handle):
        return copy.deepcopy(handle)

    def restore(self, handle, snap):
        return copy.deepcopy(snap)

    def state_bytes(self, handle) -> int:
        return tensor_bytes(handle["cache"])

    def close(self) -> None:
        self.model = None


def _has_kernels() -> bool:
    import importlib.util

    return importlib.util.find_spec("mamba_ssm") is not None


def hf_from_checkpoint(path: Path, dtype: str, device: torch.device):
    from nemoh.oracle.reference import load_reference

    return load_reference(path, dtype, intended=True).to(device)


def hf_from_weights(config_dict: dict[str, Any], graph: Graph, weights: RandomWeights):
    """transformers' model holding `weights` (made on their device), without writing a checkpoint."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import NemotronHConfig, NemotronHForCausalLM

    cfg = NemotronHConfig(**copy.deepcopy(config_dict))
    cfg._attn_implementation = "sdpa"
    cfg._experts_implementation = "eager"
    with torch.device("meta"):
        model = NemotronHForCausalLM(cfg)
    state = {}
    for name, t in weights.load(graph).items():
        key = name if name == "lm_head.weight" else f"model.{name}"
        state[key] = t
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise NemohError(f"transformers model and nemoh graph disagree: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise NemohError(f"transformers model has tensors no weight filled: {left[:3]}")
    from nemoh.oracle.reference import remove_dt_clamp

    return remove_dt_clamp(model.eval())  # intended semantics, as load_reference(intended=True)

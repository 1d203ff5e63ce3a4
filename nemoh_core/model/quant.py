"""Quantized checkpoints as NVIDIA ships them: ModelOpt's unified Hugging Face format, FP8 and NVFP4.

What a checkpoint says (checked against ModelOpt's exporter and vLLM's reader; docs/quantized-formats.md):
  * `hf_quant_config.json` = {"producer": {...}, "quantization": {"quant_algo": "FP8" | "NVFP4",
    "kv_cache_quant_algo": "FP8" | null, "group_size": 16 (NVFP4), "exclude_modules": [...]}};
    or config.json's `quantization_config` with `quant_method: "modelopt"` and the same keys, flat or nested.
  * `exclude_modules` are shell-style wildcards (fnmatch: `*`, `?`, `[...]`) over module names as the
    exporter saw them (`lm_head`, `backbone.layers.4.mixer.in_proj`, `backbone.layers.5.mixer*`); a
    module matching one stays in the checkpoint's float dtype.
  * Per quantized linear `M` (per expert for MoE experts, `M = ...experts.{e}.up_proj`):
      FP8:   M.weight float8_e4m3fn [out, in]; M.weight_scale fp32 per tensor; M.input_scale fp32 per tensor
             (static activation scale; absent: weight-only).
      NVFP4: M.weight uint8 [out, in/2], two e2m1 codes a byte, element 2j in the low nibble;
             M.weight_scale float8_e4m3fn [out, in/16], one per 16 consecutive elements of a row;
             M.weight_scale_2 fp32 per tensor (the global scale); M.input_scale fp32 per tensor (the
             activations' global scale: W4A4; absent: weight-only).
  * `kv_cache_quant_algo: FP8` adds `k_proj.k_scale` / `v_proj.v_scale` (fp32 per tensor) for an FP8 KV cache.

nemoh's choices where the format leaves room (each an option of nemoh.oracle.ops with its default):
  * which modules can be quantized: the linear projections of the IR (`QUANTIZABLE`); the embedding, the
    conv1d, the router (`gate`), the norms and the SSM parameters never are (ModelOpt disables the conv1d
    and the router by default; a file that stores one of them quantized is refused).

Importing this module imports neither torch nor safetensors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from nemoh.errors import WeightsError

QUANT_CONFIG_FILE = "hf_quant_config.json"
#: quant_algo -> nemoh's format name
ALGOS = {"FP8": "fp8", "NVFP4": "nvfp4"}
KV_ALGOS = {"FP8": "fp8"}
NVFP4_GROUP = 16
#: the tensors a quantized linear adds next to its `weight`, by format: (suffix, required)
SCALES: dict[str, tuple[tuple[str, bool], ...]] = {
    "fp8": (("weight_scale", True), ("input_scale", False)),
    "nvfp4": (("weight_scale", True), ("weight_scale_2", True), ("input_scale", False)),
}
#: every suffix a checkpoint may carry next to a linear's weight (k_scale / v_scale: the FP8 KV cache)
AUX_SUFFIXES = ("weight_scale_2", "weight_scale", "input_scale", "k_scale", "v_scale")
#: the IR's linear projections that a quantized checkpoint may store quantized (canonical weight names)
QUANTIZABLE = re.compile(
    r"layers\.\d+\.mixer\.(?:in_proj|out_proj|q_proj|k_proj|v_proj|o_proj|up_proj|down_proj|fc1_latent_proj|"
    r"fc2_latent_proj|shared_experts\.up_proj|shared_experts\.down_proj)\.weight|"
    r"layers\.\d+\.mixer\.experts\.(?:up_proj|down_proj)|lm_head\.weight")


def aux_name(weight: str, suffix: str) -> str:
    """The canonical name of a scale next to canonical weight `weight` (a ':' never occurs in a file name
    nemoh maps, so scales cannot collide with the IR's parameters)."""
    return f"{weight}:{suffix}"


def module_names(weight: str, experts: int | None = None) -> list[str]:
    """The hub module names (as `exclude_modules` spells them) of canonical weight `weight`: one per expert
    for stacked experts."""
    if weight == "lm_head.weight":
        return ["lm_head"]
    base = weight.removesuffix(".weight")
    m = re.fullmatch(r"(layers\.\d+\.mixer\.experts)\.(up_proj|down_proj)", base)
    if m:
        return [f"backbone.{m.group(1)}.{e}.{m.group(2)}" for e in range(experts or 0)]
    return [f"backbone.{base}"]


@dataclass(frozen=True)
class QuantConfig:
    """A checkpoint's quantization, as its hf_quant_config.json (or config.json) states it."""

    algo: str  # "FP8" | "NVFP4"
    group_size: int | None
    exclude_modules: tuple[str, ...]
    kv_cache_algo: str | None
    source: str  # the file it was read from
    producer: str = ""
    repaired: tuple[str, ...] = ()  # exclude_modules entries as written, where nemoh read them repaired

    def __post_init__(self) -> None:
        if self.algo not in ALGOS:
            raise WeightsError(f"{self.source}: quant_algo {self.algo!r} is not supported (nemoh reads "
                               f"{', '.join(ALGOS)})")
        if self.algo == "NVFP4" and self.group_size != NVFP4_GROUP:
            raise WeightsError(f"{self.source}: NVFP4 with group_size {self.group_size!r}; the format has "
                               f"blocks of {NVFP4_GROUP}")
        if self.kv_cache_algo is not None and self.kv_cache_algo not in KV_ALGOS:
            raise WeightsError(f"{self.source}: kv_cache_quant_algo {self.kv_cache_algo!r} is not supported "
                               f"(nemoh reads {', '.join(KV_ALGOS)} or null)")

    @property
    def fmt(self) -> str:
        return ALGOS[self.algo]

    def excluded(self, module: str) -> bool:
        """Whether hub module `module` matches a pattern of exclude_modules (as ModelOpt and vLLM match:
        fnmatch, case-sensitive); the transformers spelling `model.` is tried as well as `backbone.`."""
        names = {module, "model." + module.removeprefix("backbone.")} if module.startswith("backbone.") else {module}
        return any(fnmatchcase(n, p) for n in names for p in self.exclude_modules)

    def format_of(self, weight: str, experts: int | None = None) -> str | None:
        """The format canonical weight `weight` is stored in: 'fp8', 'nvfp4', or None (unquantized)."""
        if not QUANTIZABLE.fullmatch(weight):
            return None
        mods = module_names(weight, experts)
        ex = [self.excluded(m) for m in mods]
        if any(ex) and not all(ex):
            raise WeightsError(f"{self.source}: exclude_modules excludes some experts of '{weight}' but not all "
                               f"({mods[ex.index(True)]} is excluded, {mods[ex.index(False)]} is not); nemoh needs "
                               "one format per expert stack")
        return None if ex and ex[0] else self.fmt

    def summary(self) -> dict[str, Any]:
        return {"algo": self.algo, "format": self.fmt, "group_size": self.group_size,
                "exclude_modules": list(self.exclude_modules), "kv_cache": self.kv_cache_algo or "unquantized",
                "producer": self.producer, "source": self.source}


def _strip_sentinel(pattern: str) -> str:
    """An exclude pattern without the residue of ModelOpt's name sentinel (".\\x00modelopt_name_sentinel",
    appended before its reverse transformers rename and stripped after). nvidia-modelopt 0.47.0 with
    transformers 5.25 writes every pattern of a Nemotron-H export as "lm_head.\\x00backbone.pt_name_sentinel":
    the `model.` -> `backbone.` rename rule's `.` eats the `o` of `modelopt`, so the strip misses. A module
    name never holds NUL; what precedes ".\\x00" is the module, a trailing "*" / ".*" the wildcard ModelOpt
    moved after the sentinel (docs/quantized-formats.md)."""
    if "\x00" not in pattern:
        return pattern
    base = pattern.split("\x00", 1)[0].removesuffix(".")
    return base + (".*" if pattern.endswith(".*") else "*" if pattern.endswith("*") else "")


def parse_quant_config(raw: Any, source: str) -> QuantConfig:
    """A QuantConfig from hf_quant_config.json's object, or config.json's `quantization_config`."""
    if not isinstance(raw, dict):
        raise WeightsError(f"{source}: expected a JSON object")
    q = raw.get("quantization", raw)  # nested (hf_quant_config.json) or flat (config.json)
    if not isinstance(q, dict):
        raise WeightsError(f"{source}: 'quantization' must be an object")
    algo = q.get("quant_algo")
    if not isinstance(algo, str):
        raise WeightsError(f"{source}: missing or non-string 'quant_algo'")
    group = q.get("group_size")
    if group is not None and (not isinstance(group, int) or isinstance(group, bool)):
        raise WeightsError(f"{source}: 'group_size' must be an integer, got {group!r}")
    ex = q.get("exclude_modules") or []
    if not isinstance(ex, list) or not all(isinstance(p, str) for p in ex):
        raise WeightsError(f"{source}: 'exclude_modules' must be a list of strings")
    repaired = tuple(p for p in ex if _strip_sentinel(p) != p)
    ex = [_strip_sentinel(p) for p in ex]
    kv = q.get("kv_cache_quant_algo")
    if kv is not None and not isinstance(kv, str):
        raise WeightsError(f"{source}: 'kv_cache_quant_algo' must be a string or null")
    prod = raw.get("producer") if isinstance(raw.get("producer"), dict) else q.get("producer")
    producer = f"{prod.get('name', '?')} {prod.get('version', '')}".strip() if isinstance(prod, dict) else ""
    return QuantConfig(algo.upper(), group, tuple(ex), kv.upper() if kv else None, source, producer, repaired)


def quant_config_of(config: dict[str, Any], source: str) -> QuantConfig | None:
    """The quantization a config.json dict declares (`quantization_config` with quant_method modelopt)."""
    qc = config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict) or str(qc.get("quant_method", "")).lower() != "modelopt":
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        raise WeightsError(f"{source}: quantization_config with quant_method {method!r}; nemoh reads ModelOpt "
                           "checkpoints (quant_method 'modelopt') only")
    return parse_quant_config(qc, f"{source} (quantization_config)")


def read_quant_config(directory: str | Path) -> QuantConfig | None:
    """The quantization of a checkpoint directory: hf_quant_config.json if present (ModelOpt's own file),
    else config.json's quantization_config; None for an unquantized checkpoint."""
    from nemoh.model.config_checks import read_json_file

    d = Path(directory)
    f = d / QUANT_CONFIG_FILE
    if f.exists():
        return parse_quant_config(read_json_file(f, "quantization config", error=WeightsError), str(f))
    cfg = d / "config.json"
    if cfg.exists():
        raw = read_json_file(cfg, "config", error=WeightsError)
        if isinstance(raw, dict):
            return quant_config_of(raw, str(cfg))
    return None


# ----------------------------------------------------------------------------------------------
# Sizes (for `nemoh inspect`)

def stored_bytes(fmt: str | None, numel: int, rows_times_experts: int = 1, float_itemsize: int = 2) -> float:
    """Bytes one weight takes in the file: its codes plus its scales (input_scale included)."""
    if fmt == "fp8":
        return numel + 8 * rows_times_experts
    if fmt == "nvfp4":
        return numel / 2 + numel / NVFP4_GROUP + 12 * rows_times_experts
    return numel * float_itemsize


def write_quant_config(directory: str | Path, qc: QuantConfig) -> None:
    """hf_quant_config.json as ModelOpt writes it."""
    obj = {"producer": {"name": "nemoh", "version": "quant-writer-1"},
           "quantization": {"quant_algo": qc.algo, "kv_cache_quant_algo": qc.kv_cache_algo,
                            **({"group_size": qc.group_size} if qc.group_size else {}),
                            "exclude_modules": list(qc.exclude_modules)}}
    (Path(directory) / QUANT_CONFIG_FILE).write_text(json.dumps(obj, indent=4) + "\n", encoding="utf-8")


def act_key(weight: str, fmt: str) -> str:
    """Where a loaded parameter dict holds the input scale of quantized linear `weight` whose activations
    are quantized to `fmt` (`Checkpoint.load` puts it there; the oracle and executors read it)."""
    return f"{weight}:act_{fmt}"


def kv_key(layer: int, which: str) -> str:
    """Where a loaded parameter dict holds attention layer `layer`'s FP8 KV-cache scale, `which` 'k' or 'v'
    (the checkpoint's `k_proj.k_scale` / `v_proj.v_scale`; Checkpoint.load puts them there when the checkpoint's
    kv_cache_quant_algo is FP8)."""
    return f"layers.{layer}.mixer.{which}_proj.weight:kv_fp8"


def kv_quant_of(params: Mapping[str, Any], layer: int) -> tuple[Any, Any] | None:
    """(k_scale, v_scale) of attention layer `layer`'s FP8 KV cache, or None (the cache at the compute dtype)."""
    k, v = params.get(kv_key(layer, "k")), params.get(kv_key(layer, "v"))
    return None if k is None or v is None else (k, v)


def act_quant_of(params: Mapping[str, Any], weight: str) -> tuple[str, Any] | None:
    """(format, input_scale) of the activation quantizer before linear `weight`, or None."""
    for fmt in ALGOS.values():
        s = params.get(act_key(weight, fmt))
        if s is not None:
            return fmt, s
    return None

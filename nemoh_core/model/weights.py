"""Checkpoint tensors: safetensors only (never pickle), single file or sharded, lazy and mmap'd.

One declarative name table (`NAME_TABLE`) maps what a file calls a tensor to the IR's canonical
name. Two layouts are accepted:
  - the hub layout: `backbone.*`, one tensor per expert (`mixer.experts.{e}.up_proj.weight`);
  - transformers' in-memory layout: `model.*`, experts stacked (`mixer.experts.up_proj` [E, I, L]).
Per-expert tensors are stacked for the executors. `mtp.*` (the speculative head) is ignored with a
notice. Missing, unexpected and mis-shaped tensors are `WeightsError`s naming the tensor and file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch

from nemoh import dtypes
from nemoh.errors import WeightsError
from nemoh.model.config_checks import check_regular_file, read_json_file, show
from nemoh.model.ir import Graph
from nemoh.model.quant import AUX_SUFFIXES, SCALES, QuantConfig, act_key, aux_name, kv_key, read_quant_config

# how each quantized format stores its codes (safetensors dtype code) and the shape of a [out, in] weight
QUANT_DTYPES = {"fp8": "F8_E4M3", "nvfp4": "U8"}
SCALE_DTYPES = {"weight_scale": {"fp8": "F32", "nvfp4": "F8_E4M3"}, "weight_scale_2": {"nvfp4": "F32"},
                "input_scale": {"fp8": "F32", "nvfp4": "F32"}, "k_scale": {"fp8": "F32", "nvfp4": "F32"},
                "v_scale": {"fp8": "F32", "nvfp4": "F32"}}
PER_TENSOR = ((), (1,))  # ModelOpt writes per-tensor scales as 0-d tensors; [1] is accepted too


def _stored_shape(fmt: str | None, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The file shape of a weight of IR shape [..., out, in] stored in `fmt`."""
    return (*shape[:-1], shape[-1] // 2) if fmt == "nvfp4" else shape

# safetensors dtype codes nemoh reads (anything else, e.g. I32 or F8_E4M3, is refused)
FLOAT_DTYPES = set(dtypes.FROM_SAFETENSORS)

# (pattern over the name in the file, canonical name template, action)
#   direct: one file tensor is one canonical tensor
#   stack:  group(2) of the match is the expert index; stacked along dim 0
#   ignore: skipped with a notice
NAME_TABLE: tuple[tuple[str, str | None, str], ...] = (
    (r"mtp\..*", None, "ignore"),
    (r"(?:backbone|model)\.layers\.(\d+)\.mixer\.experts\.(0|[1-9]\d*)\.(up_proj|down_proj)\.weight",
     r"layers.\1.mixer.experts.\3", "stack"),
    (r"(?:backbone|model)\.(.+)", r"\1", "direct"),
    (r"(lm_head\.weight)", r"\1", "direct"),
)
_COMPILED = tuple((re.compile(p), t, a) for p, t, a in NAME_TABLE)


@dataclass(frozen=True)
class Entry:
    """Where a canonical tensor (or one expert slice of it) lives."""

    file: Path
    key: str
    expert: int | None = None


def _expert_of(e: Entry) -> int:
    """The expert index of a per-expert slice (validate() refuses a tensor given both ways)."""
    if e.expert is None:
        raise WeightsError(f"{e.file}: tensor '{e.key}' is not an expert slice, but other files give its "
                           "tensor per expert")
    return e.expert


def canonical_name(file_key: str) -> tuple[str | None, str, int | None]:
    """(canonical name or None, action, expert index) for a tensor name found in a file."""
    for rx, tmpl, action in _COMPILED:
        m = rx.fullmatch(file_key)
        if m:
            if action == "ignore":
                return None, action, None
            if tmpl is None:
                raise ValueError(f"NAME_TABLE row {rx.pattern!r}: action {action!r} needs a name template")
            name = m.expand(tmpl)
            return name, action, int(m.group(2)) if action == "stack" else None
    return None, "unknown", None


def _shard_name(index: Path, key: Any, value: Any) -> str:
    """The shard file an index entry names: a relative path inside the checkpoint folder, ending in
    .safetensors (never absolute, never through '..': an index cannot reach another model's files)."""
    if not isinstance(value, str):
        raise WeightsError(f"{index}: tensor {show(key)} maps to {show(value)}, expected a shard file name")
    parts = PurePosixPath(value).parts
    if (not value or "\\" in value or "\0" in value or PurePosixPath(value).is_absolute() or ".." in parts
            or not value.endswith(".safetensors") or PureWindowsPath(value).drive):
        raise WeightsError(f"{index}: tensor {show(key)} maps to {show(value)}; a shard must be a "
                           ".safetensors file inside the checkpoint folder")
    return value


def _open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such file") from None
    except Exception as e:  # SafetensorError: truncated, tampered header, bad offsets
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsError(f"{path}: not a valid safetensors file ({msg}); re-download or regenerate it") from None


class Checkpoint:
    """The tensors of a checkpoint directory, indexed by canonical name, read on demand."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.notices: list[str] = []
        self.entries: dict[str, list[Entry]] = {}
        self._handles: dict[Path, object] = {}
        #: scales of quantized linears, by aux_name(canonical weight, suffix)
        self.aux: dict[str, list[Entry]] = {}
        index = self.dir / "model.safetensors.index.json"
        if not self.dir.is_dir():
            raise WeightsError(f"{self.dir}: not a checkpoint directory")
        if os.path.lexists(index):
            raw = read_json_file(index, "safetensors index", error=WeightsError)
            wm = raw.get("weight_map") if isinstance(raw, dict) else None
            if not isinstance(wm, dict):
                raise WeightsError(f"{index}: malformed index (expected a JSON object with 'weight_map')")
            listed = {k: self.dir / _shard_name(index, k, v) for k, v in wm.items()}
            files = sorted(set(listed.values()))
            for f in files:
                if not os.path.lexists(f):
                    raise WeightsError(f"{index}: shard '{f.relative_to(self.dir)}' is listed but missing")
                check_regular_file(f, "safetensors file", WeightsError)
        else:
            files = sorted(f for f in self.dir.glob("*.safetensors"))
            for f in files:
                check_regular_file(f, "safetensors file", WeightsError)
            if not files:
                pickles = sorted(p.name for p in self.dir.glob("*.bin")) + sorted(p.name for p in self.dir.glob("*.pt"))
                if pickles:
                    raise WeightsError(f"{self.dir}: only pickle weights ({pickles[0]}), which nemoh never loads "
                                       "(unpickling runs code); convert them to safetensors first")
                raise WeightsError(f"{self.dir}: no model.safetensors or model.safetensors.index.json found")
            listed = None
        found: dict[str, Path] = {}
        for f in files:
            for key in self._handle(f).keys():
                if key in found:
                    raise WeightsError(f"{f}: tensor '{key}' also appears in {found[key].name}")
                found[key] = f
        if listed is not None:
            for key, f in listed.items():
                if key not in found:
                    raise WeightsError(f"{f}: tensor '{key}' is listed in the index but not in the file")
                if found[key] != f:
                    raise WeightsError(f"{index}: tensor '{key}' is listed in {f.name} but stored in "
                                       f"{found[key].name}")
        self.quant: QuantConfig | None = read_quant_config(self.dir)
        ignored = 0
        for key, f in sorted(found.items()):
            suffix = next((x for x in AUX_SUFFIXES if key.endswith("." + x)), None)
            if suffix is not None:
                name, action, expert = canonical_name(key[: -len(suffix) - 1] + ".weight")
                if action in ("direct", "stack") and name is not None:
                    if self.quant is None:
                        raise WeightsError(f"{f}: tensor '{key}' is a quantization scale, but {self.dir} has no "
                                           "hf_quant_config.json and config.json no quantization_config")
                    self.aux.setdefault(aux_name(name, suffix), []).append(Entry(f, key, expert))
                    continue
            name, action, expert = canonical_name(key)
            if action == "ignore":
                ignored += 1
                continue
            if name is None:
                raise WeightsError(f"{f}: unexpected tensor '{key}' (not part of a Nemotron-H checkpoint)")
            self.entries.setdefault(name, []).append(Entry(f, key, expert))
        if ignored:
            self.notices.append(f"ignored {ignored} mtp.* tensors (the speculative multi-token head)")
        if self.quant is not None and self.quant.repaired:
            self.notices.append(f"{self.quant.source}: {len(self.quant.repaired)} exclude_modules entries carry the "
                                f"residue of ModelOpt's name sentinel (e.g. {self.quant.repaired[0]!r}); read as "
                                f"{', '.join(map(repr, self.quant.exclude_modules[:3]))}: an engine matching them "
                                "literally quantizes what the producer excluded (docs/quantized-formats.md)")
        if self.quant is not None and self.quant.kv_cache_algo is not None:
            missing = sorted({n.split(".mixer.")[0] for n in self.entries if n.endswith("mixer.k_proj.weight")
                              and not (self.aux.get(aux_name(n, "k_scale")) and
                                       self.aux.get(aux_name(n.replace("k_proj", "v_proj"), "v_scale")))})
            self.notices.append(f"kv_cache_quant_algo {self.quant.kv_cache_algo}: K and V are cached as "
                                "e4m3(x / k_scale|v_scale)" + (f"; {', '.join(missing)} carry no k_scale/v_scale, "
                                                               "so 1.0 (as vLLM)" if missing else ""))

    def _handle(self, f: Path):
        if f not in self._handles:
            self._handles[f] = _open(f)
        return self._handles[f]

    def _read(self, e: Entry) -> torch.Tensor:
        try:
            return self._handle(e.file).get_tensor(e.key)
        except Exception as err:
            raise WeightsError(f"{e.file}: tensor '{e.key}' cannot be read ({err})") from None

    def file_shape(self, e: Entry) -> tuple[int, ...]:
        return tuple(self._handle(e.file).get_slice(e.key).get_shape())

    def quant_formats_by_name(self) -> dict[str, str]:
        """formats() from the file's own tensors (stacked experts counted from their entries)."""
        if self.quant is None:
            return {}
        out = {}
        for name, entries in self.entries.items():
            fmt = self.quant.format_of(name, len(entries) if entries[0].expert is not None else None)
            if fmt is not None:
                out[name] = fmt
        return out

    def formats(self, graph: Graph) -> dict[str, str]:
        """Canonical weight name -> 'fp8' / 'nvfp4' for each linear the quantization config quantizes."""
        if self.quant is None:
            return {}
        out = {}
        for t in graph.params:
            fmt = self.quant.format_of(t.name, t.shape[0] if t.name.endswith(("experts.up_proj",
                                                                               "experts.down_proj")) else None)
            if fmt is not None:
                out[t.name] = fmt
        return out

    def kv_scales(self, graph: Graph) -> dict[str, tuple[str, str]]:
        """nemoh.model.quant.kv_key(layer, 'k'|'v') -> (k_proj/v_proj weight name, 'k_scale'|'v_scale') for each
        attention layer, when the checkpoint's KV cache is FP8 (a scale not stored reads as 1.0: `read_kv`)."""
        if self.quant is None or self.quant.kv_cache_algo is None:
            return {}
        return {kv_key(l.index, w): (f"layers.{l.index}.mixer.{w}_proj.weight", f"{w}_scale")
                for l in graph.layers if l.kind == "attention" for w in ("k", "v")}

    def read_kv(self, weight: str, suffix: str) -> torch.Tensor:
        """An FP8 KV-cache scale as fp32 [], 1.0 where the checkpoint has none (vLLM's default)."""
        s = self.read_aux(weight, suffix)
        return torch.tensor(1.0) if s is None else s.to(torch.float32, copy=True).reshape(())

    def _dtype(self, e: Entry) -> str:
        return self._handle(e.file).get_slice(e.key).get_dtype()

    def _validate_quant(self, graph: Graph, formats: dict[str, str]) -> None:
        """Each quantized linear has every scale its format needs, with the right shape and dtype, and no
        scale belongs to anything else."""
        specs = {t.name: t for t in graph.params}
        for aname, found in self.aux.items():
            weight, suffix = aname.rsplit(":", 1)
            fmt = formats.get(weight)
            kv = suffix in ("k_scale", "v_scale")
            ok = (fmt is not None and suffix in dict(SCALES[fmt])) or (
                kv and self.quant is not None and self.quant.kv_cache_algo is not None
                and weight.endswith(f"mixer.{suffix[0]}_proj.weight"))
            if not ok:
                e = found[0]
                why = (f"'{weight}' is not quantized (excluded or not a linear)" if fmt is None and not kv else
                       f"{fmt or 'kv cache'} has no {suffix}")
                raise WeightsError(f"{e.file}: unexpected tensor '{e.key}' ({why})")
        for name, fmt in formats.items():
            spec = specs[name]
            stacked = self.entries[name][0].expert is not None
            rows = spec.shape[1:] if stacked else spec.shape  # [out, in]
            if fmt == "nvfp4" and rows[-1] % 16:
                raise WeightsError(f"{self.entries[name][0].file}: tensor '{self.entries[name][0].key}': NVFP4 "
                                   f"needs in_features divisible by 16, the config gives {rows[-1]}")
            want = {"weight_scale": ((rows[0], rows[1] // 16),) if fmt == "nvfp4" else PER_TENSOR,
                    "weight_scale_2": PER_TENSOR, "input_scale": PER_TENSOR}
            have_input = None
            for suffix, required in SCALES[fmt]:
                entries = self.aux.get(aux_name(name, suffix), [])
                if not entries:
                    if required:
                        e = self.entries[name][0]
                        raise WeightsError(f"{e.file}: tensor '{e.key}' is {fmt.upper()} but its "
                                           f"'{e.key.removesuffix('.weight')}.{suffix}' is missing")
                    have_input = False if suffix == "input_scale" else have_input
                    continue
                if stacked:
                    have = sorted(e.expert for e in entries if e.expert is not None)
                    if have != list(range(spec.shape[0])):
                        missing = sorted(set(range(spec.shape[0])) - set(have))
                        raise WeightsError(f"{entries[0].file}: tensor '{name}' ({fmt.upper()}): {suffix} of experts "
                                           f"{missing[:8]} missing")
                for e in entries:
                    shape, dt = self.file_shape(e), self._dtype(e)
                    if shape not in want[suffix]:
                        raise WeightsError(f"{e.file}: tensor '{e.key}' has shape {list(shape)}, expected "
                                           f"{list(want[suffix][0])}")
                    if dt != SCALE_DTYPES[suffix][fmt]:
                        raise WeightsError(f"{e.file}: tensor '{e.key}' is stored as {dt}, expected "
                                           f"{SCALE_DTYPES[suffix][fmt]}")
        for aname, found in self.aux.items():  # the FP8 KV cache's scales
            if aname.endswith((":k_scale", ":v_scale")):
                for e in found:
                    if self.file_shape(e) not in PER_TENSOR or self._dtype(e) != "F32":
                        raise WeightsError(f"{e.file}: tensor '{e.key}' must be an F32 per-tensor scale")

    def validate(self, graph: Graph) -> None:
        """Every tensor the graph reads is present with the right shape, and nothing else is."""
        expected = {t.name: t for t in graph.params}
        formats = self.formats(graph)
        for name, found in self.entries.items():
            if name not in expected:
                e = found[0]
                raise WeightsError(f"{e.file}: unexpected tensor '{e.key}' (no layer of this config reads it)")
        for name, spec in expected.items():
            entries = self.entries.get(name)
            if not entries:
                raise WeightsError(f"{self.dir}: missing tensor '{name}' ({list(spec.shape)})")
            kinds = {e.expert is None for e in entries}
            if len(kinds) > 1:
                raise WeightsError(f"{entries[0].file}: tensor '{name}' is given both stacked and per expert")
            stacked = entries[0].expert is not None
            if stacked:
                E = spec.shape[0]
                have = sorted(_expert_of(e) for e in entries)
                dup = sorted({x for x in have if have.count(x) > 1})
                if dup:
                    e = next(e for e in entries if e.expert == dup[0])
                    raise WeightsError(f"{e.file}: tensor '{name}': expert {dup[0]} appears twice")
                if have != list(range(E)):
                    missing = sorted(set(range(E)) - set(have))
                    what = f"missing experts {missing[:8]}" if missing else f"expert indices {have[-1]} out of range"
                    raise WeightsError(f"{entries[0].file}: tensor '{name}': {what} (config says {E} experts)")
                for e in entries:
                    want = _stored_shape(formats.get(name), spec.shape[1:])
                    if self.file_shape(e) != want:
                        raise WeightsError(f"{e.file}: tensor '{e.key}' has shape {list(self.file_shape(e))}, "
                                           f"expected {list(want)}")
            else:
                if len(entries) > 1:
                    raise WeightsError(f"{self.dir}: tensor '{name}' appears twice "
                                       f"({entries[0].key}, {entries[1].key})")
                shape = self.file_shape(entries[0])
                want = _stored_shape(formats.get(name), spec.shape)
                if shape != want:
                    raise WeightsError(f"{entries[0].file}: tensor '{entries[0].key}' has shape {list(shape)}, "
                                       f"expected {list(want)}")
            fmt = formats.get(name)
            for e in entries:
                dt = self._dtype(e)
                if fmt is not None:
                    if dt != QUANT_DTYPES[fmt]:
                        raise WeightsError(f"{e.file}: tensor '{e.key}' is stored as {dt}, expected "
                                           f"{QUANT_DTYPES[fmt]} ({fmt.upper()} per {self.quant_source()})")
                    continue
                if dt in QUANT_DTYPES.values() or dt.startswith("F8"):
                    why = ("the checkpoint declares no quantization" if self.quant is None else
                           f"{self.quant_source()} leaves it unquantized (exclude_modules, or not a linear)")
                    raise WeightsError(f"{e.file}: tensor '{e.key}' is stored as {dt}, but {why}")
                if dt not in FLOAT_DTYPES:
                    raise WeightsError(f"{e.file}: tensor '{e.key}' is stored as {dt}, expected a floating-point "
                                       f"dtype ({', '.join(sorted(FLOAT_DTYPES))}); quantized checkpoints are "
                                       "not supported")
        self._validate_quant(graph, formats)

    def quant_source(self) -> str:
        return self.quant.source if self.quant is not None else "(no quantization config)"

    def read(self, name: str) -> torch.Tensor:
        """The canonical tensor exactly as stored (experts stacked), without a cast.

        A read-only view of the file where possible: copy it before changing it.
        """
        entries = self.entries.get(name)
        if not entries:
            raise WeightsError(f"{self.dir}: missing tensor '{name}'")
        if entries[0].expert is None:
            return self._read(entries[0])
        return torch.stack([self._read(e) for e in sorted(entries, key=_expert_of)])

    def read_aux(self, name: str, suffix: str) -> torch.Tensor | None:
        """A quantized linear's scale as stored (experts stacked: per-tensor scales become [E]), or None."""
        entries = self.aux.get(aux_name(name, suffix))
        if not entries:
            return None
        if entries[0].expert is None:
            return self._read(entries[0])
        parts = [self._read(e) for e in sorted(entries, key=_expert_of)]
        return torch.stack([t.reshape(()) if suffix != "weight_scale" or t.dim() < 2 else t for t in parts])

    def stored(self, graph: Graph) -> dict[str, torch.Tensor]:
        """Every tensor of a quantized linear exactly as stored (codes and scales), by canonical name and
        aux_name; empty for an unquantized checkpoint."""
        out = {}
        for name in self.formats(graph):
            out[name] = self.read(name)
            for suffix in AUX_SUFFIXES:
                t = self.read_aux(name, suffix)
                if t is not None:
                    out[aux_name(name, suffix)] = t
        return out

    def dequantized(self, name: str, fmt: str) -> torch.Tensor:
        """Quantized weight `name` dequantized exactly, in fp64 (nemoh.oracle.ops)."""
        from nemoh.oracle.ops import dequant_fp8, dequant_nvfp4

        w, s = self.read(name), self.read_aux(name, "weight_scale")
        assert s is not None  # validate() requires it
        if fmt == "fp8":
            return dequant_fp8(w, s)
        s2 = self.read_aux(name, "weight_scale_2")
        assert s2 is not None
        return dequant_nvfp4(w, s, s2)

    def load(self, graph: Graph, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Validated tensors cast to the graph's storage dtypes (fp32 ones stay fp32).

        Quantized linears come dequantized (exactly, in fp64, then cast), and each one whose activations
        are quantized adds its input scale under `act_key(weight, format)`; an FP8 KV cache adds each attention
        layer's k/v scales under `kv_key(layer, 'k'|'v')`.
        Always copies: `read` returns views of the memory-mapped file, and a caller that changes a
        loaded tensor in place must not change what `read`/`mismatches` see as the file.
        """
        self.validate(graph)
        specs = {t.name: t for t in graph.params}
        formats = self.formats(graph)
        out = {}
        for name in names if names is not None else specs:
            fmt = formats.get(name)
            t = self.read(name) if fmt is None else self.dequantized(name, fmt)
            out[name] = t.to(dtypes.torch_dtype(specs[name].dtype), copy=True)
            inp = self.read_aux(name, "input_scale") if fmt is not None else None
            if inp is not None and fmt is not None:
                out[act_key(name, fmt)] = inp.to(torch.float32, copy=True)
        for key, (weight, suffix) in self.kv_scales(graph).items():  # the FP8 KV cache's scales
            if names is None or weight in out:
                out[key] = self.read_kv(weight, suffix)
        return out

    def mismatches(self, loaded: dict[str, torch.Tensor]) -> list[str]:
        """Names whose loaded tensor is not bit-equal to the file's tensor cast to the loaded dtype (a quantized
        linear: its exact dequantization, compared up to the sign of zero: `unsigned_zero`)."""
        bad = []
        formats = {n: f for n, f in self.quant_formats_by_name().items() if n in loaded}
        for name, t in loaded.items():
            ref = (self.read(name) if name not in formats else self.dequantized(name, formats[name])).to(t.dtype)
            t = t.detach().to("cpu")
            if name in formats:
                ref, t = unsigned_zero(ref), unsigned_zero(t)
            if ref.shape != t.shape or not torch.equal(bit_pattern(ref), bit_pattern(t)):
                bad.append(name)
        return bad


def unsigned_zero(t: torch.Tensor) -> torch.Tensor:
    """t with -0 as +0. A dequantized weight is a value: e2m1 has a -0 code (8), which nemoh's decoder keeps as
    -0.0 and ggml's NVFP4 table (int8 values, 0 for code 8) gives as +0.0; the same weight either way."""
    return torch.where(t == 0, torch.zeros_like(t), t)


def stored_mismatches(checkpoint: Checkpoint, graph: Graph, read) -> tuple[int, list[str]]:
    """(count, names not bit-equal): a quantized checkpoint's stored codes and scales (Checkpoint.stored) against
    what `read(name)` returns (a backend's read_stored)."""
    ref = checkpoint.stored(graph)
    bad = []
    for name, t in ref.items():
        held = read(name).detach().cpu()
        if held.shape != t.shape or held.dtype != t.dtype or not torch.equal(
                held.reshape(-1).view(torch.uint8), t.contiguous().reshape(-1).view(torch.uint8)):
            bad.append(name)
    return len(ref), bad


def bit_pattern(t: torch.Tensor) -> torch.Tensor:
    """An integer view, so -0.0 != 0.0 and NaN payloads compare by bits."""
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}
    return t.contiguous().view(ints[t.element_size()]) if t.is_floating_point() else t

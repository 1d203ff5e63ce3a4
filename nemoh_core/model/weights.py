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
        ignored = 0
        for key, f in sorted(found.items()):
            name, action, expert = canonical_name(key)
            if action == "ignore":
                ignored += 1
                continue
            if name is None:
                raise WeightsError(f"{f}: unexpected tensor '{key}' (not part of a Nemotron-H checkpoint)")
            self.entries.setdefault(name, []).append(Entry(f, key, expert))
        if ignored:
            self.notices.append(f"ignored {ignored} mtp.* tensors (the speculative multi-token head)")

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

    def validate(self, graph: Graph) -> None:
        """Every tensor the graph reads is present with the right shape, and nothing else is."""
        expected = {t.name: t for t in graph.params}
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
                    if self.file_shape(e) != spec.shape[1:]:
                        raise WeightsError(f"{e.file}: tensor '{e.key}' has shape {list(self.file_shape(e))}, "
                                           f"expected {list(spec.shape[1:])}")
            else:
                if len(entries) > 1:
                    raise WeightsError(f"{self.dir}: tensor '{name}' appears twice "
                                       f"({entries[0].key}, {entries[1].key})")
                shape = self.file_shape(entries[0])
                if shape != spec.shape:
                    raise WeightsError(f"{entries[0].file}: tensor '{entries[0].key}' has shape {list(shape)}, "
                                       f"expected {list(spec.shape)}")
            for e in entries:
                dt = self._handle(e.file).get_slice(e.key).get_dtype()
                if dt not in FLOAT_DTYPES:
                    raise WeightsError(f"{e.file}: tensor '{e.key}' is stored as {dt}, expected a floating-point "
                                       f"dtype ({', '.join(sorted(FLOAT_DTYPES))}); quantized checkpoints are "
                                       "not supported")

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

    def load(self, graph: Graph, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Validated tensors cast to the graph's storage dtypes (fp32 ones stay fp32).

        Always copies: `read` returns views of the memory-mapped file, and a caller that changes a
        loaded tensor in place must not change what `read`/`mismatches` see as the file.
        """
        self.validate(graph)
        specs = {t.name: t for t in graph.params}
        out = {}
        for name in names if names is not None else specs:
            t = self.read(name)
            out[name] = t.to(dtypes.torch_dtype(specs[name].dtype), copy=True)
        return out

    def mismatches(self, loaded: dict[str, torch.Tensor]) -> list[str]:
        """Names whose loaded tensor is not bit-equal to the file's tensor cast to the loaded dtype."""
        bad = []
        for name, t in loaded.items():
            ref = self.read(name).to(t.dtype)
            t = t.detach().to("cpu")
            if ref.shape != t.shape or not torch.equal(bit_pattern(ref), bit_pattern(t)):
                bad.append(name)
        return bad


def bit_pattern(t: torch.Tensor) -> torch.Tensor:
    """An integer view, so -0.0 != 0.0 and NaN payloads compare by bits."""
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}
    return t.contiguous().view(ints[t.element_size()]) if t.is_floating_point() else t

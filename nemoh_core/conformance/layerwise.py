"""Layer-wise conformance against an engine's own trace: record once, check anywhere, in parts.

`write_trace` runs a backend once (one prefill forward of a seeded random prompt) with tracing on and
writes what it traced to a folder: `trace.safetensors` (ids, `embeddings`, every `layers.{i}`, the final
`logits`, every op output the backend traced) and `manifest.json` (model, config and its fingerprint,
backend, dtype, shapes, seed, nemoh version, the tensors). Nothing is compared then, so the engine's run
and the fp64 oracle's checks can happen on different machines.

`check` runs the fp64 oracle on one layer at a time, on the engine's own input to it (`layers.{i-1}`,
or `embeddings` for layer 0), with the parameters streamed from the checkpoint (nemoh.oracle.stream: one
layer's fp64 weights in memory at a time), and judges the engine's `layers.{i}` against it. A layer's
error is the larger of two relative RMS errors (localise's metric, `layer_rel_rms`): its residual output,
and its mixer's output where the backend traced it (the residual alone dilutes a mixer's error by the
size of the stream). Each traced op is compared too, reported, and not judged on its own. The embedding
(oracle embedding of the ids) and the head (the oracle's norm_f + lm_head on the engine's final hidden
state, against the engine's logits, with the logits suite's metrics and the table's fixed floors) are
checked by the first and the last shard of a run over all layers.

Parts are independent: `--shard K/N` checks the K-th of N contiguous parts of the layer list, `merge`
joins shard reports into the report of one run over all of them, and `--ray` runs each part as a Ray
task that reads the weights and the trace from shared storage itself.

Why one file: the trace's writer and reader, the checks and the merge are the two sides of two formats
(the trace folder, the nemoh-layerwise/1 report); kept together, a field is added in one place.

Glossary: L layers, B batch, T tokens, D hidden size, V vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch

from nemoh import dtypes, oracle
from nemoh.conformance.memory import PeakSampler, peak_rss_bytes
from nemoh.conformance.tolerances import tol
from nemoh.errors import NemohError, did_you_mean
from nemoh.model.config import ModelConfig, load_config
from nemoh.model.ir import Graph, Layer, build_graph

SCHEMA = "nemoh-layerwise/1"
TRACE_SCHEMA = "nemoh-layerwise-trace/1"
TRACE_FILE, MANIFEST_FILE = "trace.safetensors", "manifest.json"
EXIT_OK, EXIT_FAIL, EXIT_NOTHING = 0, 1, 3
#: report fields that differ between runs of the same checks (merge's output is equal to a single run's
#: report except for these)
RUN_FIELDS = ("timing", "memory")
RAY_HINT = "pip install 'nemoh[ray]'"
Part = int | str  # a layer index, "embedding" or "head"


# ----------------------------------------------------------------------------------------------
# small helpers


def config_fingerprint(config: ModelConfig) -> str:
    """Short hash of a config's canonical form: a trace is checked only against the model it came from."""
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


def rel_rms(out: torch.Tensor, ref: torch.Tensor) -> float:
    """sqrt(sum (out - ref)^2 / sum ref^2) in fp64 (the absolute RMS sum when ref is all zeros)."""
    o, r = out.double(), ref.double()
    num, den = (o - r).pow(2).sum().item(), r.pow(2).sum().item()
    return math.sqrt(num / den) if den else math.sqrt(num)


def _num(x: float) -> float | None:
    """JSON has no NaN or inf: those are null, and the `*_repr` next to them says which."""
    return x if math.isfinite(x) else None


def _within(x: float, t: float) -> bool:
    return x <= t  # NaN fails


def parse_layers(spec: str | None, num_layers: int) -> list[int]:
    """'0-5,9' -> [0, 1, 2, 3, 4, 5, 9] (sorted, each once); None -> every layer."""
    if spec is None:
        return list(range(num_layers))
    out: set[int] = set()
    for item in (s.strip() for s in spec.split(",")):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise NemohError(f"--layers {spec!r}: expected layer indices and ranges such as 0-5,9, got {item!r}")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if lo > hi:
            raise NemohError(f"--layers {spec!r}: range {item} runs backwards")
        if hi >= num_layers:
            raise NemohError(f"--layers {spec!r}: layer {hi} does not exist; the model has {num_layers} layers "
                             f"(0-{num_layers - 1})")
        out.update(range(lo, hi + 1))
    return sorted(out)


def parse_shard(spec: str | None) -> tuple[int, int] | None:
    """'2/4' -> (2, 4): the 2nd of 4 parts (1-based)."""
    if spec is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not m:
        raise NemohError(f"--shard {spec!r}: expected K/N, e.g. 2/4 (the K-th of N parts, 1-based)")
    k, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 1 <= k <= n:
        raise NemohError(f"--shard {spec!r}: K must be between 1 and N, and N at least 1")
    return k, n


def shard_of(items: Sequence[int], shard: tuple[int, int] | None) -> list[int]:
    """The K-th of N contiguous, near-equal parts of `items` (sizes differ by at most one)."""
    if shard is None:
        return list(items)
    k, n = shard
    return list(items[(k - 1) * len(items) // n:k * len(items) // n])


def ranges(xs: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    out: list[str] = []
    for x in sorted(xs):
        if out and int(out[-1].split("-")[-1]) == x - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{x}"
        else:
            out.append(str(x))
    return ",".join(out)


# ----------------------------------------------------------------------------------------------
# the trace: written once by the engine's run


def _nemoh_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nemoh")
    except PackageNotFoundError:
        return "unknown"


def prompt(batch: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    """ids [B, T] in [4, V) from torch.Generator(seed): the low ids are often special tokens."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (batch, length), generator=g, dtype=torch.int64)


def write_trace(model: str | Path, backend: Any, dtype: str, out: str | Path, *, batch: int = 1, length: int = 128,
                seed: int = 0, device: str | None = None) -> dict[str, Any]:
    """Run `backend` (a registered name, a `package.module:factory`, or a Backend) once on a seeded prompt with
    tracing on, and write DIR/trace.safetensors and DIR/manifest.json. Returns the manifest."""
    from safetensors.torch import save_file

    from nemoh.output import atomic_write, check_output_dir
    from nemoh.runtime.session import check_generation, open_model

    if dtype not in dtypes.NAMES:
        raise NemohError(did_you_mean("dtype", dtype, dtypes.NAMES))
    if batch < 1 or length < 1:
        raise NemohError(f"--batch and --length must be at least 1, got {batch} and {length}")
    out = check_output_dir(out, "--out")
    m = open_model(model, backend, dtype, device)
    check_generation(m.config, length, 1)
    ids = prompt(batch, length, m.config.vocab_size, seed)
    tr: dict[str, torch.Tensor] = {}
    logits = m.session(batch).forward(ids, trace=tr)
    missing = [n for n in ("embeddings", *(f"layers.{l.index}" for l in m.graph.layers)) if n not in tr]
    if missing:
        raise NemohError(f"backend '{m.backend.name}' traced no {missing[0]} (nor {len(missing) - 1} more): a "
                         "layer-wise check needs `embeddings` and every `layers.{i}` in Backend.forward's trace")
    # own contiguous CPU copies: safetensors refuses tensors that share memory (layers.{i} is often
    # the same tensor as layers.{i}.residual)
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in tr.items()
               if isinstance(t, torch.Tensor)}
    tensors["ids"], tensors["logits"] = ids, logits.detach().to("cpu").contiguous().clone()
    trace_id = uuid.uuid4().hex
    manifest = {
        "schema": TRACE_SCHEMA, "trace_id": trace_id, "model": str(Path(m.path).resolve()), "model_arg": str(model),
        "config_fingerprint": config_fingerprint(m.config), "config": m.config.to_dict(),
        "num_layers": len(m.graph.layers), "layer_kinds": [l.kind for l in m.graph.layers],
        "backend": m.backend.name, "backend_info": json.loads(json.dumps(m.backend.describe(), default=str)),
        "dtype": dtype, "device": device, "batch": batch, "length": length, "seed": seed,
        "nemoh_version": _nemoh_version(),
        "tensors": {n: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                    for n, t in sorted(tensors.items())},
    }
    # the old manifest goes first: a run cut short leaves no manifest (never one naming another trace),
    # and the trace_id in both files ties them together
    tmp = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / MANIFEST_FILE).unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{TRACE_FILE}.", dir=out)
        os.close(fd)
        save_file(tensors, tmp, metadata={"schema": TRACE_SCHEMA, "trace_id": trace_id})
        os.replace(tmp, out / TRACE_FILE)
    except OSError as e:
        raise NemohError(f"{out / TRACE_FILE}: cannot write the trace ({e.strerror or e})") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    atomic_write(out / MANIFEST_FILE, json.dumps(manifest, indent=1, allow_nan=False) + "\n")
    return manifest


class Trace:
    """A trace folder, read lazily: only the tensors a check asks for are loaded."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        d = Path(directory)
        if not d.is_dir():
            raise NemohError(f"--trace {d}: no such directory (make one with `nemoh layerwise trace`)")
        mpath, tpath = d / MANIFEST_FILE, d / TRACE_FILE
        if not mpath.is_file():
            raise NemohError(f"{mpath}: missing; {d} is not a finished trace (make one with `nemoh layerwise trace`)")
        if not tpath.is_file():
            raise NemohError(f"{tpath}: missing; the trace folder {d} is incomplete")
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise NemohError(f"{mpath}: not readable JSON ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("schema") != TRACE_SCHEMA:
            raise NemohError(f"{mpath}: not a layer-wise trace manifest (expected schema {TRACE_SCHEMA})")
        try:
            self._f = safe_open(str(tpath), framework="pt")
            meta = self._f.metadata() or {}
            self.names = set(self._f.keys())
        except Exception as e:  # safetensors raises its own error type for a damaged header
            raise NemohError(f"{tpath}: not a readable safetensors file ({str(e).splitlines()[0] if str(e) else e})"
                             ) from None
        if meta.get("trace_id") != manifest.get("trace_id"):
            raise NemohError(f"{tpath} and {mpath} are of different runs (trace_id {meta.get('trace_id')} vs "
                             f"{manifest.get('trace_id')}); trace again")
        self.dir, self.manifest = d, manifest

    def get(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise NemohError(f"{self.dir / TRACE_FILE}: has no tensor {name!r}")
        return self._f.get_tensor(name)

    def check_model(self, config: ModelConfig, model: str) -> None:
        """Refuse a trace made from another model, and one that lacks the tensors every check needs."""
        fp = config_fingerprint(config)
        if self.manifest.get("config_fingerprint") != fp:
            raise NemohError(f"--trace {self.dir} was made from {self.manifest.get('model')} (config fingerprint "
                             f"{self.manifest.get('config_fingerprint')}), not from --model {model} (config "
                             f"fingerprint {fp})")
        need = ["ids", "embeddings", "logits", *(f"layers.{i}" for i in range(config.num_layers))]
        missing = [n for n in need if n not in self.names]
        if missing:
            raise NemohError(f"{self.dir / TRACE_FILE}: has no tensor {missing[0]!r}"
                             + (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else ""))


# ----------------------------------------------------------------------------------------------
# the checks: one part (embedding, a layer, the head) at a time


class Checker:
    """The fp64 oracle, streamed from the checkpoint, checking the parts of one trace."""

    def __init__(self, model: str | Path, trace: str | Path):
        from nemoh.model.presets import resolve_model
        from nemoh.model.weights import Checkpoint
        from nemoh.oracle.stream import StreamedParams

        self.path = resolve_model(str(model))
        self.config = load_config(self.path)
        self.trace = Trace(trace)
        self.trace.check_model(self.config, str(model))
        self.dtype = str(self.trace.manifest.get("dtype"))
        t = tol("layer_rel_rms", self.dtype)
        if t is None:  # every dtype an executor runs at has a row: a missing one is a table bug
            raise ValueError(f"the tolerance table has no layer_rel_rms row for {self.dtype}")
        self.t_layer = t
        self.g64: Graph = build_graph(self.config, "float64")
        self.params = StreamedParams(Checkpoint(self.path), self.g64)
        self.ids = self.trace.get("ids")
        self.mask = torch.ones_like(self.ids, dtype=torch.bool)  # one prefill of real tokens: no padding

    def run(self, part: Part) -> dict[str, Any]:
        try:
            if part == "embedding":
                return self.embedding()
            if part == "head":
                return self.head()
            return self.layer(int(part))
        finally:
            self.params.release()  # this part's fp64 weights go before the next part's come

    def _block(self, block: Layer, vals: dict[str, torch.Tensor], trace: dict | None = None) -> dict:
        # run_block reads params only by name: the streamed Mapping stands in for the dict it is annotated with
        params = cast("dict[str, torch.Tensor]", self.params)
        return oracle.run_block(block, vals, params, oracle.OracleState(), self.mask, self.mask, trace=trace)

    def embedding(self) -> dict[str, Any]:
        ref = self._block(self.g64.embed, {"ids": self.ids})["x"]
        e = rel_rms(self.trace.get("embeddings"), ref)
        return {"status": "OK" if _within(e, self.t_layer) else "FAIL", "metric": "layer_rel_rms",
                "error": _num(e), "error_repr": f"{e:.3g}", "tolerance": self.t_layer}

    def layer(self, i: int) -> dict[str, Any]:
        layer = self.g64.layers[i]
        x_in = self.trace.get("embeddings" if i == 0 else f"layers.{i - 1}")  # [B, T, D]: the engine's own
        ot: dict[str, torch.Tensor] = {}
        self._block(layer, {"x": x_in.double()}, trace=ot)
        out_err = rel_rms(self.trace.get(f"layers.{i}"), ot[f"layers.{i}"])
        ops: list[dict[str, Any]] = []
        raw: dict[str, float] = {}  # op name -> its error, for the ops comparable with the oracle's
        for op in layer.ops:
            if op.name not in self.trace.names or op.name not in ot:
                continue
            a, b = self.trace.get(op.name), ot[op.name]
            if a.numel() != b.numel():  # the backend traced something else under this name: shown, not judged
                ops.append({"op": op.name, "kind": op.kind, "error": None, "error_repr": "shape "
                            f"{list(a.shape)} vs the oracle's {list(b.shape)}", "ok": None})
                continue
            raw[op.name] = e = rel_rms(a.reshape(b.shape), b)  # [M, ...] traces are viewed as [B, T, ...]
            ops.append({"op": op.name, "kind": op.kind, "error": _num(e), "error_repr": f"{e:.3g}",
                        "ok": _within(e, self.t_layer)})
        mixer = layer.ops[-2].name  # the op feeding the residual add
        mix_err = raw.get(mixer)
        err = out_err if mix_err is None else max(out_err, mix_err, key=lambda v: math.inf if math.isnan(v) else v)
        first = next((o for o in ops if o["ok"] is False), None)
        worst = max((o for o in ops if o["op"] in raw), key=lambda o: math.inf if math.isnan(raw[o["op"]])
                    else raw[o["op"]], default=None)
        return {"layer": i, "kind": layer.kind, "status": "OK" if _within(err, self.t_layer) else "FAIL",
                "metric": "layer_rel_rms", "error": _num(err), "error_repr": f"{err:.3g}", "tolerance": self.t_layer,
                "output_error": _num(out_err), "mixer_op": mixer if mix_err is not None else None,
                "mixer_error": None if mix_err is None else _num(mix_err),
                "worst_op": None if worst is None else {k: worst[k] for k in ("op", "kind", "error", "error_repr")},
                "first_op_out_of_tolerance": None if first is None else first["op"], "ops": ops}

    def head(self) -> dict[str, Any]:
        from nemoh.conformance.case import logit_metrics

        L = len(self.g64.layers)
        x = self.trace.get(f"layers.{L - 1}")  # [B, T, D]: the engine's final hidden state
        ref = self._block(self.g64.head, {"x": x.double()})["logits"]
        # the logits suite's metrics; no transformers baseline here, so the table's fixed floors judge
        ms, details = logit_metrics(self.trace.get("logits"), ref, self.dtype, "vs oracle head")
        bad = [m.name for m in ms if not m.ok]
        return {"status": "FAIL" if bad else "OK", "metrics": [m.to_json() for m in ms], "failed_metrics": bad,
                "worst_position": details["worst_position"],
                "worst_position_max_abs": _num(float(details["worst_position_max_abs"]))}


def check_part(model: str, trace: str, part: Part) -> dict[str, Any]:
    """One part checked from scratch (a Ray task's body): returns {"part", "result", "seconds",
    "peak_rss_bytes", "param_peak_bytes"}."""
    t0 = time.perf_counter()
    c = Checker(model, trace)
    return _checked(c, part, t0)


def _checked(c: Checker, part: Part, t0: float) -> dict[str, Any]:
    result = c.run(part)
    return {"part": part, "result": result, "seconds": time.perf_counter() - t0, "peak_rss_bytes": peak_rss_bytes(),
            "param_peak_bytes": c.params.peak_bytes}


# ----------------------------------------------------------------------------------------------
# a run: which parts, where, and the report


def plan(num_layers: int, layers: str | None, shard: tuple[int, int] | None) -> tuple[list[int], list[Part]]:
    """(the layers asked for, the parts this run checks). The embedding goes with the first shard and the
    head with the last, of a run over every layer (`--layers` not given)."""
    requested = parse_layers(layers, num_layers)
    parts: list[Part] = list(shard_of(requested, shard))
    if layers is None:
        k, n = shard or (1, 1)
        parts = (["embedding"] if k == 1 else []) + parts + (["head"] if k == n else [])
    return requested, parts


def _run_local(model: str, trace: str, parts: list[Part], progress: Any = None) -> list[dict[str, Any]]:
    c = Checker(model, trace)
    out = []
    for p in parts:
        out.append(_checked(c, p, time.perf_counter()))
        if progress is not None:
            progress(out[-1])
    return out


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise NemohError(f"--ray needs Ray, which is not installed: {RAY_HINT}") from None
    return ray


def _run_ray(address: str, model: str, trace: str, parts: list[Part]) -> list[dict[str, Any]]:
    """Each part a Ray task reading the weights and the trace from shared storage itself; gathered with ray.get."""
    ray = _import_ray()
    started = False
    if not ray.is_initialized():
        try:
            if address == "local":
                ray.init(include_dashboard=False)
            else:
                ray.init(address=address)
        except (ConnectionError, RuntimeError, ValueError) as e:  # what ray.init raises for a bad or dead address
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise NemohError(f"--ray {address}: cannot start or reach a Ray cluster ({msg})") from None
        started = True
    try:
        task = ray.remote(check_part)
        return list(ray.get([task.remote(model, trace, p) for p in parts]))
    finally:
        if started:
            ray.shutdown()


def run_check(model: str, trace: str | Path, *, layers: str | None = None, shard: str | None = None,
              ray: str | None = None, progress: Any = None) -> dict[str, Any]:
    """Check a trace's parts (the selected layers of this shard, and the embedding and head where they
    belong) and return the report (schema nemoh-layerwise/1)."""
    from nemoh.model.presets import resolve_model

    t0 = time.perf_counter()
    path = resolve_model(str(model))
    config = load_config(path)
    tr = Trace(trace)
    tr.check_model(config, str(model))
    sh = parse_shard(shard)
    requested, parts = plan(config.num_layers, layers, sh)
    model_s, trace_s = str(path.resolve()), str(Path(trace).resolve())
    sampler = PeakSampler()
    done = (_run_ray(ray, model_s, trace_s, parts) if ray is not None and parts
            else _run_local(model_s, trace_s, parts, progress) if parts else [])
    results = {str(d["part"]): d["result"] for d in done}
    timing = {"seconds": time.perf_counter() - t0, "executor": "ray" if ray is not None else "process",
              "parts": {str(d["part"]): d["seconds"] for d in done}}
    # this process's allocations (Ray tasks run elsewhere: their ru_maxrss is in peak_rss_bytes); ru_maxrss also
    # counts the pages of the memory-mapped checkpoint, which the kernel takes back under pressure
    memory = {"peak_rss_bytes": max([peak_rss_bytes(), *(d["peak_rss_bytes"] for d in done)]),
              "peak_anon_bytes": sampler.stop()["measured_peak_anon_bytes"],
              "oracle_param_peak_bytes": max((d["param_peak_bytes"] for d in done), default=0)}
    return build_report(tr.manifest, layers, requested, sh, results, timing, memory)


def build_report(manifest: dict[str, Any], layers: str | None, requested: list[int], shard: tuple[int, int] | None,
                 results: dict[str, dict[str, Any]], timing: dict[str, Any], memory: dict[str, Any]) -> dict[str, Any]:
    """The report from the parts' results (keyed "embedding", "head", or the layer index as text): a
    single run and a merge of shards build it the same way."""
    checked = sorted(int(k) for k in results if k not in ("embedding", "head"))
    per_layer = [results[str(i)] for i in checked]
    emb, head = results.get("embedding"), results.get("head")
    all_parts = [*per_layer, *(r for r in (emb, head) if r is not None)]
    failed = [r["layer"] for r in per_layer if r["status"] != "OK"]
    missing = sorted(set(requested) - set(checked))
    n = len(all_parts)
    # a run over all of its selection that lacks some of it (a merge without one shard's report) is not a
    # pass: the layers nobody checked are not known to be right
    incomplete = shard is None and bool(missing or (layers is None and (emb is None or head is None)))
    code = (EXIT_NOTHING if n == 0 else EXIT_FAIL if incomplete or any(r["status"] != "OK" for r in all_parts)
            else EXIT_OK)
    return {
        "schema": SCHEMA,
        "manifest": manifest,
        "dtype": manifest.get("dtype"),
        "tolerances": {"layer_rel_rms": tol("layer_rel_rms", str(manifest.get("dtype"))),
                       "head": "the logits suite's metrics at this dtype, judged against the table's fixed floors"},
        "selection": {"layers": layers, "layers_requested": requested,
                      "shard": None if shard is None else {"k": shard[0], "n": shard[1]}},
        "layers_checked": checked,
        "missing_layers": missing if shard is None else [],
        "embedding": emb,
        "layers": per_layer,
        "head": head,
        "summary": {"checked": n, "failed": sum(r["status"] != "OK" for r in all_parts), "failed_layers": failed,
                    "first_failing_layer": failed[0] if failed else None,
                    "embedding": None if emb is None else emb["status"],
                    "head": None if head is None else head["status"],
                    "complete": not incomplete},
        "exit_code": code,
        "timing": timing,
        "memory": memory,
    }


# ----------------------------------------------------------------------------------------------
# merging shard reports


def _load_report(path: Path) -> dict[str, Any]:
    try:
        r = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise NemohError(f"{path}: no such report") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NemohError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(r, dict) or r.get("schema") != SCHEMA:
        raise NemohError(f"{path}: not a layer-wise report (expected schema {SCHEMA}, got "
                         f"{r.get('schema') if isinstance(r, dict) else type(r).__name__!r})")
    for key in ("manifest", "selection", "layers", "timing", "memory"):
        if key not in r:
            raise NemohError(f"{path}: a truncated or hand-edited layer-wise report (no {key!r})")
    return r


def merge(paths: Sequence[Path]) -> dict[str, Any]:
    """Shard reports of one trace -> the report of one run over all their parts. Refuses (NemohError)
    reports of different traces or selections, and parts checked twice."""
    if not paths:
        raise NemohError("merge needs at least one report")
    reports = [(Path(p), _load_report(Path(p))) for p in paths]
    p0, r0 = reports[0]
    owner: dict[str, Path] = {}
    results: dict[str, dict[str, Any]] = {}
    for p, r in reports:
        if r["manifest"].get("trace_id") != r0["manifest"].get("trace_id") or r["manifest"] != r0["manifest"]:
            raise NemohError(f"{p} and {p0} are reports of different traces (trace_id "
                             f"{r['manifest'].get('trace_id')} vs {r0['manifest'].get('trace_id')})")
        if r["selection"].get("layers") != r0["selection"].get("layers"):
            raise NemohError(f"{p} and {p0} check different selections (--layers {r['selection'].get('layers')} "
                             f"vs {r0['selection'].get('layers')}); merge shards of one selection")
        parts = {**{str(l["layer"]): l for l in r["layers"]},
                 **{k: r[k] for k in ("embedding", "head") if r.get(k) is not None}}
        twice = [k for k in parts if k in owner]
        if twice:
            nums = [int(k) for k in twice if k.isdigit()]
            what = " and ".join(([f"layer{'s' if len(nums) > 1 else ''} {ranges(nums)}"] if nums else [])
                                + [f"the {k}" for k in twice if not k.isdigit()])
            raise NemohError(f"{p} and {owner[twice[0]]} overlap: both checked {what}")
        for k, v in parts.items():
            owner[k] = p
            results[k] = v
    sel = r0["selection"]
    timing = {"seconds": sum(float(r["timing"].get("seconds") or 0.0) for _, r in reports),
              "executor": "merged", "shards": [{"report": str(p), **r["timing"]} for p, r in reports]}
    memory = {"peak_rss_bytes": max(int(r["memory"].get("peak_rss_bytes") or 0) for _, r in reports),
              "peak_anon_bytes": max(int(r["memory"].get("peak_anon_bytes") or 0) for _, r in reports),
              "oracle_param_peak_bytes": max(int(r["memory"].get("oracle_param_peak_bytes") or 0) for _, r in reports)}
    return build_report(r0["manifest"], sel.get("layers"), list(sel.get("layers_requested") or []), None, results,
                        timing, memory)


def missing_note(report: dict[str, Any]) -> str | None:
    """What a merged report lacks of its selection, in one line (None when complete)."""
    if report["selection"].get("shard") is not None:
        return None  # one shard of several: the rest is the other shards'
    miss = list(report["missing_layers"])
    if report["selection"].get("layers") is None:
        miss_parts = [k for k in ("embedding", "head") if report.get(k) is None]
    else:
        miss_parts = []
    if not miss and not miss_parts:
        return None
    what = ([f"layers {ranges(miss)}"] if miss else []) + [f"the {k} check" for k in miss_parts]
    return f"incomplete: {' and '.join(what)} missing (a shard's report not given?)"

"""Running the conformance suites: backends x dtypes x suites -> one JSON-ready report.

The report holds the model (and its resolved config), the environment (package versions, device,
git commit, seeds, command line), the known reference deviations measured on this model, and every
case with its status, metrics and tolerances. nemoh.reports renders it; nothing is computed there.
"""

from __future__ import annotations

import functools
import math
import importlib.metadata
import platform
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import oracle
from .config import ModelConfig, load_config
from .errors import NemohError, did_you_mean
from .harness import Case, Result, Status, Suite
from .ir import Graph, build_graph
from .registry import get_backend
from .runtime import Model, Session, open_model
from .tolerances import TOLERANCES, tol
from .weights import Checkpoint

SCHEMA = "nemoh-conformance/1"


def _deviations_path() -> Path:
    from importlib.resources import files

    p = files("nemoh.suites") / "known_deviations.toml"
    return Path(str(p))


def load_deviations() -> list[dict[str, Any]]:
    with open(_deviations_path(), "rb") as f:
        return tomllib.load(f)["deviation"]


class Reference:
    """The references shared by every backend and dtype of one run: the fp64 oracle and transformers."""

    def __init__(self, path: Path, config: ModelConfig):
        self.path, self.config = path, config
        self.graph64 = build_graph(config, "float64")
        self._params: dict[str, torch.Tensor] | None = None
        self._hf: dict[tuple[str, bool], Any] = {}
        self.hf_unavailable = ""
        try:
            import transformers  # noqa: F401
        except ImportError:
            self.hf_unavailable = "transformers is not installed (pip install 'nemoh[ref]')"

    @property
    def params(self) -> dict[str, torch.Tensor]:
        if self._params is None:
            self._params = Checkpoint(self.path).load(self.graph64)
        return self._params

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one Reference per run
    def _oracle(self, key: bytes, shape: tuple[int, ...]) -> torch.Tensor:
        ids = torch.frombuffer(bytearray(key), dtype=torch.int64).reshape(shape)
        return oracle.run(self.graph64, self.params, ids)

    def oracle_logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self._oracle(ids.contiguous().numpy().tobytes(), tuple(ids.shape))

    def hf(self, dtype: str, intended: bool = True):
        if self.hf_unavailable:
            return None
        if (dtype, intended) not in self._hf:
            from .reference import load_reference

            self._hf[(dtype, intended)] = load_reference(self.path, dtype, intended=intended)
        return self._hf[(dtype, intended)]


@dataclass
class Ctx:
    """What a suite sees: one backend at one dtype on one model, and the shared references."""

    config: ModelConfig
    graph: Graph
    dtype: str
    model: Model
    ref: Reference
    _prompts: dict = field(default_factory=dict)

    @property
    def hf_unavailable(self) -> str:
        return self.ref.hf_unavailable

    def prompt(self, batch: int, length: int, seed: int) -> torch.Tensor:
        """Deterministic token ids in [4, V): no special tokens."""
        key = (batch, length, seed)
        if key not in self._prompts:
            g = torch.Generator().manual_seed(seed)
            self._prompts[key] = torch.randint(min(4, self.config.vocab_size - 1), self.config.vocab_size,
                                               (batch, length), generator=g)
        return self._prompts[key]

    def session(self, batch: int) -> Session:
        return self.model.session(batch)

    def export_state(self, s: Session) -> dict[str, torch.Tensor]:
        return self.model.backend.export_state(s.state)

    def oracle_logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.ref.oracle_logits(ids)

    @torch.inference_mode()
    def hf_logits(self, ids: torch.Tensor, dtype: str, mask: torch.Tensor | None = None) -> torch.Tensor | None:
        hf = self.ref.hf(dtype)
        return None if hf is None else hf(input_ids=ids, attention_mask=mask).logits.float()

    @torch.inference_mode()
    def hf_generate(self, ids: torch.Tensor, n: int):
        hf = self.ref.hf("float32")
        if hf is None:
            return None
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True,
                          output_logits=True)
        return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, dim=1).float()


# ----------------------------------------------------------------------------------------------
# Localisation
# ----------------------------------------------------------------------------------------------

def _sq(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(sum (a-b)^2, sum b^2) in fp64: summed over calls, then rel RMS = sqrt(num / den)."""
    a, b = a.double(), b.double()
    return (a - b).pow(2).sum().item(), b.pow(2).sum().item()


def _rel(num: float, den: float) -> float:
    return math.sqrt(num / den) if den else math.sqrt(num)


def _at_real(t: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Rows of `t` at the real (unpadded) positions; [M, ...] tensors are viewed as [B, T, ...]."""
    B, T = real.shape
    if t.shape[:2] != (B, T) and t.shape[0] == B * T:
        t = t.reshape(B, T, *t.shape[1:])
    return t[real]


def localise(ctx: Ctx, forwards: list[tuple[torch.Tensor, torch.Tensor | None]]) -> dict[str, Any]:
    """Replay `forwards` with traces and name the first layer, then op, that leaves tolerance.

    Each layer is checked in isolation: the fp64 oracle runs that layer on the executor's own input
    to it (and on carried state it built the same way), so an error is charged to the layer that
    makes it, not to every layer after it. Errors are relative RMS over every real position of
    every call (a single decode token is too few to judge at bf16); the call where a layer's error
    was largest is reported with it.
    """
    be, g64, params = ctx.model.backend, ctx.ref.graph64, ctx.ref.params
    t_layer = tol("layer_rel_rms", ctx.dtype)
    B = forwards[0][0].shape[0]
    st_b, st_o = be.new_state(B), oracle.OracleState()
    acc: dict[str, list[float]] = {}  # op or layer name -> [num, den]
    worst_call: dict[str, tuple[float, int]] = {}
    first_bad: dict[str, int] = {}  # name -> first call where its own error left tolerance
    op_meta: dict[str, tuple[int, str, str]] = {}  # op name -> (layer index, layer kind, op kind)

    def add(name: str, a: torch.Tensor, b: torch.Tensor, call: int) -> None:
        num, den = _sq(a, b)
        cur = acc.setdefault(name, [0.0, 0.0])
        cur[0] += num
        cur[1] += den
        e = _rel(num, den)
        if name not in worst_call or not e <= worst_call[name][0]:
            worst_call[name] = (e, call)
        if not e <= t_layer and name not in first_bad:
            first_bad[name] = call

    for call, (ids, mask) in enumerate(forwards):
        tr: dict[str, torch.Tensor] = {}
        be.forward(st_b, ids, mask, trace=tr)
        if "embeddings" not in tr or not any(k.startswith("layers.") for k in tr):
            return {"available": False, "reason": f"backend '{be.name}' returns no trace (see Backend.forward)"}
        m = torch.ones_like(ids, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
        key_mask = m if st_o.mask is None else torch.cat([st_o.mask.bool(), m], dim=1)
        x = tr["embeddings"]
        for layer in g64.layers:
            ot: dict[str, torch.Tensor] = {}
            oracle.run_block(layer, {"x": x.double()}, params, st_o, m, key_mask, trace=ot)
            for op in layer.ops:
                if op.name in tr and op.name in ot:
                    a, b = _at_real(tr[op.name], m), _at_real(ot[op.name], m)
                    if a.shape == b.shape:
                        op_meta[op.name] = (layer.index, layer.kind, op.kind)
                        add(op.name, a, b, call)
            x = tr[f"layers.{layer.index}"]
        st_o.mask = key_mask

    layers = []
    for layer in g64.layers:
        mixer_out = layer.ops[-2].name  # the op feeding the residual add
        if mixer_out not in acc:
            continue
        err = _rel(*acc[mixer_out])
        layers.append({"layer": layer.index, "kind": layer.kind, "error": err, "worst_call": worst_call[mixer_out][1]})
    culprit = next((l for l in layers if not l["error"] <= t_layer), None)  # NaN fails too
    out: dict[str, Any] = {"available": True, "found": culprit is not None, "calls": len(forwards),
                           "tolerance": t_layer, "metric": "layer_rel_rms", "layers": layers}
    if culprit is None:
        out["message"] = ("every layer is within tolerance when checked in isolation; the error is in the "
                          "embedding or the head, or builds up from within-tolerance differences")
        return out
    ops = [{"op": n, "kind": k, "error": _rel(*acc[n]), "worst_call": worst_call[n][1],
            "first_call_out_of_tolerance": first_bad.get(n)}
           for n, (li, _, k) in op_meta.items() if li == culprit["layer"]]
    first = next((o for o in ops if not o["error"] <= t_layer), None) or ops[-1]
    call = first["first_call_out_of_tolerance"]
    call = first["worst_call"] if call is None else call
    out.update(layer=culprit["layer"], kind=culprit["kind"], error=culprit["error"], op=first["op"],
               op_kind=first["kind"], call=call, call_tokens=int(forwards[call][0].shape[1]), ops=ops)
    return out


# ----------------------------------------------------------------------------------------------
# Known deviations: measured on this model
# ----------------------------------------------------------------------------------------------

def probe_deviations(ref: Reference, prompt: torch.Tensor) -> list[dict[str, Any]]:
    from . import deviations

    out = []
    for d in load_deviations():
        entry = {k: d[k] for k in ("id", "title", "reference", "description", "evidence", "treatment")}
        try:
            entry["measured"] = getattr(deviations, d["probe"])(ref, prompt)
            entry["status"] = "measured"
        except deviations.Unavailable as e:
            entry["measured"], entry["status"] = {}, f"not measured: {e}"
        out.append(entry)
    return out


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

def environment(argv: list[str] | None, seeds: dict[str, Any]) -> dict[str, Any]:
    pkgs = {}
    for name in ("nemoh", "torch", "transformers", "safetensors", "tokenizers", "numpy", "onnx", "onnxruntime",
                 "onnxruntime-gpu", "cupy-cuda12x", "lm-eval", "hypothesis"):
        try:
            pkgs[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    commit = None
    try:
        root = Path(__file__).resolve().parent.parent
        res = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        if res.returncode == 0:
            commit = res.stdout.strip()
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True,
                                   text=True, timeout=5).stdout.strip()
            commit += "+dirty" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        pass
    return {"python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine(),
            "cpu_count": __import__("os").cpu_count(), "cuda_available": torch.cuda.is_available(),
            "packages": pkgs, "git_commit": commit, "command_line": argv if argv is not None else sys.argv,
            "seeds": seeds, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def select_suites(names: list[str] | None) -> list[Suite]:
    from nemoh.suites import all_suites

    suites = all_suites()
    if not names:
        return list(suites.values())
    out = []
    for n in names:
        if n not in suites:
            raise NemohError(did_you_mean("suite", n, suites))
        out.append(suites[n])
    return out


def run_conformance(model: str, backends: list[str], dtypes: list[str], suites: list[str] | None = None, *,
                    argv: list[str] | None = None, progress: bool = True, device: str | None = None,
                    deviations: bool = True, on_result=None) -> dict[str, Any]:
    from .presets import resolve_model

    path = resolve_model(model)
    config = load_config(path)
    chosen = select_suites(suites)
    instances = [(spec, get_backend(spec)) for spec in backends]  # unknown names fail before any work
    ref = Reference(path, config)
    g32 = build_graph(config, "float32")
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "model": {"name": model, "path": str(path), "config": config.to_dict(), "pattern": config.pattern,
                  "params_total": g32.params_total},
        "environment": environment(argv, {"prompts": "torch.Generator(seed) per case; see each case's seed"}),
        "tolerances": [{"metric": m, "dtype": d, "value": t.value, "reason": t.reason}
                       for (m, d), t in sorted(TOLERANCES.items())],
        "suites": [{"name": s.name, "doc": (s.doc or "").strip()} for s in chosen],
        "runs": [],
    }
    probe_ctx_prompt = torch.randint(4, config.vocab_size, (2, config.chunk_size + 37),
                                     generator=torch.Generator().manual_seed(config.chunk_size + 37))
    report["deviations"] = probe_deviations(ref, probe_ctx_prompt) if deviations else []

    shape_ctx = [_ShapeCtx(config, build_graph(config, dt), dt) for dt in dtypes]
    total = len(instances) * sum(len(s.cases(c)) for s in chosen for c in shape_ctx)
    bar = _progress(progress, total)
    for spec, be in instances:
        for dtype in dtypes:
            run = {"backend": be.name, "spec": spec, "dtype": dtype, "describe": {}, "results": []}
            report["runs"].append(run)
            graph = build_graph(config, dtype)
            unsupported = _unsupported(be, graph, dtype)
            model_obj, ctx = None, None
            if not unsupported:
                try:
                    be_fresh = get_backend(spec)
                    model_obj = open_model(path, be_fresh, dtype, device)
                    run["describe"] = model_obj.backend.describe()
                    ctx = Ctx(config, graph, dtype, model_obj, ref)
                except NemohError:
                    raise
                except Exception as e:  # a backend that cannot load is a failing backend
                    unsupported = None
                    run["load_error"] = f"{type(e).__name__}: {e}"
            for suite in chosen:
                case_list = suite.cases(ctx) if ctx else suite.cases(_ShapeCtx(config, graph, dtype))
                for case in case_list:
                    bar.set_description(f"{be.name}/{dtype} {case.id}"[:70])
                    if unsupported:
                        res = Result(case, Status.NOT_SUPPORTED, message=unsupported)
                    elif ctx is None:
                        res = Result(case, Status.FAIL, message=f"backend failed to load: {run['load_error']}")
                    else:
                        res = _run_case(suite, case, ctx)
                    run["results"].append(res.to_json())
                    if on_result:
                        on_result(run, res)
                    bar.update(1)
    bar.close()
    report["summary"] = summarize(report)
    return report


class _ShapeCtx:
    """Enough of a Ctx for suites to list their cases when the backend can't run."""

    def __init__(self, config, graph, dtype):
        self.config, self.graph, self.dtype = config, graph, dtype


def _unsupported(be, graph: Graph, dtype: str) -> str:
    ok = be.available()
    if not ok.ok:
        return f"backend '{be.name}' is not available: {ok.reason}"
    kinds = sorted({op.kind for b in graph.blocks for op in b.ops})
    missing = [(k, be.supports(k, dtype)) for k in kinds]
    missing = [f"{k}: {s.reason}" for k, s in missing if not s.ok]
    return f"backend '{be.name}' does not support at {dtype}: " + "; ".join(missing) if missing else ""


def _run_case(suite: Suite, case: Case, ctx: Ctx) -> Result:
    t0 = time.perf_counter()
    try:
        res = suite.run(case, ctx)
    except NemohError:
        raise
    except Exception as e:
        first_line = str(e).splitlines()[0] if str(e) else ""
        res = Result(case, Status.FAIL, message=f"backend raised {type(e).__name__}: {first_line}",
                     details={"exception": type(e).__name__})
    if res.status is Status.FAIL and suite.scenario is not None:
        try:
            res.localisation = localise(ctx, suite.scenario(res, ctx))
        except Exception as e:
            res.localisation = {"available": False,
                                "reason": f"localisation itself failed: {type(e).__name__}: {e}"}
    res.duration_s = time.perf_counter() - t0
    return res


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    counts = {s.value: 0 for s in Status}
    matrix: dict[str, dict[str, str]] = {}
    for run in report["runs"]:
        key = f"{run['spec']}/{run['dtype']}"
        row = matrix.setdefault(key, {})
        for r in run["results"]:
            counts[r["status"]] += 1
            cur = row.get(r["suite"])
            row[r["suite"]] = _worse(cur, r["status"])
    return {"counts": counts, "matrix": matrix, "passed": counts["FAIL"] == 0,
            "exit_code": 1 if counts["FAIL"] else 0}


_RANK = {"OK": 0, "SKIPPED": 1, "NOT_SUPPORTED": 2, "FAIL": 3}


def _worse(a: str | None, b: str) -> str:
    return b if a is None or _RANK[b] > _RANK[a] else a


def _progress(enabled: bool, total: int):
    try:
        from tqdm import tqdm
    except ImportError:  # progress is a nicety, never a failure
        tqdm = None
    if tqdm is None or not enabled:
        class _Null:
            def set_description(self, *_): ...
            def update(self, *_): ...
            def close(self): ...
        return _Null()
    return tqdm(total=total, unit="case", file=sys.stderr, leave=False, disable=None)


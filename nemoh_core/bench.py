"""nemoh-bench: throughput, latency and memory of Nemotron-H executors, against the reference and
against the hardware limit, with a correctness gate next to every speed number.

    nemoh-bench --backend torch --model cpu-small --prompt-lengths 512 2048 --context-depths 128 2048 \\
                --json out.json --html out.html

What one run does (every selected backend, and the transformers reference `hf`, on the same inputs):
  prefill   at each prompt length T: a fresh state, one forward over the T tokens; the time to
            first token (TTFT) is that forward up to host logits of the last position.
  decode    at each context depth S: the state after an S-token prefill (built once, untimed) is
            restored before each repetition, then `--decode-tokens` greedy single-token forwards
            are timed one by one (time per output token, TPOT).
  Warm-up repetitions run first and are dropped; every timed region is synchronised with the device
  (nemoh.bench_device). Raw samples are kept; p50/p90/p99 and spread are reported.
  Runners are loaded one at a time (reference first) and released before the next, so each one's
  memory is measured alone.

Against the reference: every figure carries its ratio to `hf` measured in the same run
(reference p50 / backend p50: 2.0 = twice as fast), which survives a noisy shared machine better
than absolute times do.

Against the limit: FLOPs and bytes per step derived from the IR (nemoh.bench_cost), divided by
the measured time, as a fraction of ceilings this run measures itself (copy bandwidth, matmul
rate at the dtype) and of the datasheet peaks when the device is known.

Correctness gate: the greedy tokens of each measured run are compared with the reference's.
Equal: OK. A first difference where both sides' top-2 margin is within the logits tolerance is a
near-tie (still OK, reported with its step). Anything else is WRONG at its first diverging step:
a fast wrong run is reported as wrong, and the exit code is 1.

Exit codes: 0 every run OK, 1 a run was WRONG or failed, 2 bad input (unknown backend or model,
a size that will not fit the device's memory), with one line on stderr.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .bench_cost import active_params, decode_cost, memory_estimate, state_bytes, step_cost
from .bench_device import (Clock, ForeignLoad, MemoryMeter, available_memory, describe_device, probe_copy_bandwidth,
                           probe_matmul_rate, release_memory, resolve_device)
from .bench_models import (BENCH_PRESETS, BackendRunner, HFRunner, RandomWeights, bench_preset_config,
                           hf_from_checkpoint, hf_from_weights)
from .bench_stats import summarize
from .config import load_config
from .errors import NemohError, did_you_mean
from .ir import build_graph
from .registry import get_backend
from .runtime import Model, open_model
from .tolerances import TOLERANCES

FORMAT = "nemoh-bench/1"
REFERENCE = "hf"
FIT_FRACTION = 0.9  # refuse when the estimate exceeds this share of the free memory


def tie_tolerance(dtype: str) -> float:
    """Largest top-2 margin (relative to max |logit|) that counts as a near-tie at `dtype`.

    Two logits each within tol of the reference can swap order when their margin is below 2 tol.
    tol is the table's logits tolerance for fp64/fp32; for 16-bit types the table has none against
    an fp32 reference, so its equivalence tolerance (the same executor run two ways) stands in.
    """
    key = ("logits_rel_max_abs", dtype)
    if key not in TOLERANCES:
        key = ("equiv_rel_max_abs", dtype)
    return 2 * TOLERANCES[key].value


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
    from .presets import PRESETS, resolve_model

    p = Path(model).expanduser()
    if not (p.exists() or model in PRESETS):
        raise NemohError(did_you_mean("model or preset", model, [*PRESETS, *BENCH_PRESETS])
                         + f" ('{model}' is neither a checkpoint directory nor a preset name.)")
    path = resolve_model(model)
    config = load_config(path)
    source = f"nemoh tiny preset {model} (generated checkpoint {path.name})" if model in PRESETS else str(path)
    return Target(model, "checkpoint", config, build_graph(config, dtype or config.torch_dtype), path=path,
                  source=source)


def check_fit(target: Target, s: Settings, available: int | None, device_label: str) -> dict[str, Any]:
    """The IR's memory estimate for this run; a NemohError when it exceeds the free memory."""
    max_ctx = max(max(s.prompt_lengths), max(s.context_depths) + s.decode_tokens)
    est = memory_estimate(target.graph, s.batch, max(max(s.prompt_lengths), max(s.context_depths)), max_ctx)
    est = {**est, "available_bytes": available, "fits": available is None or
           est["total_bytes"] <= FIT_FRACTION * available}
    if not est["fits"]:
        gib = 1 << 30
        raise NemohError(
            f"{target.name} at {target.graph.dtype} will not fit {device_label}: about "
            f"{est['total_bytes'] / gib:.1f} GiB needed (params {est['params_bytes'] / gib:.1f} + state "
            f"{est['state_bytes'] / gib:.2f} + activations {est['activation_bytes'] / gib:.2f} GiB, estimated from "
            f"the IR) but {available / gib:.1f} GiB free; choose a smaller model, dtype, batch or length")
    return est


def _quiet_transformers():
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def import_runner_code(spec: str) -> None:
    """Import what a runner needs before its memory baseline is taken: module code is not weights."""
    if spec == REFERENCE:
        try:
            import transformers.models.nemotron_h.modeling_nemotron_h  # noqa: F401
        except ImportError:
            raise NemohError("the reference 'hf' needs transformers: pip install 'nemoh[ref]' "
                             "(or run with --reference none)") from None
        _quiet_transformers()
    else:
        get_backend(spec)


def build_runner(spec: str, target: Target, device: torch.device):
    """(runner, load seconds) for the reference or a registered backend."""
    t0 = time.perf_counter()
    dtype = target.graph.dtype
    if spec == REFERENCE:
        import_runner_code(spec)
        if target.kind == "bench-preset":
            w = RandomWeights(target.graph, target.preset.seed, device, label=target.name)
            model = hf_from_weights(target.preset.config, target.graph, w)
        else:
            model = hf_from_checkpoint(target.path, dtype, device)
        runner = HFRunner(model, device, dtype)
    else:
        be = get_backend(spec)
        ok = be.available()
        if not ok.ok:
            raise _NotSupported(f"backend '{be.name}' is not available here: {ok.reason}")
        for kind in sorted({o.kind for b in target.graph.blocks for o in b.ops}):
            sup = be.supports(kind, dtype)
            if not sup.ok:
                raise _NotSupported(f"op {kind} at {dtype}: {sup.reason}")
        if target.kind == "bench-preset":
            w = RandomWeights(target.graph, target.preset.seed, device, label=target.name)
            be.load(target.graph, w, device=str(device))
            model = Model(w.dir, target.config, target.graph, w, be)
        else:
            model = open_model(target.path, be, dtype, str(device))
        runner = BackendRunner(model, spec)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return runner, time.perf_counter() - t0


class _NotSupported(Exception):
    pass


# ----------------------------------------------------------------------------------------------
# Measuring one runner

def _progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency; a stripped environment still runs, silently
        enabled = False
    if not enabled:
        class _Null:
            def update(self, n=1):
                pass

            def close(self):
                pass
        return _Null()
    # disable=None: bars on a terminal only, not in logs
    return tqdm(total=total, desc=desc, unit="fwd", file=sys.stderr, leave=False, dynamic_ncols=True, disable=None)


def measure_runner(runner, ids: torch.Tensor, s: Settings, clock: Clock, meter: MemoryMeter, baseline: int,
                   bar) -> dict[str, Any]:
    """Raw measurements of one runner: timings, greedy tokens and logits, memory, state bytes."""
    B = s.batch
    out: dict[str, Any] = {"prefill": [], "decode": []}
    for T in s.prompt_lengths:
        x = ids[:, :T]
        release_memory()  # the last workload's freed buffers are not this one's peak
        phase = meter.start()
        times, walls, first, identical = [], [], None, True
        for r in range(s.warmup + s.repeats):
            h = runner.new(B)
            logits, t = clock.time(functools.partial(runner.step, h, x))
            if r >= s.warmup:
                times.append(t.seconds)
                if clock.cuda:  # on the CPU the host clock *is* the clock: no second copy
                    walls.append(t.wall)
            if first is None:
                first = logits
            elif not torch.equal(first, logits):
                identical = False
            bar.update(1)
        out["prefill"].append({
            "prompt_length": T, "seconds": times, "wall_seconds": walls, "logits": logits[:, None],
            "tokens": logits.argmax(-1)[:, None], "repeat_identical": identical,
            "peak_bytes": meter.peak_since(phase, baseline), "state_bytes": runner.state_bytes(h)})
        del h
    for S in s.context_depths:
        release_memory()
        phase = meter.start()
        h = runner.new(B)
        logits0 = runner.step(h, ids[:, :S])  # the context: built once, not timed
        snap = runner.snapshot(h)
        sb = runner.state_bytes(h)
        bar.update(1)
        steps, walls, first_tokens, identical = [], [], None, True
        for r in range(s.warmup + s.repeats):
            h = runner.restore(h, snap)
            tok = logits0.argmax(-1)
            toks, dists, ts, ws = [tok], [logits0], [], []
            for _ in range(s.decode_tokens):
                logits, t = clock.time(functools.partial(runner.step, h, tok[:, None]))
                tok = logits.argmax(-1)
                toks.append(tok)
                dists.append(logits)
                ts.append(t.seconds)
                if clock.cuda:
                    ws.append(t.wall)
                bar.update(1)
            tokens = torch.stack(toks, 1)
            if first_tokens is None:
                first_tokens = tokens
            elif not torch.equal(first_tokens, tokens):
                identical = False
            if r >= s.warmup:
                steps.append(ts)
                walls.append(ws)
        out["decode"].append({
            "context_depth": S, "step_seconds": steps, "step_wall_seconds": walls,
            "logits": torch.stack(dists, 1), "tokens": tokens, "repeat_identical": identical,
            "peak_bytes": meter.peak_since(phase, baseline), "state_bytes": sb})
        del h, snap
    return out


# ----------------------------------------------------------------------------------------------
# The correctness gate

def gate(tokens: torch.Tensor, logits: torch.Tensor, ref_tokens: torch.Tensor, ref_logits: torch.Tensor,
         tie_tol: float) -> dict[str, Any]:
    """Compare greedy tokens [B, K] (with the logits [B, K, V] they were picked from) to the reference's.

    Steps are scanned in order; a row whose first difference is a near-tie (both sides' margin
    between the two tokens <= tie_tol * max |ref logit|) is OK and no longer compared (its inputs
    differ from then on); any other difference makes the run WRONG at that step.
    """
    B, K = ref_tokens.shape
    ties: list[dict[str, Any]] = []
    live = set(range(B))
    for k in range(K):
        for b in sorted(live):
            t, rt = int(tokens[b, k]), int(ref_tokens[b, k])
            if t == rt:
                continue
            r, o = ref_logits[b, k].double(), logits[b, k].double()
            scale = float(r.abs().max()) or 1.0
            margin = max(float(r[rt] - r[t]), float(o[t] - o[rt])) / scale
            info = {"step": k, "row": b, "token": t, "reference_token": rt, "relative_margin": margin}
            if margin <= tie_tol:
                ties.append(info)
                live.discard(b)
                continue
            return {"status": "WRONG", "first_diverging_step": k, "divergence": info, "near_ties": ties}
    return {"status": "OK", "first_diverging_step": ties[0]["step"] if ties else None,
            "divergence": None, "near_ties": ties}


# ----------------------------------------------------------------------------------------------
# Derived figures

def _rate(work: float, seconds: float) -> float:
    return work / seconds if seconds > 0 else math.inf


def _fraction(x: float | None, ceiling: float | None) -> float | None:
    return x / ceiling if x is not None and ceiling else None


def _wall(xs: list[float] | None) -> dict[str, Any] | None:
    return summarize(xs) if xs else None


def derive(raw: dict[str, Any], ref: dict[str, Any] | None, target: Target, s: Settings,
           ceilings: dict[str, Any], datasheet: dict | None, tie_tol: float) -> dict[str, Any]:
    """Statistics, rates, fractions of the ceilings, ratios to the reference, and the gate."""
    g, B = target.graph, s.batch
    probe_bw = ceilings["copy_bandwidth"]["p50"] if ceilings.get("copy_bandwidth") else None
    probe_fl = ceilings["matmul_rate"]["p50"] if ceilings.get("matmul_rate") else None
    sheet_bw = datasheet["bandwidth_Bps"] if datasheet else None
    sheet_fl = datasheet["flops"].get(g.dtype) if datasheet else None

    def limits(cost, seconds: float, per: int) -> dict[str, Any]:
        flops, nbytes = cost.flops / per, cost.bytes / per
        achieved_fl, achieved_bw = _rate(flops, seconds), _rate(nbytes, seconds)
        floor = max(flops / probe_fl if probe_fl else 0.0, nbytes / probe_bw if probe_bw else 0.0) or None
        return {"flops": flops, "bytes": nbytes, "achieved_flops": achieved_fl, "achieved_bandwidth_Bps": achieved_bw,
                "flops_fraction_of_probe": _fraction(achieved_fl, probe_fl),
                "bandwidth_fraction_of_probe": _fraction(achieved_bw, probe_bw),
                "flops_fraction_of_datasheet": _fraction(achieved_fl, sheet_fl),
                "bandwidth_fraction_of_datasheet": _fraction(achieved_bw, sheet_bw),
                "floor_seconds_probe": floor, "fraction_of_floor": _fraction(floor, seconds) if floor else None}

    prefill = []
    for i, w in enumerate(raw["prefill"]):
        T = w["prompt_length"]
        cost = step_cost(g, B, T, 0)
        ttft = summarize(w["seconds"])
        row = {"prompt_length": T, "ttft_seconds": ttft, "wall_seconds": _wall(w["wall_seconds"]),
               "tokens_per_second": summarize([B * T / x for x in w["seconds"]]),
               "cost": cost.to_json(), "limits": limits(cost, ttft["p50"], 1),
               "peak_memory_bytes": w["peak_bytes"], "state_bytes_measured": w["state_bytes"],
               "state_bytes_ir": state_bytes(g, B, T), "repeat_identical": w["repeat_identical"],
               "tokens": w["tokens"].tolist()}
        if ref is not None:
            rw = ref["prefill"][i]
            row["ratio_to_reference"] = summarize(rw["seconds"])["p50"] / ttft["p50"]
            row["gate"] = gate(w["tokens"], w["logits"], rw["tokens"], rw["logits"], tie_tol)
        else:
            row["ratio_to_reference"] = None
            row["gate"] = {"status": "UNCHECKED", "first_diverging_step": None, "divergence": None, "near_ties": []}
        prefill.append(row)

    decode = []
    for i, w in enumerate(raw["decode"]):
        S, N = w["context_depth"], s.decode_tokens
        flat = [x for rep in w["step_seconds"] for x in rep]
        tpot = summarize(flat)
        cost = decode_cost(g, B, S, N)
        row = {"context_depth": S, "decode_tokens": N, "tpot_seconds": tpot,
               "wall_seconds": _wall([x for rep in w["step_wall_seconds"] for x in rep]),
               "tokens_per_second": summarize([B * N / sum(rep) for rep in w["step_seconds"]]),
               "cost": cost.to_json(), "limits": limits(cost, tpot["p50"], N),
               "peak_memory_bytes": w["peak_bytes"], "state_bytes_measured": w["state_bytes"],
               "state_bytes_ir": state_bytes(g, B, S), "repeat_identical": w["repeat_identical"],
               "tokens": w["tokens"].tolist()}
        if ref is not None:
            rw = ref["decode"][i]
            ref_tpot = summarize([x for rep in rw["step_seconds"] for x in rep])["p50"]
            row["ratio_to_reference"] = ref_tpot / tpot["p50"]
            row["gate"] = gate(w["tokens"], w["logits"], rw["tokens"], rw["logits"], tie_tol)
        else:
            row["ratio_to_reference"] = None
            row["gate"] = {"status": "UNCHECKED", "first_diverging_step": None, "divergence": None, "near_ties": []}
        decode.append(row)
    return {"prefill": prefill, "decode": decode}


def _overall(entry: dict[str, Any]) -> str:
    if entry.get("error"):
        return entry["status"]
    statuses = [w["gate"]["status"] for part in ("prefill", "decode") for w in entry[part]]
    if "WRONG" in statuses:
        return "WRONG"
    if statuses and all(x == "UNCHECKED" for x in statuses):
        return "UNCHECKED"
    return "OK"


# ----------------------------------------------------------------------------------------------
# The run

def environment(device: torch.device) -> dict[str, Any]:
    env = {"date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
           "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
    return env


def run_bench(s: Settings, argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark described by `s`; the result in the nemoh-bench/1 JSON form."""
    s.check()
    specs = []
    for name in s.backends:
        if name == REFERENCE:
            continue  # the reference always runs (unless --reference none); never twice
        get_backend(name)  # unknown names fail here, before anything is loaded
        if name not in specs:
            specs.append(name)
    target = resolve_target(s.model, s.dtype)
    device = resolve_device(s.device)
    dev = describe_device(device)
    fit = check_fit(target, s, available_memory(device), f"{dev['type']} ({dev['name']})")
    env = environment(device)
    foreign = ForeignLoad()

    n_ids = max(max(s.prompt_lengths), max(s.context_depths))
    gen = torch.Generator().manual_seed(s.seed)
    ids = torch.randint(4, target.config.vocab_size, (s.batch, n_ids), generator=gen)  # 0..3 are special

    dtype = target.graph.dtype
    ceilings = {"copy_bandwidth": probe_copy_bandwidth(device, s.probe_copy_bytes),
                "matmul_rate": probe_matmul_rate(device, dtype, s.probe_matmul_n)}
    datasheet = dev.get("datasheet")
    tie_tol = tie_tolerance(dtype)
    clock, meter = Clock(device), MemoryMeter(device)

    order = ([REFERENCE] if s.reference == REFERENCE else []) + specs
    per_runner = len(s.prompt_lengths) * (s.warmup + s.repeats) \
        + len(s.context_depths) * (1 + (s.warmup + s.repeats) * s.decode_tokens)
    raws: dict[str, dict[str, Any]] = {}
    entries: list[dict[str, Any]] = []
    for spec in order:
        import_runner_code(spec)
        release_memory()
        phase = meter.start()
        base = phase[0]
        entry: dict[str, Any] = {"name": spec, "is_reference": spec == REFERENCE, "status": "OK", "error": None}
        runner = None
        try:
            runner, load_s = build_runner(spec, target, device)
            load_peak = meter.peak_since(phase)
            release_memory()  # loading's freed temporaries are not weights
            entry["describe"] = runner.describe()
            entry["load_seconds"] = load_s
            entry["memory"] = {"method": meter.method, "baseline_bytes": base,
                               "weights_bytes": max(0, meter.current() - base),
                               "load_peak_bytes": load_peak}
            bar = _progress(per_runner, spec, s.progress)
            try:
                raws[spec] = measure_runner(runner, ids, s, clock, meter, base, bar)
            finally:
                bar.close()
        except _NotSupported as e:
            entry.update(status="NOT_SUPPORTED", error=str(e))
        except NemohError:
            raise
        except Exception as e:  # a backend failure is a result, not a crash of the whole run
            if spec == REFERENCE:
                raise
            entry.update(status="ERROR", error=f"{type(e).__name__}: {e}")
        finally:
            if runner is not None:
                runner.close()
            del runner
        entries.append(entry)

    ref_raw = raws.get(REFERENCE)
    for entry in entries:
        if entry["name"] in raws:
            entry.update(derive(raws[entry["name"]], ref_raw if not entry["is_reference"] else None, target, s,
                                ceilings, datasheet, tie_tol))
            if entry["is_reference"]:
                for part in ("prefill", "decode"):
                    for w in entry[part]:
                        w["ratio_to_reference"] = 1.0
                        w["gate"] = {"status": "REFERENCE", "first_diverging_step": None, "divergence": None,
                                     "near_ties": []}
                entry["status"] = "REFERENCE"
            else:
                entry["status"] = _overall(entry)
        else:
            entry.setdefault("prefill", [])
            entry.setdefault("decode", [])
    env["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    env["cpu_foreign_fraction"] = foreign.fraction()

    g = target.graph
    contexts = sorted({*s.prompt_lengths, *s.context_depths})
    top = max(contexts[-1], 2)
    curve = sorted({0, *(2 ** k for k in range(0, int(math.log2(top)) + 2)), *contexts})
    state_memory = {
        "ir": [{"context": c, "bytes": state_bytes(g, s.batch, c)} for c in curve],
        "measured": [{"backend": e["name"], "context": w.get("prompt_length", w.get("context_depth")),
                      "bytes": w["state_bytes_measured"]}
                     for e in entries for part in ("prefill", "decode") for w in e[part]],
    }
    settings = {k: v for k, v in asdict(s).items() if k not in ("progress",)}
    settings["device"] = str(device)
    return {
        "format": FORMAT,
        "command": " ".join(["nemoh-bench", *(argv or [])]),
        "environment": env, "device": dev, "model": target.describe(), "settings": settings,
        "fit": fit, "clock": clock.name, "tie_tolerance": tie_tol,
        "ceilings": {**ceilings, "datasheet": datasheet},
        "reference": REFERENCE if s.reference == REFERENCE else None,
        "backends": entries, "state_memory": state_memory,
    }


# ----------------------------------------------------------------------------------------------
# Printing

def _si(x: float | None, unit: str) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    for p, f in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= f:
            return f"{x / f:.2f} {p}{unit}"
    return f"{x:.2f} {unit}"


def _ms(x: float) -> str:
    return f"{x * 1e3:.2f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}"


def _gate_text(gt: dict[str, Any]) -> str:
    st = gt["status"]
    if st == "WRONG":
        return f"WRONG@{gt['first_diverging_step']}"
    if st == "OK" and gt["near_ties"]:
        return f"OK(tie@{gt['first_diverging_step']})"
    return "ref" if st == "REFERENCE" else st


def format_report(result: dict[str, Any]) -> str:
    m, dev = result["model"], result["device"]
    c = result["ceilings"]
    lines = [f"nemoh-bench  {m['name']} ({m['pattern']}, {m['params_total'] / 1e6:.1f}M params, "
             f"{m['params_active_per_token'] / 1e6:.1f}M active/token)  dtype={m['dtype']}  "
             f"batch={result['settings']['batch']}  device={dev['type']} {dev['name']}",
             f"ceilings (measured here): copy {_si(c['copy_bandwidth']['p50'], 'B/s')}  "
             f"matmul {_si(c['matmul_rate']['p50'], 'FLOP/s')} ({c['matmul_rate']['dtype']})"
             + (f"  datasheet: {dev['datasheet_key']}" if c.get("datasheet") else "  datasheet: none for this device"),
             ""]
    hdr = (f"{'prefill':<9}{'T':>6}  {'backend':<10}{'gate':<13}{'TTFT p50':>10}{'p90':>9}{'p99':>9}{'spread':>8}"
           f"{'tok/s':>10}{'FLOP/s':>13}{'of probe':>9}{'x ref':>7}")
    lines.append(hdr + "   (times in ms)")
    for i, T in enumerate(result["settings"]["prompt_lengths"]):
        for e in result["backends"]:
            if not e["prefill"]:
                continue
            w = e["prefill"][i]
            t = w["ttft_seconds"]
            lines.append(f"{'':<9}{T:>6}  {e['name']:<10}{_gate_text(w['gate']):<13}{_ms(t['p50']):>10}"
                         f"{_ms(t['p90']):>9}{_ms(t['p99']):>9}{_pct(t['spread']):>8}"
                         f"{w['tokens_per_second']['p50']:>10.1f}{_si(w['limits']['achieved_flops'], ''):>13}"
                         f"{_pct(w['limits']['flops_fraction_of_probe']):>9}{_x(w['ratio_to_reference']):>7}")
    lines.append("")
    lines.append(f"{'decode':<9}{'S':>6}  {'backend':<10}{'gate':<13}{'TPOT p50':>10}{'p90':>9}{'p99':>9}"
                 f"{'spread':>8}{'tok/s':>10}{'B/s':>13}{'of probe':>9}{'x ref':>7}")
    for i, S in enumerate(result["settings"]["context_depths"]):
        for e in result["backends"]:
            if not e["decode"]:
                continue
            w = e["decode"][i]
            t = w["tpot_seconds"]
            lines.append(f"{'':<9}{S:>6}  {e['name']:<10}{_gate_text(w['gate']):<13}{_ms(t['p50']):>10}"
                         f"{_ms(t['p90']):>9}{_ms(t['p99']):>9}{_pct(t['spread']):>8}"
                         f"{w['tokens_per_second']['p50']:>10.1f}{_si(w['limits']['achieved_bandwidth_Bps'], ''):>13}"
                         f"{_pct(w['limits']['bandwidth_fraction_of_probe']):>9}{_x(w['ratio_to_reference']):>7}")
    lines.append("")
    for e in result["backends"]:
        mem = e.get("memory") or {}
        peaks = [w["peak_memory_bytes"] for p in ("prefill", "decode") for w in e[p]
                 if w["peak_memory_bytes"] is not None]
        lines.append(f"{e['name']:<10} {e['status']:<13} weights {_si(mem.get('weights_bytes'), 'B'):>10}  "
                     f"peak {_si(max(peaks) if peaks else None, 'B'):>10}"
                     + (f"  error: {e['error']}" if e.get("error") else ""))
    env = result["environment"]
    la = " ".join(f"{x:.2f}" for x in env["loadavg_start"] or [])
    lb = " ".join(f"{x:.2f}" for x in env["loadavg_end"] or [])
    fo = env.get("cpu_foreign_fraction")
    lines.append(f"load average {la} -> {lb}; CPU used by other processes during the run: "
                 f"{'-' if fo is None else f'{100 * fo:.0f}%'}; x ref = reference p50 / p50 (same run)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line

def _ints(values: list[str]) -> list[int]:
    out = []
    for v in values:
        for part in str(v).split(","):
            if part.strip():
                try:
                    out.append(int(part))
                except ValueError:
                    raise NemohError(f"expected integers, got {part!r}") from None
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="nemoh-bench", description="Throughput, latency and memory of Nemotron-H executors "
                 "against the transformers reference and the device's limits.")
    ap.add_argument("--backend", action="append", help="backend name(s), comma-separated or repeated "
                    "(registered names or package.module:factory); the reference 'hf' always runs too")
    ap.add_argument("--model", help="checkpoint directory, tiny preset, or bench preset (see --list-presets)")
    ap.add_argument("--dtype", choices=["float64", "float32", "bfloat16", "float16"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-lengths", nargs="+", default=["128", "512", "2048"], metavar="T")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--context-depths", nargs="+", default=["128", "2048"], metavar="S")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    ap.add_argument("--reference", default=REFERENCE, choices=[REFERENCE, "none"],
                    help="'none' skips the reference: no gate, no ratios (statuses UNCHECKED)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random prompt token ids")
    ap.add_argument("--threads", type=int, help="torch intra-op threads on the CPU (default: torch's own choice)")
    ap.add_argument("--json", type=Path, help="write the result (schema: nemoh/reports/bench.schema.json)")
    ap.add_argument("--html", type=Path, help="write a self-contained HTML page with plots")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--list-presets", action="store_true", help="list the bench presets and exit")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.list_presets:
            for name, p in BENCH_PRESETS.items():
                g = build_graph(bench_preset_config(name))
                print(f"{name:<26} {g.config.pattern[:24]:<24} {g.params_total / 1e9:>7.2f}B params  "
                      f"{p.description}")
            return 0
        if not args.model or not args.backend:
            raise NemohError("--model and --backend are required (see nemoh-bench --help)")
        if args.threads is not None:
            if args.threads < 1:
                raise NemohError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        s = Settings(model=args.model, backends=[b.strip() for v in args.backend for b in v.split(",") if b.strip()],
                     dtype=args.dtype, batch=args.batch, prompt_lengths=_ints(args.prompt_lengths),
                     decode_tokens=args.decode_tokens, context_depths=_ints(args.context_depths),
                     repeats=args.repeats, warmup=args.warmup, device=args.device, reference=args.reference,
                     seed=args.seed, progress=not args.no_progress)
        result = run_bench(s, argv)
        print(format_report(result))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n", encoding="utf-8")
        if args.html:
            try:
                from nemoh.reports.bench_html import write_html
            except ImportError as e:
                raise NemohError(f"--html needs the report extras ({e.name} is missing): "
                                 "pip install 'nemoh[bench]'") from None
            write_html(result, args.html)
        bad = [e for e in result["backends"] if e["status"] in ("WRONG", "ERROR")]
        return 1 if bad else 0
    except NemohError as e:
        print(f"nemoh-bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nemoh-bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

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
  (nemoh.bench.device). Raw samples are kept; p50/p90/p99 and spread are reported.
  Runners are loaded one at a time (reference first) and released before the next, so each one's
  memory is measured alone.

Against the reference: every figure carries its ratio to `hf` measured in the same run
(reference p50 / backend p50: 2.0 = twice as fast), which survives a noisy shared machine better
than absolute times do.

Against the limit: FLOPs and bytes per step derived from the IR (nemoh.bench.cost), divided by
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

import math
from dataclasses import asdict
from typing import Any

import torch

from nemoh import display
from nemoh.bench.cost import state_bytes
from nemoh.bench.derive import derive, headline, overall_status
from nemoh.bench.device import (
    Clock,
    ForeignLoad,
    MemoryMeter,
    available_memory,
    describe_device,
    probe_copy_bandwidth,
    probe_matmul_rate,
    release_memory,
    resolve_device,
)
from nemoh.bench.measure import NotSupported, build_runner, import_runner_code, measure_runner
from nemoh.bench.plan import FORMAT, REFERENCE, Settings, check_fit, resolve_target, tie_tolerance
from nemoh.environment import environment, loadavg
from nemoh.errors import NemohError
from nemoh.runtime.registry import get_backend


# ----------------------------------------------------------------------------------------------
# The run
def run_bench(s: Settings, argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark described by `s`; the result in the nemoh-bench/2 JSON form (reports/bench.schema.json)."""
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
    env = environment(["nemoh-bench", *(argv or [])], {"prompt_ids": s.seed})
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
            bar = display.progress(per_runner, spec, "fwd", s.progress)
            try:
                raws[spec] = measure_runner(runner, ids, s, clock, meter, base, bar)
            finally:
                bar.close()
        except NotSupported as e:
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
                entry["status"] = overall_status(entry)
        else:
            entry.setdefault("prefill", [])
            entry.setdefault("decode", [])
    env["loadavg_end"] = loadavg()
    env["cpu_foreign_fraction"] = foreign.fraction()

    g = target.graph
    contexts = sorted({*s.prompt_lengths, *s.context_depths})
    top = max(contexts[-1], 2)
    curve = sorted({0, *(2 ** k for k in range(0, int(math.log2(top)) + 2)), *contexts})
    state_memory = {
        "ir": [{"context": c, "bytes": state_bytes(g, s.batch, c)} for c in curve],
        "measured": [{"backend": e["name"], "context": w.get("prompt_length", w.get("context_depth")),
                      "bytes": w["state_bytes_measured"]}
                     for e in entries for part in ("prefill", "decode") for w in e[part]
                     if w["state_bytes_measured"] is not None],
    }
    settings = {k: v for k, v in asdict(s).items() if k not in ("progress",)}
    # resolved values, never null: what actually ran
    settings.update(device=str(device), dtype=dtype, probe_copy_bytes=ceilings["copy_bandwidth"]["bytes_per_copy"] // 2,
                    probe_matmul_n=ceilings["matmul_rate"]["matrix_n"])
    return {
        "format": FORMAT,
        "command": " ".join(["nemoh-bench", *(argv or [])]),
        "environment": env, "device": dev, "model": target.describe(), "settings": settings,
        "fit": fit, "clock": clock.name, "tie_tolerance": tie_tol,
        "ceilings": {**ceilings, "datasheet": datasheet},
        "reference": REFERENCE if s.reference == REFERENCE else None,
        "backends": entries, "state_memory": state_memory,
        "headline": headline(entries, REFERENCE if s.reference == REFERENCE else None),
    }

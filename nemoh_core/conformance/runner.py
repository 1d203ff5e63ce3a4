"""Running the conformance suites: backends x dtypes x suites -> one JSON-ready report.

The report holds the model (and its resolved config), the environment (package versions, device,
git commit, seeds, command line), the known reference deviations measured on this model, and every
case with its status, metrics and tolerances. nemoh.reports renders it; nothing is computed there.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from nemoh import display
from nemoh.conformance import deviations as known_deviations
from nemoh.conformance.blame import files_of_backend
from nemoh.conformance.case import Result, Status
from nemoh.conformance.execute import (
    DEFAULT_CASE_TIMEOUT,
    Book,
    load_failed_result,
    load_failure,
    no_limit,
    run_case,
    select_suites,
)
from nemoh.conformance.memory import PeakSampler, plan_memory
from nemoh.conformance.isolation import Watchdog, abort_on_timeout, run_isolated
from nemoh.conformance.references import Ctx, Reference, ShapeCtx
from nemoh.conformance.tolerances import TOLERANCES, set_variant, variant
from nemoh.environment import environment
from nemoh.errors import NemohError
from nemoh.model.config import load_config
from nemoh.model.ir import build_graph
from nemoh.model.quant import KV_ALGOS, read_quant_config
from nemoh.runtime.backend import unsupported_reason
from nemoh.runtime.registry import get_backend, optional_hint
from nemoh.runtime.session import open_model

SCHEMA = "nemoh-conformance/2"


def _resolve_model(model: str) -> Path:
    from nemoh.model.presets import known_presets, resolve_model

    try:
        return resolve_model(model)
    except ModuleNotFoundError as e:  # generating a preset needs transformers (and tokenizers)
        hint = optional_hint(e.name)
        what = f"preset '{model}' is not in the cache and cannot be generated" if model in known_presets() else \
            f"model '{model}' cannot be resolved"
        raise NemohError(f"{what} without the module '{e.name}'"
                         f"{f': {hint}' if hint else ''} (or pass a checkpoint directory)") from None


def run_conformance(model: str, backends: list[str], dtypes: list[str], suites: list[str] | None = None, *,
                    argv: list[str] | None = None, progress: bool = True, device: str | None = None,
                    deviations: bool = True, on_result=None, case_timeout: float | None = DEFAULT_CASE_TIMEOUT,
                    isolate: bool = False, json_path: Path | None = None, oracle_mode: str = "auto",
                    memory_limit: int | None = None) -> dict[str, Any]:
    """Run the suites; `on_result(run, result_json)` is called as each case finishes.

    `case_timeout` (seconds; None or 0: none) limits each case, and separately its localisation and
    the backend's load. `json_path`: the report is written there (atomically) after every case, with
    `complete: false` and the cases not yet finished under `unfinished` until the run ends.

    Without `isolate`, cases run in this process: a case past its limit is FAILed, the partial report
    written and the process exits with EXIT_ABORTED (a hung call cannot be stopped from inside the
    process, and the backend instance it hangs in must not be reused). With `isolate`, each
    backend/dtype runs its cases in a worker process (multiprocessing, "spawn"): a case that times out
    (the worker is killed) or kills its worker (abort(), SIGSEGV) is FAILed with the reason, and the
    remaining cases run in a fresh worker that reloads the backend.

    Memory is planned before anything runs (nemoh.conformance.memory): `oracle_mode` "auto" holds the fp64
    oracle when it fits and streams it layer by layer otherwise ("memory", "stream" force one), transformers
    runs only when it fits too, and a run that cannot fit is refused (NemohError) with the figures.
    `memory_limit` (bytes) replaces what the machine says is available.
    """
    if not backends:
        raise NemohError("no backend given: --backend takes NAME[,NAME...] or package.module:factory")
    if not dtypes:
        raise NemohError("no dtype given: --dtype takes DTYPE[,DTYPE...]")
    if suites is not None and not suites:
        raise NemohError("no suite given: --suite takes SUITE[,SUITE...] (leave it out to run all)")
    timeout = float(case_timeout) if case_timeout and case_timeout > 0 else None
    path = _resolve_model(model)
    config = load_config(path)
    chosen = select_suites(suites)
    instances = [(spec, get_backend(spec)) for spec in backends]  # unknown names fail before any work
    g32 = build_graph(config, "float32")
    graphs = {dtype: build_graph(config, dtype) for dtype in dtypes}
    quant = read_quant_config(path)
    listed = {d: [(s, c) for s in chosen for c in s.cases(ShapeCtx(config, g, d, quant))] for d, g in graphs.items()}
    tokens = [_tokens(c, config) for cases in listed.values() for _, c in cases]
    mem = plan_memory(build_graph(config, "float64"), graphs, max(tokens, default=0),
                      oracle=oracle_mode, limit=memory_limit, hf_dtypes=tuple(dtypes))
    ref_opts: dict[str, Any] = {"oracle_mode": mem.oracle, "logits_cache": mem.parts["logits kept"],
                "hf_too_big": "" if mem.transformers else
                f"transformers is not run at this size: {mem.why[-1].removeprefix('transformers not run: ')} "
                "(the fp64 oracle is checked against transformers on every preset; see the README)"}
    ref = Reference(path, config, **ref_opts)
    sampler = PeakSampler()
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "model": {"name": model, "path": str(path), "config": config.to_dict(), "pattern": config.pattern,
                  "params_total": g32.params_total},
        "environment": environment(argv, {"prompts": "torch.Generator(seed) per case; see each case's seed"}),
        "options": {"case_timeout_s": timeout, "isolate": bool(isolate), "oracle": mem.oracle,
                    "tolerance_variant": variant()},
        "memory": mem.to_json(),
        "oracle": ref.oracle_summary(),
        "tolerances": [{"metric": m, "dtype": d, "value": t.value, "reason": t.reason}
                       for (m, d), t in sorted(TOLERANCES.items())],
        "suites": [{"name": s.name, "doc": (s.doc or "").strip()} for s in chosen],
        "complete": False,
        "aborted": None,
        "unfinished": [],
        "runs": [],
    }
    probe_ctx_prompt = torch.randint(4, config.vocab_size, (2, config.chunk_size + 37),
                                     generator=torch.Generator().manual_seed(config.chunk_size + 37))
    report["deviations"] = known_deviations.measure_all(ref, probe_ctx_prompt) if deviations else []

    plan = []  # (spec, backend, dtype, graph, [(suite, case), ...]) in run order
    for spec, be in instances:
        for dtype in dtypes:
            plan.append((spec, be, dtype, graphs[dtype], listed[dtype]))
    book = Book(report, json_path, [(spec, dtype, [c.id for _, c in cases]) for spec, _, dtype, _, cases in plan])
    book.write()
    bar = display.progress(sum(len(p[4]) for p in plan), unit="case", enabled=progress)

    def record(idx: int, run: dict, res_json: dict) -> None:
        book.record(idx, run, res_json)
        if on_result:
            on_result(run, res_json)
        bar.update(1)

    watchdog = None
    if timeout is not None and not isolate:
        watchdog = Watchdog(functools.partial(abort_on_timeout, book, timeout, bar))
    try:
        for idx, (spec, be, dtype, graph, cases) in enumerate(plan):
            run = {"backend": be.name, "spec": spec, "dtype": dtype, "describe": {}, "results": []}
            report["runs"].append(run)
            unsupported = unsupported_reason(be, graph, device, quant.fmt if quant is not None else None,
                                             KV_ALGOS.get(quant.kv_cache_algo or "") if quant is not None else None)
            if unsupported:
                for _suite, case in cases:
                    record(idx, run, Result(case, Status.NOT_SUPPORTED, message=unsupported).to_json())
                continue
            if isolate:
                run_isolated(idx, run, spec, be, dtype, cases, path, device, timeout, record, bar, suites, ref_opts)
                continue
            limit = functools.partial(watchdog.limit if watchdog else no_limit, timeout, run=run, idx=idx,
                                      files=files_of_backend(be))
            ctx = None
            try:
                with limit(kind="load", cases=cases):
                    model_obj = open_model(path, get_backend(spec), dtype, device)
                run["describe"] = model_obj.backend.describe()
                ctx = Ctx(config, graph, dtype, model_obj, ref)
            except NemohError:
                raise
            except (Exception, SystemExit) as e:  # a backend that cannot load is a failing backend
                kind, reason, source = load_failure(e, be)
                run["load_error"] = reason
                for _suite, case in cases:
                    record(idx, run, load_failed_result(case, kind, reason, source).to_json())
                continue
            for suite, case in cases:
                bar.set_description(f"{be.name}/{dtype} {case.id}"[:70])
                res = run_case(suite, case, ctx, limit=limit)
                record(idx, run, res.to_json())
    finally:
        if watchdog:
            watchdog.close()
        bar.close()
        set_variant("")  # the model's tolerance variant (Reference) ends with its run
    report["memory"] = mem.to_json(sampler.stop())
    report["oracle"] = ref.oracle_summary()
    book.write(complete=True)
    return report


def _tokens(case, config) -> int:
    """The most tokens (batch x length) one of the case's forwards holds, from its parameters."""
    p = case.p
    lengths = p.get("lengths") or ()
    T = max(int(p.get("T") or 0), int(p.get("prompt") or 0) + int(p.get("N") or 0), *map(int, lengths), 0)
    if not T:  # the deviation probe's prompt, the eval suite's items: a few chunks
        T = config.chunk_size + 37
    return int(p.get("B") or max(len(lengths), 2)) * T

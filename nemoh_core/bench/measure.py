"""Measuring one runner: loading it, timing prefill and decode, and the correctness gate on its tokens."""

from __future__ import annotations

import functools
import time
from typing import Any

import torch

from nemoh.bench.device import (
    Clock,
    MemoryMeter,
    release_memory,
)
from nemoh.bench.models import (
    BackendRunner,
    HFRunner,
    RandomWeights,
    hf_from_checkpoint,
    hf_from_weights,
)
from nemoh.bench.plan import REFERENCE, Settings, Target
from nemoh.errors import NemohError
from nemoh.runtime.backend import unsupported_reason
from nemoh.runtime.registry import get_backend
from nemoh.runtime.session import Model, open_model


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
            model = hf_from_checkpoint(target.checkpoint_path(), dtype, device)
        runner: HFRunner | BackendRunner = HFRunner(model, device, dtype)
    else:
        be = get_backend(spec)
        why = unsupported_reason(be, target.graph, str(device))
        if why:
            raise NotSupported(why)
        if target.kind == "bench-preset":
            w = RandomWeights(target.graph, target.preset.seed, device, label=target.name)
            # RandomWeights is the checkpoint-like object Backend.load's docstring accepts (load(graph), read,
            # validate, mismatches, notices), but Backend.load and Model annotate a concrete Checkpoint
            be.load(target.graph, w, device=str(device))  # type: ignore[arg-type]  # checkpoint-like stand-in
            model = Model(w.dir, target.config, target.graph, w, be)  # type: ignore[arg-type]  # same stand-in
        else:
            model = open_model(target.checkpoint_path(), be, dtype, str(device))
        runner = BackendRunner(model, spec)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return runner, time.perf_counter() - t0


class NotSupported(Exception):
    pass


# ----------------------------------------------------------------------------------------------
# Measuring one runner
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
        steps: list[list[float]] = []
        step_walls: list[list[float]] = []
        first_tokens, identical = None, True
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
                step_walls.append(ws)
        out["decode"].append({
            "context_depth": S, "step_seconds": steps, "step_wall_seconds": step_walls,
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

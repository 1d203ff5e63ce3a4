"""Backends that misbehave as processes rather than numerically: they hang, abort the process, exit,
or raise without nemoh's BackendBase around them. Used by tests/core/test_robustness.py through
`--backend robust_backends:NAME` (tests/ is on sys.path under pytest; subprocesses get PYTHONPATH).

The trigger is the prefill-chunks case `split=1x6+rest`: the third forward call on one state after
two single-token chunks. No other case of the suite (nor the one-shot prefill it compares against)
starts a state with three single-token calls, so exactly one case misbehaves.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from nemoh.backends.torch_backend import TorchBackend
from nemoh.conformance.case import Case, Suite
from nemoh.suites import prefill_chunks


def _three_single_tokens(state, ids) -> bool:
    calls = getattr(state, "_robust_calls", None)
    if calls is None:
        calls = []
        state._robust_calls = calls
    calls.append(int(ids.shape[1]))
    return len(calls) >= 3 and all(t == 1 for t in calls)


class _Trigger(TorchBackend):
    def forward(self, state, ids, mask=None, *, last_only=False, trace=None):
        if _three_single_tokens(state, ids):
            self.misbehave()
        return super().forward(state, ids, mask, last_only=last_only, trace=trace)

    def misbehave(self) -> None:
        raise NotImplementedError


class HangsOnManyChunks(_Trigger):
    """Sleeps forever in the third single-token chunk of a prefill (a deadlocked kernel). When
    NEMOH_TEST_HANG_MARKER names a file, it is written as the hang starts."""

    def misbehave(self) -> None:
        marker = os.environ.get("NEMOH_TEST_HANG_MARKER")
        if marker:
            Path(marker).write_text(str(os.getpid()))
        while True:
            time.sleep(3600)


class AbortsOnManyChunks(_Trigger):
    """Calls abort() (a C library's assertion) in the third single-token chunk of a prefill."""

    def misbehave(self) -> None:
        os.abort()


class ExitsOnManyChunks(_Trigger):
    """Calls sys.exit(0) mid-case: must be a FAIL of that case, never a passing exit."""

    def misbehave(self) -> None:
        raise SystemExit(0)


class PlainExplodes:
    """Not a BackendBase: every method delegates to the PyTorch executor, and single-token forwards
    raise. Its errors arrive unwrapped and are charged to it by where they were raised."""

    name = "plain-explodes"

    def __init__(self):
        self.inner = TorchBackend()
        for m in ("available", "supports", "supports_graph", "load", "new_state", "copy_state", "export_state",
                  "import_state", "read_param", "describe"):
            setattr(self, m, getattr(self.inner, m))

    def forward(self, state, ids, mask=None, *, last_only=False, trace=None):
        if ids.shape[1] == 1:
            raise RuntimeError("plain kernel exploded")
        return self.inner.forward(state, ids, mask, last_only=last_only, trace=trace)


def not_a_backend():
    return 42


# A three-case, 40-token cut of prefill-chunks (`--suite robust_backends:SUITE`): two cases every
# backend here passes around the one that triggers it, so that each test takes seconds.
SMALL_T = 40
SMALL_SPLITS = {"1+rest": [1, SMALL_T - 1], "1x6+rest": [1] * 6 + [SMALL_T - 6], "17+rest": [17, SMALL_T - 17]}


def _cases(ctx) -> list[Case]:
    return [Case(SUITE_NAME, f"split={k},T={SMALL_T},B=2", (("split", tuple(v)), ("T", SMALL_T), ("B", 2)),
                 seed=7) for k, v in SMALL_SPLITS.items()]


SUITE_NAME = "robust-prefill"
SUITE = Suite(SUITE_NAME, "three prefill-chunks cases; split=1x6+rest triggers the misbehaving backends", _cases,
              prefill_chunks.run, prefill_chunks.scenario, order=20)


def _random_cases(ctx) -> list[Case]:
    return [Case("prefill-random", f"random,seed={seed},T={SMALL_T},B=2",
                 (("split", "random"), ("T", SMALL_T), ("B", 2)), seed=seed) for seed in (1,)]


#: only the random-partition cases of prefill-chunks
RANDOM = Suite("prefill-random", "the random partitions of prefill-chunks", _random_cases, prefill_chunks.run)


def _one(name):
    return lambda ctx: [Case(name, "one", (), 0)]


def _harness_bug(case, ctx):
    ctx.session(1).prefill(ctx.prompt(1, 5, 0))  # the backend runs fine ...
    return {}["a key the suite forgot"]  # ... then the suite itself is wrong


def _reference_bug(case, ctx):
    ids = ctx.prompt(1, 5, 0)
    ctx.session(1).prefill(ids)
    return ctx.oracle_logits(ids + ctx.config.vocab_size)  # the oracle fails (out-of-range ids)


def _needs_onnxruntime(case, ctx):
    import onnxruntime  # noqa: F401 - tests block it to simulate a missing optional package

    raise AssertionError("unreachable when onnxruntime is blocked")


HARNESS_BUG = Suite("harness-bug", "a suite that raises after the backend ran", _one("harness-bug"), _harness_bug)
REFERENCE_BUG = Suite("reference-bug", "the oracle raises", _one("reference-bug"), _reference_bug)
NEEDS_ONNXRUNTIME = Suite("needs-onnxruntime", "imports an optional package", _one("needs-onnxruntime"),
                          _needs_onnxruntime)

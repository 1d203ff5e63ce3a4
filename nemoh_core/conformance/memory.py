"""Memory, checked before a conformance run starts: an estimate of the run's peak from the IR and the
cases, the oracle mode and whether transformers can run that follow from it, and a refusal (exit 2,
with the figures) when even the streamed oracle cannot fit. The estimate goes into the report's JSON
next to the peak RSS the run measured.

What the estimate counts, per process (the parent holds the references; a backend's weights are
counted as if it ran in the same process, which is what happens without --isolate):
  baseline     this process's resident memory when the plan is made (Python, torch, the imports);
  runtime      a fixed allowance for what a run imports and its allocators keep (measured, see RUNTIME);
  backend      the largest backend/dtype's weights: every checkpoint tensor at that dtype's storage
               width (fp32 tensors stay fp32), one backend loaded at a time;
  oracle       in memory: every tensor in fp64; streamed (nemoh.oracle.stream): the largest block's
               tensors in fp64, the LM head's slice, the embedding rows a call gathers;
  activations  the largest case's tokens x (the widest op output x 6 live fp64 copies + LOGIT_BYTES per
               vocabulary entry: the logits of the backend and of the oracle, and what the metrics derive);
  logits kept  the oracle's logits kept for later cases (two of the largest case's, at most 1 GiB);
  transformers the reference's float32 model, plus its float64 one for the deviation probes and its
               copy at each 16-bit dtype of the run (the run keeps each it loads).
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass, field
from typing import Any

from nemoh import display, dtypes
from nemoh.errors import NemohError
from nemoh.model.ir import Graph
from nemoh.oracle import ops as oracle_ops

ORACLE_MODES = ("auto", "memory", "stream")
HEADROOM = 512 << 20  # left unplanned of what is available: slack for the allocator and the page cache
# what a run adds beyond its tensors: transformers and the suites imported, allocator and BLAS workspaces
# (tiny-moe, logits suite, on the 2-core machine: peak RSS 475 MB, the rest of the estimate 269 MB)
RUNTIME = 256 << 20
# bytes per token and vocabulary entry while a case compares logits: the backend's fp32 logits and 6 fp64 arrays
# (the oracle's, log-softmaxes, probabilities, differences). Nemotron-H-8B's shapes, bf16, logits suite: the
# peak less the other parts was 2.1 GB at 330 tokens where 8 + 4 + 8 bytes gave 1.47 GB with the runtime part
LOGIT_BYTES = 4 + 6 * 8
LIVE = 6  # fp64 copies of the widest activation alive at once inside a block (inputs, outputs, temporaries)


def rss_bytes() -> int:
    """This process's resident set now (Linux /proc/self/statm; 0 where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class PeakSampler:
    """The peak of this process's anonymous resident memory (RssAnon: what it allocated, not the pages of
    memory-mapped checkpoint files, which the kernel takes back under pressure), sampled every `period`
    seconds on a daemon thread, with ru_maxrss (everything resident, file pages included) beside it."""

    def __init__(self, period: float = 0.1):
        import threading

        self.peak_anon = _rss_anon()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(period,), name="nemoh-memory-sampler", daemon=True)
        self._thread.start()

    def _loop(self, period: float) -> None:
        while not self._stop.wait(period):
            self.peak_anon = max(self.peak_anon, _rss_anon())

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        self.peak_anon = max(self.peak_anon, _rss_anon())
        return {"measured_peak_anon_bytes": self.peak_anon, "measured_peak_rss_bytes": peak_rss_bytes()}


def _rss_anon() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def peak_rss_bytes() -> int:
    """The peak resident set of this process and of its finished children (isolate workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) * 1024  # Linux reports KiB


def available_bytes() -> tuple[int | None, str]:
    """(bytes this process may still use, where the figure comes from): MemAvailable, or the cgroup's
    limit less its usage when that is lower; None when neither can be read."""
    avail, source = None, ""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail, source = int(line.split()[1]) * 1024, "MemAvailable (/proc/meminfo)"
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max" and (avail is None or int(limit) - used < avail):
            avail, source = int(limit) - used, "the cgroup's memory.max less memory.current"
    except (OSError, ValueError):
        pass
    return avail, source


def _tensor_bytes(graph: Graph) -> int:
    """Every checkpoint tensor at its storage width in `graph` (the IR's dtype per tensor: fp32 ones stay fp32)."""
    return sum(t.numel * dtypes.ITEMSIZE[t.dtype] for t in graph.params)


def streamed_oracle_bytes(g64: Graph) -> int:
    """The streamed oracle's parameter peak: the largest layer in fp64, or the head's slice plus its norm."""
    layers = max((sum(t.numel for t in b.params) for b in g64.layers), default=0)
    head_w = g64.head.ops[-1].params[0]
    spec = g64.param(head_w)
    head = min(spec.shape[0], oracle_ops.HEAD_ROWS) * spec.shape[1] + g64.config.hidden_size
    return 8 * max(layers, head)


def logits_cache_bytes(g64: Graph, max_tokens: int) -> int:
    """What the run keeps of the oracle's logits for later cases: two of the largest case's, at most 1 GiB."""
    return min(1 << 30, 2 * 8 * max_tokens * g64.config.vocab_size)


def _widest(g64: Graph) -> int:
    w = g64.config.hidden_size
    for b in g64.layers:
        for op in b.ops:
            w = max(w, int(op.a.get("out_features", 0) or 0))
    return w


@dataclass
class MemoryPlan:
    available: int | None
    source: str
    parts: dict[str, int]  # what the chosen plan holds, bytes
    oracle: str  # "memory" or "stream"
    transformers: bool
    why: list[str] = field(default_factory=list)  # each choice the plan made, and its reason

    @property
    def estimate(self) -> int:
        return sum(self.parts.values())

    def to_json(self, measured: dict[str, int] | None = None) -> dict[str, Any]:
        return {"estimate_bytes": self.estimate, "parts_bytes": dict(self.parts), "available_bytes": self.available,
                "available_source": self.source, "oracle": self.oracle, "transformers": self.transformers,
                "choices": list(self.why), "measured_peak_anon_bytes": (measured or {}).get("measured_peak_anon_bytes"),
                "measured_peak_rss_bytes": (measured or {}).get("measured_peak_rss_bytes")}


def plan_memory(g64: Graph, graphs: dict[str, Graph], max_tokens: int, *, oracle: str = "auto",
                limit: int | None = None, hf_dtypes: tuple[str, ...] = ()) -> MemoryPlan:
    """The run's plan: `graphs` {dtype: graph} of the backends' runs, `max_tokens` the largest case's B x T,
    `hf_dtypes` the dtypes transformers would run at besides float32 and float64. `limit` (bytes) replaces
    what the machine says is available. Raises NemohError (exit 2) when nothing fits."""
    if oracle not in ORACLE_MODES:
        raise NemohError(f"--oracle must be one of {', '.join(ORACLE_MODES)}, got {oracle!r}")
    avail: int | None
    if limit is not None:
        avail, source = limit, "--memory-limit"
    else:
        avail, source = available_bytes()
        if avail is not None:
            avail += rss_bytes()  # what this process already holds is counted as baseline below
    cfg = g64.config
    parts = {"baseline": rss_bytes(), "runtime": RUNTIME,
             "backend": max((_tensor_bytes(g) for g in graphs.values()), default=0),
             "activations": max_tokens * (8 * LIVE * _widest(g64) + LOGIT_BYTES * cfg.vocab_size),
             "logits kept": logits_cache_bytes(g64, max_tokens)}
    whole, streamed = 8 * g64.checkpoint_tensors_total, streamed_oracle_bytes(g64)
    hf = 4 * g64.checkpoint_tensors_total + 8 * g64.checkpoint_tensors_total + \
        sum(dtypes.ITEMSIZE[d] * g64.checkpoint_tensors_total for d in set(hf_dtypes) - {"float32", "float64"})
    budget = None if avail is None else avail - HEADROOM
    core = sum(parts.values())
    why = []
    if oracle == "auto":
        oracle = "memory" if budget is None or core + whole <= budget else "stream"
        why.append(f"oracle {'in memory' if oracle == 'memory' else 'streamed layer by layer'}: the whole fp64 "
                   f"model is {display.si(whole, 'B')}"
                   + ("" if budget is None else f", {display.si(budget - core, 'B')} left for it"))
    else:
        why.append(f"oracle {'in memory' if oracle == 'memory' else 'streamed layer by layer'}: --oracle {oracle}")
    parts["oracle"] = whole if oracle == "memory" else streamed
    use_hf = budget is None or sum(parts.values()) + hf <= budget
    if use_hf:
        parts["transformers"] = hf
    elif budget is not None:
        why.append(f"transformers not run: it needs {display.si(hf, 'B')} (float32, float64"
                   f"{''.join(', ' + d for d in sorted(set(hf_dtypes) - {'float32', 'float64'}))}), "
                   f"{display.si(max(budget - sum(parts.values()), 0), 'B')} is left")
    plan = MemoryPlan(avail, source, parts, oracle, use_hf, why)
    if budget is not None and plan.estimate > budget:
        shown = ", ".join(f"{k} {display.si(v, 'B')}" for k, v in parts.items())
        fix = ("" if oracle == "stream" else "; --oracle stream needs "
               f"{display.si(plan.estimate - parts['oracle'] + streamed, 'B')}")
        raise NemohError(f"this run needs about {display.si(plan.estimate, 'B')} ({shown}), and "
                         f"{display.si(avail, 'B')} is available ({source}; the plan leaves "
                         f"{display.si(HEADROOM, 'B')} of it free)"
                         f"{fix}; free memory, run one backend/dtype at a time, or use a larger machine")
    return plan


def parse_size(text: str) -> int:
    """'300MB', '24GiB', '1.5e9' -> bytes (decimal and binary prefixes)."""
    import re

    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kKMGT]?)(i?)B?\s*", text)
    if not m:
        raise NemohError(f"--memory-limit {text!r}: expected a size such as 300MB, 24GiB or 1.5e9")
    base = 1024 if m.group(3) else 1000
    scale = {"": 1, "k": base, "K": base, "M": base ** 2, "G": base ** 3, "T": base ** 4}[m.group(2)]
    return int(float(m.group(1)) * scale)

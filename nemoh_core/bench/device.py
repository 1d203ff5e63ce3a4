"""The device side of nemoh-bench: honest clocks, memory meters, ceiling probes, datasheet peaks.

Clocks. On a CUDA device a timed region starts after `torch.cuda.synchronize()` and is bracketed
by CUDA events; the end event is waited on before it is read, so the time covers all device work
the region queued. The region always ends with host logits in hand (the backend protocol returns
CPU tensors), so the events' interval and the host clock agree up to launch noise; both are kept.
On the CPU the clock is `time.perf_counter()` read after the forward has returned its logits.

Memory. CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` (torch's caching
allocator only: memory a backend allocates outside torch is not seen, and the result says so).
CPU: the peak resident set (VmHWM in /proc/PID/status) of this process and every process it started
(a backend may run out of process, as llama.cpp's worker does: its memory counts too), summed over the
tree (a sum of peaks: an upper bound on the tree's peak when they peak at different times). VmHWM only
grows, so before each measured phase the peaks are reset to the current RSS (Linux's
/proc/PID/clear_refs "5") and the phase reports its peak *above the RSS it started from*. Where
that reset is not permitted, a phase's peak is known only when VmHWM rose during it (the new value
is then the phase's peak); otherwise it is reported as unknown (null), never as zero.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from nemoh import dtypes
from nemoh.bench.stats import summarize

# ----------------------------------------------------------------------------------------------
# Datasheet peaks. Dense (no 2:4 sparsity) figures: the datasheets list the tensor-core rates
# "with sparsity", twice the dense rate; the dense halves are given here. fp32 is the non-tensor
# rate (torch does not use TF32 for fp32 matmuls unless asked). Bandwidth in bytes/s, rates in
# FLOP/s.
DATASHEET_SOURCES = {
    "H100": "NVIDIA H100 Tensor Core GPU datasheet (nvidia.com, 2023): SXM5, PCIe and NVL columns",
    "H200": "NVIDIA H200 Tensor Core GPU datasheet (nvidia.com, 2024): SXM and NVL columns",
}
DATASHEET: dict[str, dict[str, Any]] = {
    "H100 SXM": {"source": DATASHEET_SOURCES["H100"], "memory_bytes": 80e9, "bandwidth_Bps": 3.35e12,
                 "flops": {"float64": 67e12, "float32": 67e12, "bfloat16": 989.5e12, "float16": 989.5e12}},
    "H100 PCIe": {"source": DATASHEET_SOURCES["H100"], "memory_bytes": 80e9, "bandwidth_Bps": 2.0e12,
                  "flops": {"float64": 51e12, "float32": 51e12, "bfloat16": 756.5e12, "float16": 756.5e12}},
    "H100 NVL": {"source": DATASHEET_SOURCES["H100"], "memory_bytes": 94e9, "bandwidth_Bps": 3.9e12,
                 "flops": {"float64": 60e12, "float32": 60e12, "bfloat16": 835.5e12, "float16": 835.5e12}},
    "H200 SXM": {"source": DATASHEET_SOURCES["H200"], "memory_bytes": 141e9, "bandwidth_Bps": 4.8e12,
                 "flops": {"float64": 67e12, "float32": 67e12, "bfloat16": 989.5e12, "float16": 989.5e12}},
    "H200 NVL": {"source": DATASHEET_SOURCES["H200"], "memory_bytes": 141e9, "bandwidth_Bps": 4.8e12,
                 "flops": {"float64": 60e12, "float32": 60e12, "bfloat16": 835.5e12, "float16": 835.5e12}},
}


def datasheet_key(device_name: str) -> str | None:
    """The DATASHEET row for a CUDA device name (e.g. 'NVIDIA H100 80GB HBM3' -> 'H100 SXM')."""
    n = device_name.upper()
    for chip in ("H200", "H100"):
        if chip in n:
            if "NVL" in n:
                return f"{chip} NVL"
            if "PCIE" in n:
                return f"{chip} PCIe"
            return f"{chip} SXM"  # SXM parts report e.g. "NVIDIA H100 80GB HBM3" / "NVIDIA H200"
    return None


# ----------------------------------------------------------------------------------------------
# Devices

def resolve_device(name: str | None) -> torch.device:
    if name:
        d = torch.device(name)
        if d.type == "cuda" and d.index is None:
            d = torch.device("cuda", torch.cuda.current_device())
        return d
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def _cgroup_limit() -> int | None:
    for p in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            v = open(p).read().strip()
        except OSError:
            continue
        if v.isdigit() and int(v) < 1 << 60:
            return int(v)
    return None


def available_memory(device: torch.device) -> int | None:
    """Bytes free for a run: CUDA free memory, or the host's MemAvailable (capped by a cgroup limit)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    avail = _meminfo().get("MemAvailable")
    cg = _cgroup_limit()
    if cg is not None:
        avail = min(avail, cg) if avail is not None else cg
    return avail


def describe_device(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        key = datasheet_key(props.name)
        return {"type": "cuda", "name": props.name, "memory_total_bytes": int(props.total_memory),
                "multiprocessors": props.multi_processor_count, "capability": f"{props.major}.{props.minor}",
                "datasheet_key": key, "datasheet": DATASHEET.get(key) if key else None}
    return {"type": "cpu", "name": platform.processor() or platform.machine(),
            "memory_total_bytes": _meminfo().get("MemTotal"), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "datasheet_key": None, "datasheet": None}


class ForeignLoad:
    """How busy other processes kept the CPUs during a run, from /proc/stat and this process's own
    CPU time: (all busy CPU time - ours) / (wall time x CPUs). The load average cannot say this
    (it counts our own threads); 0.0 is a quiet machine, 0.5 means others used half of it."""

    def __init__(self):
        self.start = self._snapshot()

    @staticmethod
    def _snapshot() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        tick = os.sysconf("SC_CLK_TCK")
        busy = (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / tick
        t = os.times()
        return busy, t.user + t.system + t.children_user + t.children_system, time.monotonic()

    def fraction(self) -> float | None:
        end = self._snapshot()
        if self.start is None or end is None or end[2] <= self.start[2]:
            return None
        busy, own, wall = (e - s for e, s in zip(end, self.start))
        return max(0.0, (busy - own) / (wall * (os.cpu_count() or 1)))


# ----------------------------------------------------------------------------------------------
# Clocks

@dataclass
class Timing:
    seconds: float  # device-synchronised time of the region (CUDA events on a GPU)
    wall: float  # host perf_counter around the same region


class Clock:
    """Times a callable, synchronised with the device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.name = "cuda_event" if self.cuda else "perf_counter"

    def time(self, fn: Callable[[], Any]) -> tuple[Any, Timing]:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            e0 = torch.cuda.Event(enable_timing=True)
            e1 = torch.cuda.Event(enable_timing=True)
            w0 = time.perf_counter()
            e0.record()
            out = fn()
            e1.record()
            e1.synchronize()
            torch.cuda.synchronize(self.device)  # work on other streams too
            w1 = time.perf_counter()
            return out, Timing(e0.elapsed_time(e1) / 1e3, w1 - w0)
        w0 = time.perf_counter()
        out = fn()
        w1 = time.perf_counter()
        return out, Timing(w1 - w0, w1 - w0)


# ----------------------------------------------------------------------------------------------
# Memory meters

def _status_kib(key: str, pid: int | str = "self") -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _process_tree() -> list[int]:
    """This process and its descendants (from /proc/PID/task/TID/children), parents first."""
    pids, todo = [], [os.getpid()]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
            except OSError:
                pass
    return pids


def _tree_kib(key: str) -> int | None:
    """`key` (VmRSS, VmHWM) summed over this process and its descendants; None if this process's is unknown."""
    own = _status_kib(key)
    if own is None:
        return None
    return own + sum(_status_kib(key, pid) or 0 for pid in _process_tree()[1:])


def release_memory() -> None:
    """Give freed memory back before the next measurement: Python's cycles, torch's CUDA cache,
    and glibc's free lists (which otherwise keep freed heap pages resident)."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MemoryMeter:
    """Peak memory of a phase above the level it started from (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated (torch's allocator only)"
            self.resettable = True
        else:
            self.resettable = self._try_reset()
            self.method = ("RSS of the process and its children (out-of-process backends): VmHWM summed, reset "
                           "through /proc/PID/clear_refs at each phase start"
                           if self.resettable else "RSS of the process and its children: VmHWM summed, monotonic "
                           "(a phase's peak is known only when it exceeds every earlier one, else null)")

    @staticmethod
    def _try_reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return False
        for pid in _process_tree()[1:]:
            try:
                with open(f"/proc/{pid}/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass  # a child that exited meanwhile
        return _status_kib("VmHWM") is not None

    def current(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        return _tree_kib("VmRSS") or 0

    def start(self) -> tuple[int, int]:
        """Begin a phase: (current level, peak so far), to hand to `peak_since`."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            self._try_reset()
        return self.current(), self._peak_abs()

    def _peak_abs(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return _tree_kib("VmHWM") or 0

    def peak_since(self, phase: tuple[int, int], baseline: int | None = None) -> int | None:
        """Peak since `phase` began, above `baseline` (default: the level the phase began at).

        None when it cannot be known: a monotonic VmHWM that did not rise during the phase (its
        peak was below an earlier one). When VmHWM rose, the new value is the phase's peak.
        """
        level, peak_before = phase
        base = level if baseline is None else baseline
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        peak = self._peak_abs()
        if self.device.type != "cuda" and not self.resettable and peak <= peak_before:
            return None
        return max(0, peak - base)


# ----------------------------------------------------------------------------------------------
# Ceiling probes: measured on this device, once per run

def _rand(shape, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype)


def probe_copy_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int | None = None) -> dict:
    """Device-to-device copy of one large buffer; bytes moved = read + write = 2 * size."""
    cuda = device.type == "cuda"
    nbytes = nbytes or (2 << 30 if cuda else 256 << 20)  # far beyond L2 (50 MB) / any host cache
    repeats = repeats or (20 if cuda else 5)
    src = _rand((nbytes // 4,), torch.float32, device, 1)  # random, never zeros
    dst = torch.empty_like(src)
    clock = Clock(device)
    copy = functools.partial(dst.copy_, src)
    for _ in range(2):
        clock.time(copy)
    rates = []
    for _ in range(repeats):
        _, t = clock.time(copy)
        rates.append(2 * src.numel() * 4 / t.seconds)
    assert torch.equal(dst, src)
    del src, dst, copy
    release_memory()
    return {"what": "copy_bandwidth", "bytes_per_copy": 2 * nbytes, "unit": "B/s", **summarize(rates)}


def probe_matmul_rate(device: torch.device, dtype: str, n: int | None = None, repeats: int | None = None) -> dict:
    """n x n x n matrix product at `dtype` (2 n^3 FLOPs), random operands."""
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 1024)
    repeats = repeats or (20 if cuda else 5)
    td = dtypes.torch_dtype(dtype)
    a, b = _rand((n, n), td, device, 2), _rand((n, n), td, device, 3)
    clock = Clock(device)
    mm = functools.partial(torch.matmul, a, b)
    for _ in range(2):
        clock.time(mm)
    rates = []
    for _ in range(repeats):
        _, t = clock.time(mm)
        rates.append(2 * n ** 3 / t.seconds)
    del a, b, mm
    release_memory()
    return {"what": "matmul_rate", "matrix_n": n, "dtype": dtype, "unit": "FLOP/s", **summarize(rates)}

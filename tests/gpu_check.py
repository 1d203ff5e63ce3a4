"""One prepared command for a GPU visit: `nox -s gpu -- OUT` (or `python3 tests/gpu_check.py OUT` where nox is
absent). GPU minutes are scarce, so everything the visit needs runs in one go, each step under its own time
limit, in this order:

  1. environment   nvidia-smi, the Python packages, the NVRTC the kernels compile with
  2. kernels       every CUDA kernel against nemoh's oracle (test_cupy_gpu.py -k kernel/gemv)
  3. gpu tests     the rest of test_cupy_gpu.py (the whole backend against the torch executor: load, prefill,
                   decode with CUDA graphs, state export/import, KV growth), and the CuPy stand-in's signatures
                   against the real CuPy (test_cupy_standin.py)
  4. conformance   `nemoh conformance --backend cupy,torch --device cuda --dtype float32,bfloat16` on every preset
  5. bench         `nemoh-bench --backend cupy,torch --dtype bfloat16 --device cuda` on nemotron-nano-9b-v2 and
                   nemotron-3-nano-30b-a3b, prompts 512 and 2048, contexts 128 and 2048

It needs python3 with torch, cupy and transformers (no lm-eval, no onnxruntime-gpu, no network) and nemoh
installed from its wheel, with this tests/ folder beside it; it installs nothing. It writes at most 8 files
to OUT: summary.md (what ran, how long, what it found, the device), the two bench reports (JSON and HTML),
the conformance report of tiny-moe (HTML; every preset's JSON/HTML is in the tarball), and logs.tar.gz.

`--dry-run` runs the same steps on the CPU (the CuPy stand-in for the kernel and GPU tests, cupy-emulated for
conformance and bench, small sizes), so that this script is itself tested in CI (`nox -s gpu -- --dry-run OUT`).
A step that fails or runs past its limit is recorded and the next step runs; the exit code is 0 only if every
step passed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

TESTS = Path(__file__).resolve().parent
#: in order; the NVFP4 one second: its packed GEMV and input quantizers have run on the CUDA emulator only
PRESETS = ("tiny-moe", "tiny-nano-30b-nvfp4", "tiny-nano-30b", "tiny-latent-moe", "tiny-8b", "tiny-dense", "tiny-list")
BENCH_MODELS = ("nemotron-nano-9b-v2", "nemotron-3-nano-30b-a3b")
#: seconds per step on an H200 (the whole run: at most 6 minutes). Measured there on 2026-12-04 (NOTES.md):
#: environment 8 s, kernels 24 s, gpu tests 41 s, conformance 28-36 s a preset (the fp64 oracle and transformers
#: run on the host), bench 70 s at 9B and about 80 s at 30B. The presets share one budget, in the order of
#: PRESETS; those it cannot reach are listed NOT RUN in the summary (run them as a second command)
BUDGET = {"environment": 15, "kernels": 40, "gpu tests": 60, "conformance": 115, "bench": 130}
#: the dry run on a 2-core CPU (CI): the same steps at small sizes
DRY_BUDGET = {"environment": 60, "kernels": 240, "gpu tests": 300, "conformance": 240, "bench": 240}


@dataclass
class Step:
    name: str
    commands: list[tuple[str, list[str], dict[str, str]]]  # (label, argv, extra env)
    results: list[dict] = field(default_factory=list)


def py(*args: str) -> list[str]:
    return [sys.executable, *args]


def steps(out: Path, dry: bool) -> list[Step]:
    work = out / "work"
    standin = {"NEMOH_CUPY_STANDIN": "1"} if dry else {}
    pytest = py("-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "--no-header", "-o", "addopts=")
    # the dry run (CI, 2 cores) runs a few of each, to run the script itself, not to re-check the kernels
    kernel_k = "test_kernel and bfloat16 and (add_rmsnorm or attention_decode) or gemv and M1" if dry else \
        "test_kernel or gemv"
    gpu_k = ("not test_kernel and not gemv and state_layout" if dry else "not test_kernel and not gemv")
    env_cmds = [("python", py("-c", "import sys, torch, numpy; print(sys.version); print('torch', "
                                    "torch.__version__, 'cuda', torch.cuda.is_available()); "
                                    "print('numpy', numpy.__version__)"), {}),
                ("packages", py("-c", "import importlib.metadata as m\nfor p in ('nemoh', 'cupy-cuda13x', "
                                      "'cupy-cuda12x', 'transformers', 'onnxruntime', 'lm_eval', 'safetensors'):\n "
                                      "try: print(p, m.version(p))\n except m.PackageNotFoundError: print(p, '-')"),
                 {}),
                ("nvrtc", py("-c", "from nemoh.backends import cupy_compile as cc; print(cc.find_toolchain())"), {})]
    if shutil.which("nvidia-smi"):
        env_cmds.insert(0, ("nvidia-smi", ["nvidia-smi"], {}))
    kernels = Step("kernels", [("kernel tests", [*pytest, str(TESTS / "backends/test_cupy_gpu.py"), "-k", kernel_k],
                                standin)])
    gpu = Step("gpu tests", [("backend tests", [*pytest, str(TESTS / "backends/test_cupy_gpu.py"), "-k", gpu_k],
                              standin),
                             ("stand-in vs CuPy", [*pytest, str(TESTS / "backends/test_cupy_standin.py"), "-k",
                                                   "signatures", "-s"], {})])
    # one cache for the command-line steps: the kernels compile once, each preset is written once
    cache = {"NEMOH_CACHE": str(work / "cache"), "NEMOH_EMU_SCHEDULES": "1"}
    conf = []
    presets = ("tiny-list",) if dry else PRESETS
    backends, device = ("cupy-emulated,torch", "cpu") if dry else ("cupy,torch", "cuda")
    dtypes = "float32" if dry else "float32,bfloat16"
    for p in presets:
        extra = ["--suite", "logits"] if dry else []
        conf.append((p, py("-m", "nemoh.cli", "conformance", "--model", p, "--backend", backends, "--device", device,
                           "--dtype", dtypes, "--no-progress", "--case-timeout", "120", *extra,
                           "--json", str(work / f"conformance-{p}.json"),
                           "--html", str(work / f"conformance-{p}.html")),
                     cache))
    bench = []
    for m in (("tiny-list",) if dry else BENCH_MODELS):
        sizes = (["--prompt-lengths", "16", "--context-depths", "16", "--decode-tokens", "2", "--repeats", "1",
                  "--warmup", "0", "--dtype", "float32"] if dry else
                 ["--prompt-lengths", "512", "2048", "--context-depths", "128", "2048", "--decode-tokens", "16",
                  "--repeats", "3", "--warmup", "1", "--dtype", "bfloat16"])
        bench.append((m, py("-m", "nemoh.bench.cli", "--backend", backends, "--model", m, "--device", device, *sizes,
                            "--no-progress", "--json", str(out / f"bench-{m}.json"), "--html",
                            str(out / f"bench-{m}.html")), cache))
    return [Step("environment", env_cmds), kernels, gpu, Step("conformance", conf), Step("bench", bench)]


def run_step(step: Step, budget: float, logs: Path) -> None:
    """Run the step's commands in order within `budget` seconds in all; each gets what is left."""
    t0 = time.monotonic()
    for label, argv, extra in step.commands:
        left = budget - (time.monotonic() - t0)
        log = logs / f"{step.name.replace(' ', '-')}--{label.replace(' ', '-')}.log"
        r = {"label": label, "command": " ".join(argv), "log": log.name}
        if left < 1:
            r.update(status="NOT RUN", seconds=0.0, note=f"the step's {budget:.0f} s were used up")
            step.results.append(r)
            continue
        t = time.monotonic()
        env = {**os.environ, **extra, "PYTHONUNBUFFERED": "1"}
        with open(log, "w") as f:
            f.write(f"$ {r['command']}\n")
            f.flush()
            try:
                p = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=left, cwd=TESTS.parent)
                r.update(status="OK" if p.returncode == 0 else f"EXIT {p.returncode}")
            except subprocess.TimeoutExpired:
                r.update(status="TIMEOUT", note=f"killed after {left:.0f} s (the step's budget)")
            except OSError as e:
                r.update(status="ERROR", note=str(e))
        r["seconds"] = round(time.monotonic() - t, 1)
        r["tail"] = last_lines(log)
        step.results.append(r)
        print(f"  {step.name:12s} {label:28s} {r['status']:10s} {r['seconds']:7.1f} s", flush=True)


def last_lines(log: Path, n: int = 3) -> list[str]:
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
    return lines[-n:]


def conformance_line(path: Path) -> str:
    try:
        r = json.loads(path.read_text())
    except (OSError, ValueError):
        return "no report"
    c = r["summary"]["counts"]
    worst = []
    for col, suites in r["summary"]["cells"].items():
        for suite, cell in suites.items():
            w = cell.get("worst_metric")
            if cell["status"] == "FAIL" or (w and suite == "logits"):
                worst.append(f"{col} {suite} {cell['status']}" + (f" {w['name']} {w['value']:.3g}" if w else ""))
    return f"{c['OK']} OK, {c['FAIL']} FAIL, {c['NOT_SUPPORTED']} NOT_SUPPORTED, {c['SKIPPED']} SKIPPED; " + \
        "; ".join(worst[:6])


def bench_lines(path: Path) -> list[str]:
    try:
        r = json.loads(path.read_text())
    except (OSError, ValueError):
        return ["no report"]
    ceil = r.get("ceilings") or {}
    cb, mm = (ceil.get("copy_bandwidth") or {}).get("p50"), (ceil.get("matmul_rate") or {}).get("p50")
    out = [f"device: {r['device'].get('name')}; measured copy bandwidth {cb and cb / 1e12:.3g} TB/s, "
           f"matmul {mm and mm / 1e12:.4g} TFLOP/s"]
    for e in r.get("backends", []):
        parts = [f"**{e['name']}** {e['status']}"]
        for w in e.get("prefill") or []:
            lim = w.get("limits") or {}
            parts.append(f"prefill T={w['prompt_length']}: {w['tokens_per_second']['p50']:.0f} tok/s, "
                         f"{lim.get('flops_fraction_of_probe', 0):.1%} of matmul, x ref {_x(w)}, "
                         f"gate {w['gate']['status']}")
        for w in e.get("decode") or []:
            lim = w.get("limits") or {}
            parts.append(f"decode S={w['context_depth']}: {w['tpot_seconds']['p50'] * 1e3:.2f} ms/token, "
                         f"{lim.get('bandwidth_fraction_of_probe', 0):.1%} of bandwidth, x ref {_x(w)}, "
                         f"gate {w['gate']['status']}")
        if e.get("error"):
            parts.append(f"error: {str(e['error'])[:300]}")
        out.append("; ".join(parts))
    return out


def _x(w: dict) -> str:
    r = w.get("ratio_to_reference")
    return "-" if r is None else f"{r:.2f}"


def summary(out: Path, all_steps: list[Step], dry: bool, wall: float, argv: list[str]) -> str:
    lines = [f"# nemoh GPU check{' (dry run on the CPU)' if dry else ''}", "",
             f"command: `{' '.join(argv)}`  ", f"wall: {wall:.0f} s  ",
             f"started: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
             "", "| step | command | status | seconds | last lines |", "|---|---|---|---|---|"]
    for s in all_steps:
        for r in s.results:
            tail = " / ".join(x.replace("|", "\\|")[:160] for x in r.get("tail", []))
            lines.append(f"| {s.name} | {r['label']} | {r['status']} | {r['seconds']} | {tail or r.get('note', '')} |")
    lines += ["", "## Conformance", ""]
    for p in (("tiny-list",) if dry else PRESETS):
        lines.append(f"- {p}: {conformance_line(out / 'work' / f'conformance-{p}.json')}")
    lines += ["", "## Bench", ""]
    for m in (("tiny-list",) if dry else BENCH_MODELS):
        lines.append(f"### {m}")
        lines += [f"- {x}" for x in bench_lines(out / f"bench-{m}.json")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="folder for the (at most 8) result files")
    ap.add_argument("--dry-run", action="store_true", help="the same steps on the CPU, at small sizes")
    ap.add_argument("--steps", default=",".join(BUDGET), help="comma-separated subset of: " + ", ".join(BUDGET))
    a = ap.parse_args(argv)
    out: Path = a.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "work").mkdir(exist_ok=True)
    logs = out / "work" / "logs"
    logs.mkdir(exist_ok=True)
    budget = DRY_BUDGET if a.dry_run else BUDGET
    wanted = [x.strip() for x in a.steps.split(",")]
    unknown = [x for x in wanted if x not in BUDGET]
    if unknown:
        print(f"gpu_check: unknown step {unknown[0]!r}; steps: {', '.join(BUDGET)}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    all_steps = [s for s in steps(out, a.dry_run) if s.name in wanted]
    for s in all_steps:
        print(f"{s.name} (budget {budget[s.name]} s)", flush=True)
        run_step(s, budget[s.name], logs)
    try:
        text = summary(out, all_steps, a.dry_run, time.monotonic() - t0, [Path(sys.executable).name, *sys.argv])
    except Exception as e:  # the results must come back whatever the summary's reading of them hits
        steps_text = "\n".join(f"- {s.name} / {r['label']}: {r['status']} in {r['seconds']} s"
                               for s in all_steps for r in s.results)
        text = f"# nemoh GPU check\n\nsummary failed ({type(e).__name__}: {e}); steps:\n\n{steps_text}\n"
    (out / "summary.md").write_text(text)
    if (out / "work" / "conformance-tiny-moe.html").is_file():
        shutil.copy(out / "work" / "conformance-tiny-moe.html", out / "conformance-tiny-moe.html")
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:  # the logs and reports, not the cache of presets
        tar.add(out / "work", arcname="gpu-check", filter=lambda t: None if "/cache" in t.name else t)
    shutil.rmtree(out / "work")
    print(text)
    ok = all(r["status"] == "OK" for s in all_steps for r in s.results)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Re-measure the figures in docs/bench/README.md on a shared machine.

    .venv/bin/python docs/bench/measure.py [MODEL ...]
    .venv/bin/python docs/bench/measure.py --table      # the README's tables, from the JSON files

For each model: wait until the 1-minute load average is below 1.0 (other people's tests share the
cores), run nemoh-bench, and run it again (up to 3 tries, keeping the quietest) when other
processes used more than a quarter of the CPUs during the run (`cpu_foreign_fraction`: the load
average cannot tell, it counts the benchmark's own threads). Each result lands in
docs/bench/MODEL.json; `--table` prints the README's table from those files (every figure there is
a field of one of them, only formatted). The JSON's `command` is the nemoh-bench command line with
its --json path set to the file's final name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent / "nemoh-bench"
MODELS = ["tiny-dense", "tiny-moe", "tiny-latent-moe", "tiny-list", "cpu-small", "cpu-small-moe"]
ARGS = ["--backend", "torch", "--prompt-lengths", "512", "2048", "--context-depths", "128", "2048",
        "--decode-tokens", "32", "--repeats", "5", "--warmup", "1", "--no-progress"]
QUIET, NOISY, TRIES, MAX_WAIT = 1.0, 0.25, 3, 1800


def wait_for_quiet() -> float:
    t0 = time.time()
    while os.getloadavg()[0] >= QUIET and time.time() - t0 < MAX_WAIT:
        time.sleep(15)
    return os.getloadavg()[0]


def measure(model: str) -> None:
    best = None
    for attempt in range(TRIES):
        load = wait_for_quiet()
        out = HERE / f".{model}.try{attempt}.json"
        cmd = [str(BIN), "--model", model, *ARGS, "--json", str(out)]
        print(f"[{model}] try {attempt + 1}, load {load:.2f}: {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, check=False)
        res = json.loads(out.read_text())
        worst = res["environment"]["cpu_foreign_fraction"]
        if best is None or worst < best[0]:
            best = (worst, out)
        if worst <= NOISY:
            break
    worst, out = best
    final = HERE / f"{model}.json"
    res = json.loads(out.read_text())
    res["command"] = " ".join(["nemoh-bench", "--model", model, *ARGS, "--json", f"docs/bench/{model}.json"])
    final.write_text(json.dumps(res, indent=1, allow_nan=False) + "\n")
    for p in HERE.glob(f".{model}.try*.json"):
        p.unlink()
    if model == "cpu-small":  # one example page, rendered from the kept JSON alone
        from nemoh.reports.bench_html import write_html

        write_html(res, HERE / f"{model}.html")
    print(f"[{model}] kept the run where others used {worst:.0%} of the CPUs -> {final}", flush=True)


def table() -> None:
    def ms(x):
        return f"{x * 1e3:.1f}"

    print("| model | params | load avg at start; others' CPU share | prefill T | TTFT p50 ms hf / torch (spread) | "
          "torch x hf | torch GFLOP/s | decode S | TPOT p50 ms hf / torch (spread) | torch x hf | torch GB/s | "
          "gate |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for m in MODELS:
        f = HERE / f"{m}.json"
        if not f.is_file():
            continue
        r = json.loads(f.read_text())
        hf, tb = (next(b for b in r["backends"] if b["name"] == n) for n in ("hf", "torch"))
        la = f"{r['environment']['loadavg_start'][0]:.2f}; {r['environment']['cpu_foreign_fraction']:.0%}"
        params = f"{r['model']['params_total'] / 1e6:.1f}M"
        for i in range(max(len(tb["prefill"]), len(tb["decode"]))):
            p = tb["prefill"][i] if i < len(tb["prefill"]) else None
            d = tb["decode"][i] if i < len(tb["decode"]) else None
            cells = [m if i == 0 else "", params if i == 0 else "", la if i == 0 else ""]
            if p:
                hp = hf["prefill"][i]
                cells += [str(p["prompt_length"]),
                          f"{ms(hp['ttft_seconds']['p50'])} / {ms(p['ttft_seconds']['p50'])} "
                          f"({p['ttft_seconds']['spread']:.0%})",
                          f"{p['ratio_to_reference']:.2f}", f"{p['limits']['achieved_flops'] / 1e9:.1f}"]
            else:
                cells += ["", "", "", ""]
            if d:
                hd = hf["decode"][i]
                cells += [str(d["context_depth"]),
                          f"{ms(hd['tpot_seconds']['p50'])} / {ms(d['tpot_seconds']['p50'])} "
                          f"({d['tpot_seconds']['spread']:.0%})",
                          f"{d['ratio_to_reference']:.2f}", f"{d['limits']['achieved_bandwidth_Bps'] / 1e9:.2f}"]
            else:
                cells += ["", "", "", ""]
            gates = [w["gate"]["status"] for w in (p, d) if w]
            cells.append("/".join(gates))
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if sys.argv[1:] == ["--table"]:
        table()
    else:
        for m in sys.argv[1:] or MODELS:
            measure(m)

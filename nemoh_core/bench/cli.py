"""The `nemoh-bench` command: arguments, the console table, the JSON and HTML outputs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from nemoh import display
from nemoh.bench.models import (
    BENCH_PRESETS,
    bench_preset_config,
)
from nemoh.bench.plan import REFERENCE, Settings
from nemoh.bench.run import run_bench
from nemoh.errors import NemohError, one_line
from nemoh.model.ir import build_graph
from nemoh.output import write_html, write_json

# ----------------------------------------------------------------------------------------------
# Printing

def _gate_text(gt: dict[str, Any]) -> str:
    st = gt["status"]
    if st == "WRONG":
        return f"WRONG@{gt['first_diverging_step']}"
    if st == "OK" and gt["near_ties"]:
        return f"OK(tie@{gt['first_diverging_step']})"
    return "ref" if st == "REFERENCE" else st


def format_report(result: dict[str, Any]) -> str:
    m, dev = result["model"], result["device"]
    nw = max([10, *(len(e["name"]) + 1 for e in result["backends"])])  # the backend column fits every name
    c = result["ceilings"]
    lines = [f"nemoh-bench  {m['name']} ({m['pattern']}, {m['params_total'] / 1e6:.1f}M params, "
             f"{m['params_active_per_token'] / 1e6:.1f}M active/token)  dtype={m['dtype']}  "
             f"batch={result['settings']['batch']}  device={dev['type']} {dev['name']}",
             f"ceilings (measured here): copy {display.si(c['copy_bandwidth']['p50'], 'B/s')}  "
             f"matmul {display.si(c['matmul_rate']['p50'], 'FLOP/s')} ({c['matmul_rate']['dtype']})"
             + (f"  datasheet: {dev['datasheet_key']}" if c.get("datasheet") else "  datasheet: none for this device"),
             ""]
    hdr = (f"{'prefill':<9}{'T':>6}  {'backend':<{nw}}{'gate':<13}{'TTFT p50':>10}{'p90':>9}{'p99':>9}{'spread':>8}"
           f"{'tok/s':>10}{'FLOP/s':>13}{'of probe':>9}{'x ref':>7}")
    lines.append(hdr + "   (times in ms)")
    for i, T in enumerate(result["settings"]["prompt_lengths"]):
        for e in result["backends"]:
            if not e["prefill"]:
                continue
            w = e["prefill"][i]
            t = w["ttft_seconds"]
            lines.append(f"{'':<9}{T:>6}  {e['name']:<{nw}}{_gate_text(w['gate']):<13}{display.ms(t['p50']):>10}"
                         f"{display.ms(t['p90']):>9}{display.ms(t['p99']):>9}{display.pct(t['spread']):>8}"
                         f"{w['tokens_per_second']['p50']:>10.1f}{display.si(w['limits']['achieved_flops'], ''):>13}"
                         f"{display.pct(w['limits']['flops_fraction_of_probe']):>9}"
                         f"{display.ratio(w['ratio_to_reference']):>7}")
    lines.append("")
    lines.append(f"{'decode':<9}{'S':>6}  {'backend':<{nw}}{'gate':<13}{'TPOT p50':>10}{'p90':>9}{'p99':>9}"
                 f"{'spread':>8}{'tok/s':>10}{'B/s':>13}{'of probe':>9}{'x ref':>7}")
    for i, S in enumerate(result["settings"]["context_depths"]):
        for e in result["backends"]:
            if not e["decode"]:
                continue
            w = e["decode"][i]
            t = w["tpot_seconds"]
            lines.append(f"{'':<9}{S:>6}  {e['name']:<{nw}}{_gate_text(w['gate']):<13}{display.ms(t['p50']):>10}"
                         f"{display.ms(t['p90']):>9}{display.ms(t['p99']):>9}{display.pct(t['spread']):>8}"
                         f"{w['tokens_per_second']['p50']:>10.1f}"
                         f"{display.si(w['limits']['achieved_bandwidth_Bps'], ''):>13}"
                         f"{display.pct(w['limits']['bandwidth_fraction_of_probe']):>9}"
                         f"{display.ratio(w['ratio_to_reference']):>7}")
    lines.append("")
    for e in result["backends"]:
        mem = e.get("memory") or {}
        peaks = [w["peak_memory_bytes"] for p in ("prefill", "decode") for w in e[p]
                 if w["peak_memory_bytes"] is not None]
        lines.append(f"{e['name']:<{nw}} {e['status']:<13} weights {display.si(mem.get('weights_bytes'), 'B'):>10}  "
                     f"peak {display.si(max(peaks) if peaks else None, 'B'):>10}"
                     + (f"  error: {e['error']}" if e.get("error") else ""))
    env = result["environment"]
    la = " ".join(f"{x:.2f}" for x in env["loadavg_start"] or [])
    lb = " ".join(f"{x:.2f}" for x in env["loadavg_end"] or [])
    fo = env.get("cpu_foreign_fraction")
    lines.append(f"load average {la} -> {lb}; CPU used by other processes during the run: "
                 f"{'-' if fo is None else f'{100 * fo:.0f}%'}; x ref = tok/s p50 / the reference's tok/s p50 "
                 "(same run)")
    for e in result["backends"]:
        if (e.get("describe") or {}).get("timings"):
            lines.append(f"{e['name']}: timings are {e['describe']['timings']}")
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
        from nemoh.output import check_output_paths
        from nemoh.runtime.session import check_device

        check_output_paths({"--json": args.json, "--html": args.html}, create_dirs=True)  # before the run
        if args.device is not None:
            check_device(args.device)
        s = Settings(model=args.model, backends=[b.strip() for v in args.backend for b in v.split(",") if b.strip()],
                     dtype=args.dtype, batch=args.batch, prompt_lengths=_ints(args.prompt_lengths),
                     decode_tokens=args.decode_tokens, context_depths=_ints(args.context_depths),
                     repeats=args.repeats, warmup=args.warmup, device=args.device, reference=args.reference,
                     seed=args.seed, progress=not args.no_progress)
        result = run_bench(s, argv)
        print(format_report(result))
        if args.json:
            write_json(result, args.json)
        if args.html:
            write_html(result, args.html, "bench-html")
        bad = [e for e in result["backends"] if e["status"] in ("WRONG", "ERROR")]
        return 1 if bad else 0
    except NemohError as e:
        print(f"nemoh-bench: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nemoh-bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The `nemoh` command line.

Exit codes: 0 success, 1 a check failed, 2 bad input or usage (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import NemohError


def _config_for(model: str):
    """The ModelConfig of a checkpoint directory, a config.json, or a preset (no weights needed)."""
    from .config import load_config, parse_config
    from .presets import PRESETS

    p = Path(model)
    if p.exists():
        return load_config(p)
    if model in PRESETS:
        return parse_config(PRESETS[model].config, f"preset {model}")
    from .presets import resolve_model

    return load_config(resolve_model(model))  # raises the did-you-mean error


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def cmd_inspect(args: argparse.Namespace) -> int:
    from .ir import build_graph

    config = _config_for(args.model)
    g = build_graph(config, args.dtype)
    if args.ir:
        print(g.to_text())
        return 0
    if args.ir_json:
        print(g.dumps())
        return 0
    layers = [{"index": l.index, "kind": l.kind, "params": l.param_count,
               "state_bytes_per_sequence": sum(s.nbytes for s in l.states if not s.per_token),
               "state_bytes_per_token": sum(s.nbytes for s in l.states if s.per_token)} for l in g.layers]
    summary = {
        "model": args.model, "source": config.source, "dtype": g.dtype, "pattern": config.pattern,
        "num_layers": config.num_layers, "layers": layers,
        "params_total": g.params_total, "params_by_kind": g.params_by_kind(),
        "state_bytes_per_sequence": g.state_bytes_per_sequence,
        "state_bytes_per_token": g.state_bytes_per_token,
        "sizes": {"hidden_size": config.hidden_size, "d_inner": config.d_inner, "conv_dim": config.conv_dim,
                  "mamba_heads": config.mamba_num_heads, "mamba_head_dim": config.mamba_head_dim,
                  "n_groups": config.n_groups, "ssm_state_size": config.ssm_state_size,
                  "attention_heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
                  "attention_head_dim": config.head_dim, "chunk_size": config.chunk_size,
                  "vocab_size": config.vocab_size},
    }
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    print(f"{args.model}: {config.num_layers} layers  {config.pattern}  dtype={g.dtype}")
    s = summary["sizes"]
    print(f"  D={s['hidden_size']} d_inner={s['d_inner']} conv_dim={s['conv_dim']} H={s['mamba_heads']} "
          f"P={s['mamba_head_dim']} G={s['n_groups']} N={s['ssm_state_size']} chunk={s['chunk_size']} | "
          f"attn Q={s['attention_heads']} KV={s['kv_heads']} Dh={s['attention_head_dim']} | V={s['vocab_size']}")
    print(f"\n  {'layer':>5}  {'kind':<10} {'params':>16}  {'state/seq':>12}  {'state/token':>12}")
    for l in layers:
        print(f"  {l['index']:>5}  {l['kind']:<10} {l['params']:>16,}  "
              f"{_human(l['state_bytes_per_sequence']) if l['state_bytes_per_sequence'] else '':>12}  "
              f"{_human(l['state_bytes_per_token']) if l['state_bytes_per_token'] else '':>12}")
    print("\n  params by kind:")
    for k, v in summary["params_by_kind"].items():
        print(f"    {k:<10} {v:>16,}")
    print(f"  params total:  {g.params_total:,}")
    print(f"  state per sequence (conv + ssm): {_human(g.state_bytes_per_sequence)} "
          f"({g.state_bytes_per_sequence:,} bytes)")
    print(f"  state per token of context (kv): {_human(g.state_bytes_per_token)} "
          f"({g.state_bytes_per_token:,} bytes)")
    return 0


def cmd_make_model(args: argparse.Namespace) -> int:
    from .presets import write_checkpoint

    out = write_checkpoint(args.preset, args.out, seed=args.seed, max_shard_size=args.max_shard_size)
    print(f"wrote {args.preset} to {out}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from .config import parse_config
    from .ir import build_graph
    from .presets import PRESETS

    for name, p in PRESETS.items():
        g = build_graph(parse_config(p.config, name), "float32")
        print(f"{name:<18} {g.config.pattern:<12} {g.params_total:>10,} params  {p.description}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .runtime import greedy_generate, open_model
    from .tokenizer import load_tokenizer

    if (args.prompt is None) == (args.ids is None):
        raise NemohError("give exactly one of --prompt TEXT or --ids 1,2,3")
    m = open_model(args.model, args.backend, args.dtype, args.device)
    for n in m.checkpoint.notices:
        print(f"note: {n}", file=sys.stderr)
    if args.ids is not None:
        try:
            ids = [int(x) for x in args.ids.split(",")]
        except ValueError:
            raise NemohError(f"--ids must be comma-separated integers, got {args.ids!r}") from None
        toks, _ = greedy_generate(m, [ids], args.max_new_tokens)
        print(",".join(str(t) for t in toks[0].tolist()))
        return 0
    tok = load_tokenizer(m.path)
    toks, _ = greedy_generate(m, [tok.encode(args.prompt)], args.max_new_tokens)
    print(args.prompt + tok.decode(toks[0].tolist()))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Load a checkpoint on a backend and check every tensor it holds is bit-equal to the file."""
    from .runtime import open_model

    m = open_model(args.model, args.backend, args.dtype, args.device)
    for n in m.checkpoint.notices:
        print(f"note: {n}")
    loaded = {t.name: m.backend.read_param(t.name) for t in m.graph.params}
    bad = m.checkpoint.mismatches(loaded)
    print(f"{len(loaded) - len(bad)}/{len(loaded)} tensors bit-equal to {m.path} "
          f"(backend {m.backend.name}, dtype {m.graph.dtype})")
    for name in bad:
        print(f"MISMATCH {name}")
    return 1 if bad else 0


def cmd_export_onnx(args: argparse.Namespace) -> int:
    """Lower a model's IR to ONNX: model.onnx plus model.onnx.data (the weights), checked."""
    from .backends.onnx_export import export_onnx

    path = export_onnx(args.model, args.out, args.dtype)
    print(f"wrote {path} (+ {path.name}.data, dtype {args.dtype}); passes onnx.checker and shape inference")
    return 0


def cmd_lm_eval(args: argparse.Namespace) -> int:
    """lm-eval's own command line, every argument passed through, with the `nemoh` model registered."""
    from .evals import lm_eval_cli

    return lm_eval_cli(args.args)


def cmd_eval(args: argparse.Namespace) -> int:
    """MMLU / GSM8K (or nemoh's fixture tasks) through lm-eval on a backend, offline only."""
    from .evals import print_report, run_eval

    if args.json is not None and not args.json.parent.exists():
        raise NemohError(f"{args.json.parent}: no such directory for the output file {args.json.name}")
    report = run_eval(args.model, args.backend, _csv(args.tasks), dtype=args.dtype, device=args.device,
                      limit=args.limit, num_fewshot=args.num_fewshot, data_dir=args.data_dir,
                      batch_size=args.batch_size, max_gen_toks=args.max_gen_toks, argv=["nemoh", *sys.argv[1:]])
    print_report(report)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse would print the usage too)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def cmd_conformance(args: argparse.Namespace) -> int:
    from .conformance import run_conformance
    from .report_io import write_html, write_json, write_junit

    for dt in _csv(args.dtype):
        if dt not in ("float64", "float32", "bfloat16", "float16"):
            raise NemohError(f"Unknown dtype '{dt}'. Available: float64, float32, bfloat16, float16")
    outputs = [p for p in (args.json, args.html, args.junit) if p]
    for p in outputs:  # fail before the run, not after it
        if p.exists() and p.is_dir():
            raise NemohError(f"{p}: is a directory, expected a file path")
        if not p.parent.exists():
            raise NemohError(f"{p.parent}: no such directory for the output file {p.name}")
    from .reference import quiet_transformers

    quiet_transformers()
    report = run_conformance(args.model, _csv(args.backend), _csv(args.dtype), _csv(args.suite) or None,
                             argv=["nemoh", *sys.argv[1:]] if args.argv is None else args.argv,
                             progress=not args.no_progress, device=args.device)
    print_table(report)
    if args.json:
        write_json(report, args.json)
    if args.html:
        write_html(report, args.html)
    if args.junit:
        write_junit(report, args.junit)
    return report["summary"]["exit_code"]


def print_table(report: dict) -> None:
    """Compact: suite x backend/dtype, each cell the suite's status and its worst metric vs tolerance."""
    runs = report["runs"]
    suites = [s["name"] for s in report["suites"]]
    cols = [f"{r['spec']}/{r['dtype']}" for r in runs]
    cells: dict[tuple[str, str], str] = {}
    for r, col in zip(runs, cols):
        for suite in suites:
            rs = [x for x in r["results"] if x["suite"] == suite]
            status = report["summary"]["matrix"][col].get(suite, "-")
            worst, ratio = None, -1.0
            for x in rs:
                w = x["worst_metric"]
                if w and w["tolerance"] is not None:
                    v, t = w["value"], w["tolerance"]
                    q = float("inf") if v is None else ((1 - v) / max(1 - t, 1e-300) if w["higher_is_better"]
                                                        else (v / t if t else (float("inf") if v else 0.0)))
                    if q > ratio:
                        worst, ratio = w, q
            n = sum(x["status"] == "OK" for x in rs)
            desc = f"{status} {n}/{len(rs)}"
            if worst:
                op = ">=" if worst["higher_is_better"] else "<="
                desc += f"  {worst['name']} {worst['value_repr']} ({op} {worst['tolerance']:.3g})"
            cells[(suite, col)] = desc
    w0 = max(len(s) for s in suites + ["suite"])
    widths = [max(len(c), *(len(cells[(s, c)]) for s in suites)) for c in cols]
    print(f"{report['model']['name']}  ({report['model']['pattern']}, {report['model']['params_total']:,} params)")
    print("  ".join([f"{'suite':<{w0}}"] + [f"{c:<{w}}" for c, w in zip(cols, widths)]))
    for s in suites:
        print("  ".join([f"{s:<{w0}}"] + [f"{cells[(s, c)]:<{w}}" for c, w in zip(cols, widths)]))
    for r, col in zip(runs, cols):
        for x in r["results"]:
            if x["status"] == "FAIL":
                loc = x.get("localisation") or {}
                where = (f"  -> first diverging: layer {loc['layer']} ({loc['kind']}), op {loc['op']}"
                         f" (call {loc['call'] + 1}/{loc['calls']})") if loc.get("found") else ""
                print(f"FAIL {col} {x['id']}: {x['message']}{where}")
    for r, col in zip(runs, cols):
        reasons = sorted({x["message"] for x in r["results"] if x["status"] in ("NOT_SUPPORTED", "SKIPPED")})
        for reason in reasons:
            print(f"not run {col}: {reason}")
    c = report["summary"]["counts"]
    print(f"{c['OK']} OK, {c['FAIL']} FAIL, {c['NOT_SUPPORTED']} NOT_SUPPORTED, {c['SKIPPED']} SKIPPED")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="nemoh", description="Conformance and benchmarking for Nemotron-H executors.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND", parser_class=_Parser)
    dtypes = ["float64", "float32", "bfloat16", "float16"]

    p = sub.add_parser("inspect", help="layer table, parameter count and state sizes of a model")
    p.add_argument("model", help="checkpoint directory, config.json, or preset name")
    p.add_argument("--dtype", choices=dtypes, help="compute dtype for byte counts (default: the config's)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.add_argument("--ir", action="store_true", help="print the graph IR as text")
    g.add_argument("--ir-json", action="store_true", help="print the graph IR as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("make-model", help="write a tiny random-weight checkpoint from a preset")
    p.add_argument("--preset", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int)
    p.add_argument("--max-shard-size", help="e.g. 50KB: write a sharded checkpoint with an index")
    p.set_defaults(func=cmd_make_model)

    p = sub.add_parser("presets", help="list the built-in model presets")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("generate", help="greedy text generation with a backend")
    p.add_argument("model")
    p.add_argument("--prompt", help="text, tokenised with the checkpoint's own tokenizer")
    p.add_argument("--ids", help="token ids instead of text, e.g. 1,45,300 (prints ids)")
    p.add_argument("-n", "--max-new-tokens", type=int, default=16)
    p.add_argument("--backend", default="torch")
    p.add_argument("--dtype", choices=dtypes)
    p.add_argument("--device")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("conformance", help="run the conformance suites on backends against the references")
    p.add_argument("--model", required=True, help="checkpoint directory or preset name")
    p.add_argument("--backend", required=True, help="NAME[,NAME...] or package.module:factory")
    p.add_argument("--dtype", default="float32", help="DTYPE[,DTYPE...] (default float32)")
    p.add_argument("--suite", default="", help="SUITE[,SUITE...] (default: all)")
    p.add_argument("--json", type=Path, help="write the results (schema: reports/conformance.schema.json)")
    p.add_argument("--html", type=Path, help="write a self-contained HTML report")
    p.add_argument("--junit", type=Path, help="write JUnit XML")
    p.add_argument("--device")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_conformance, argv=None)

    p = sub.add_parser("verify", help="check every loaded tensor is bit-equal to the checkpoint file")
    p.add_argument("model")
    p.add_argument("--backend", default="torch")
    p.add_argument("--dtype", choices=dtypes, help="load at this dtype (compared with the file cast to it)")
    p.add_argument("--device")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("export-onnx", help="lower a model to an ONNX graph (model.onnx + external weights)")
    p.add_argument("model", help="checkpoint directory or preset name")
    p.add_argument("--out", required=True, type=Path, help="directory to write model.onnx into")
    p.add_argument("--dtype", choices=dtypes, default="float32", help="compute dtype (default float32)")
    p.set_defaults(func=cmd_export_onnx)

    p = sub.add_parser("lm-eval", help="lm-eval's command line with the nemoh model registered (all arguments "
                       "passed through, e.g. --model nemoh --model_args pretrained=DIR,backend=onnx --tasks ...)",
                       add_help=False, prefix_chars="\0")  # nothing is ours to parse: --help goes to lm-eval
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_lm_eval)

    p = sub.add_parser("eval", help="MMLU / GSM8K through lm-eval on a backend, from local data only")
    p.add_argument("--model", required=True, help="checkpoint directory or preset name")
    p.add_argument("--backend", default="torch")
    p.add_argument("--tasks", required=True,
                   help="TASK[,TASK...]: mmlu, gsm8k, nemoh_mmlu_fixture, nemoh_gsm8k_fixture")
    p.add_argument("--dtype", choices=dtypes)
    p.add_argument("--device")
    p.add_argument("--limit", type=float, help="items per (sub)task; the result is then not a benchmark result")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: the task's own)")
    p.add_argument("--data-dir", type=Path, help="a Hugging Face datasets cache holding the tasks' data "
                   "(default: HF_DATASETS_CACHE or ~/.cache/huggingface/datasets)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-gen-toks", type=int, help="cap generated tokens (changes the task: not a benchmark result)")
    p.add_argument("--json", type=Path, help="write the results as JSON")
    p.set_defaults(func=cmd_eval)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except NemohError as e:
        print(f"nemoh: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nemoh: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())

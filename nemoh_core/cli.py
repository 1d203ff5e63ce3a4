"""The `nemoh` command line.

Exit codes: 0 success, 1 a check failed, 2 bad input or usage (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nemoh import display, dtypes, plugins
from nemoh.errors import NemohError, did_you_mean, one_line


def _config_for(model: str):
    """The ModelConfig of a checkpoint directory, a config.json, or a preset (no weights needed)."""
    from nemoh.model.config import load_config, parse_config
    from nemoh.model.presets import known_presets

    p = Path(model)
    if p.exists():
        return load_config(p)
    if model in known_presets():
        return parse_config(known_presets()[model].config, f"preset {model}")
    from nemoh.model.presets import resolve_model

    return load_config(resolve_model(model))  # raises the did-you-mean error


def cmd_inspect(args: argparse.Namespace) -> int:
    from nemoh.model.ir import build_graph
    from nemoh.model.quant_summary import quant_summary

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
        # params_total is transformers' model.num_parameters(); buffers_total the checkpoint tensors that
        # are buffers there (the router's e_score_correction_bias); checkpoint_tensors_total both
        "params_total": g.params_total, "buffers_total": g.buffers_total,
        "checkpoint_tensors_total": g.checkpoint_tensors_total, "params_by_kind": g.params_by_kind(),
        "state_bytes_per_sequence": g.state_bytes_per_sequence,
        "state_bytes_per_token": g.state_bytes_per_token,
        "sizes": {"hidden_size": config.hidden_size, "d_inner": config.d_inner, "conv_dim": config.conv_dim,
                  "mamba_heads": config.mamba_num_heads, "mamba_head_dim": config.mamba_head_dim,
                  "n_groups": config.n_groups, "ssm_state_size": config.ssm_state_size,
                  "attention_heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
                  "attention_head_dim": config.head_dim, "chunk_size": config.chunk_size,
                  "vocab_size": config.vocab_size},
        "quantization": quant_summary(args.model, g),
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
              f"{display.nbytes(l['state_bytes_per_sequence']) if l['state_bytes_per_sequence'] else '':>12}  "
              f"{display.nbytes(l['state_bytes_per_token']) if l['state_bytes_per_token'] else '':>12}")
    print("\n  params by kind:")
    for k, v in summary["params_by_kind"].items():
        print(f"    {k:<10} {v:>16,}")
    print(f"  params total:  {g.params_total:,}")
    if g.buffers_total:
        print(f"  buffers total: {g.buffers_total:,} (router correction bias; in the checkpoint, "
              f"{g.checkpoint_tensors_total:,} elements in all)")
    print(f"  state per sequence (conv + ssm): {display.nbytes(g.state_bytes_per_sequence)} "
          f"({g.state_bytes_per_sequence:,} bytes)")
    print(f"  state per token of context (kv): {display.nbytes(g.state_bytes_per_token)} "
          f"({g.state_bytes_per_token:,} bytes)")
    q = summary["quantization"]
    if q is not None:
        print(f"  quantization: {q['algo']} ({q['producer'] or 'producer unknown'}, {q['source']})"
              + (f", group size {q['group_size']}" if q["group_size"] else "") + f", KV cache {q['kv_cache']}")
        print(f"    quantized linears: {q['quantized_linears']} ({q['quantized_params']:,} params, "
              f"{q['quantized_bytes_per_param']:.4g} bytes each with scales); bytes per parameter overall "
              f"{q['bytes_per_param']:.4g} (unquantized tensors at {q['float_dtype']})")
        print(f"    exclude_modules: {', '.join(q['exclude_modules']) or '(none)'}")
        print(f"    kept unquantized: {', '.join(q['unquantized_linears'][:8]) or '(none)'}"
              + (f" and {len(q['unquantized_linears']) - 8} more" if len(q["unquantized_linears"]) > 8 else ""))
    return 0


def cmd_make_model(args: argparse.Namespace) -> int:
    from nemoh.bench.models import BENCH_PRESETS

    if args.config is None and args.preset not in BENCH_PRESETS:
        if args.num_layers is not None or args.dtype is not None:
            raise NemohError("--num-layers and --dtype apply to a real-size model (--config FILE or a bench "
                             f"preset: {', '.join(BENCH_PRESETS)}), not to the tiny preset {args.preset!r}")
        from nemoh.model.presets import write_checkpoint

        out = write_checkpoint(args.preset, args.out, seed=args.seed, max_shard_size=args.max_shard_size)
        print(f"wrote {args.preset} to {out}")
        return 0
    from nemoh.model.realsize import write_real_size

    what, out = write_real_size(args.config, args.preset, args.out, seed=args.seed or 0, dtype=args.dtype,
                                num_layers=args.num_layers, max_shard_size=args.max_shard_size)
    print(f"wrote {what} with random weights to {out}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from nemoh.model.config import parse_config
    from nemoh.model.ir import build_graph
    from nemoh.model.presets import all_presets, quant_presets

    for name, p in {**all_presets(), **quant_presets()}.items():
        g = build_graph(parse_config(p.config, name), "float32")
        print(f"{name:<20} {g.config.pattern:<12} {g.params_total:>10,} params  {p.description}")
    return 0


def _is_preset(model: str) -> bool:
    """`model` names a built-in preset (random weights), not a checkpoint on disk."""
    from nemoh.model.presets import known_presets

    return not Path(model).expanduser().exists() and model in known_presets()


def cmd_generate(args: argparse.Namespace) -> int:
    from nemoh.model.tokenizer import load_tokenizer
    from nemoh.runtime.session import check_device, check_fits, check_generation, check_ids, greedy_generate, open_model

    if (args.prompt is None) == (args.ids is None):
        raise NemohError("give exactly one of --prompt TEXT or --ids 1,2,3")
    if args.max_new_tokens < 1:
        raise NemohError(f"-n/--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    check_device(args.device)
    ids = None
    if args.ids is not None:
        try:
            ids = [int(x) for x in args.ids.split(",")]
        except ValueError:
            raise NemohError(f"--ids must be comma-separated integers, got {args.ids[:60]!r}") from None
        if any(abs(i) >= 1 << 62 for i in ids):
            raise NemohError(f"--ids: token id {next(i for i in ids if abs(i) >= 1 << 62)} is out of range")
    m = open_model(args.model, args.backend, args.dtype, args.device)
    for n in m.checkpoint.notices:
        print(f"note: {n}", file=sys.stderr)
    if ids is None:
        ids = load_tokenizer(m.path).encode(args.prompt)
    check_ids([ids], m.config.vocab_size)
    check_generation(m.config, len(ids), args.max_new_tokens)  # sizes up front: positions, then memory
    check_fits(m.graph, args.device, tokens=len(ids) + args.max_new_tokens)
    if _is_preset(args.model):  # after the input checks: a bad input's error stays the one line on stderr
        print(f"note: {args.model} is a preset with random weights: the tokens check the executor, they are not "
              "meaningful text", file=sys.stderr)
    if args.prompt is None:
        toks, _ = greedy_generate(m, [ids], args.max_new_tokens)
        print(",".join(str(t) for t in toks[0].tolist()))
        return 0
    tok = load_tokenizer(m.path)
    toks, _ = greedy_generate(m, [ids], args.max_new_tokens)
    text, escaped = display.printable(args.prompt + tok.decode(toks[0].tolist()))
    if escaped:
        print(f"note: {escaped} character{'s' if escaped != 1 else ''} shown as escapes: control characters as "
              "\\xNN, and \\ufffd where generated bytes are not valid UTF-8 on their own", file=sys.stderr)
    print(text)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Load a checkpoint on a backend and check every tensor it holds is bit-equal to the file."""
    from nemoh.runtime.session import check_device, open_model

    check_device(args.device)

    m = open_model(args.model, args.backend, args.dtype, args.device)
    for n in m.checkpoint.notices:
        print(f"note: {n}")
    loaded = {t.name: m.backend.read_param(t.name) for t in m.graph.params}
    bad = m.checkpoint.mismatches(loaded)
    print(f"{len(loaded) - len(bad)}/{len(loaded)} tensors bit-equal to {m.path} "
          f"(backend {m.backend.name}, dtype {m.graph.dtype})"
          + (" (quantized linears: dequantized exactly, then cast)" if m.checkpoint.quant is not None else ""))
    read_stored = getattr(m.backend, "read_stored", None)
    if m.checkpoint.quant is not None:
        if read_stored is None:
            print(f"note: backend {m.backend.name} does not expose the stored {m.checkpoint.quant.algo} codes and "
                  "scales (read_stored); only the dequantized weights were compared")
        else:
            from nemoh.model.weights import stored_mismatches

            n_stored, bad_stored = stored_mismatches(m.checkpoint, m.graph, read_stored)
            print(f"{n_stored - len(bad_stored)}/{n_stored} stored {m.checkpoint.quant.algo} codes and scales "
                  "bit-equal to the file")
            bad = bad + bad_stored
    for name in bad:
        print(f"MISMATCH {name}")
    return 1 if bad else 0


def cmd_lm_eval(args: argparse.Namespace) -> int:
    """lm-eval's own command line, every argument passed through, with the `nemoh` model registered."""
    from nemoh.eval.tasks import lm_eval_cli

    return lm_eval_cli(args.args)


def cmd_eval(args: argparse.Namespace) -> int:
    """MMLU / GSM8K (or nemoh's fixture tasks) through lm-eval on a backend, offline only."""
    from nemoh.eval.tasks import print_report, run_eval
    from nemoh.output import atomic_write, check_output_paths
    from nemoh.runtime.session import check_device

    check_output_paths({"--json": args.json})
    check_device(args.device)
    report = run_eval(args.model, args.backend, _csv(args.tasks), dtype=args.dtype, device=args.device,
                      limit=args.limit, num_fewshot=args.num_fewshot, data_dir=args.data_dir,
                      batch_size=args.batch_size, max_gen_toks=args.max_gen_toks, argv=["nemoh", *sys.argv[1:]])
    print_report(report)
    if args.json is not None:
        atomic_write(args.json, json.dumps(report, indent=1, default=str) + "\n")
    return 0


# `nemoh conformance` (nemoh.conformance.runner.EXIT_*); here so that --help imports no torch
CONFORMANCE_EXIT_CODES = """\
exit codes:
  0  every case that ran passed, and at least one case ran (NOT_SUPPORTED and SKIPPED do not fail)
  1  a case FAILed: out of tolerance, an exception (the message says whether the backend, the
     reference or the harness raised it), a timeout, or a crashed worker (--isolate)
  2  bad input or usage (one line on stderr): unknown or empty --backend/--dtype/--suite, a backend
     factory that exits or returns something that is not a backend, a preset that cannot be
     generated without an optional package
  3  nothing was checked: no case ran (all NOT_SUPPORTED or SKIPPED, e.g. --backend cupy without CUDA)
  4  the run was cut short: without --isolate a case ran past --case-timeout; that case is FAILed,
     the partial report (--json) lists the cases that never ran, and the process exits
     (if the hung call holds Python's interpreter lock, faulthandler ends the process 30 s later
     instead: exit 1, every thread's stack on stderr, the report as of the last finished case)
130  interrupted (Ctrl-C); the --json report written so far is kept, marked incomplete"""
DEFAULT_CASE_TIMEOUT = 600.0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse would print the usage too)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def cmd_conformance(args: argparse.Namespace) -> int:
    from nemoh.conformance.junit import write_junit
    from nemoh.conformance.runner import run_conformance
    from nemoh.output import write_html, write_json

    for flag, value in (("--backend", args.backend), ("--dtype", args.dtype), ("--suite", args.suite)):
        if value is not None and not _csv(value):  # `--dtype ,`, `--backend ''`: nothing to run is not a pass
            raise NemohError(f"{flag} {value!r} names nothing; give at least one"
                             f"{' (or leave --suite out to run all)' if flag == '--suite' else ''}")
    if not 0 <= args.case_timeout < float("inf"):  # NaN and inf too
        raise NemohError(f"--case-timeout must be >= 0 seconds (0: no limit), got {args.case_timeout:g}")
    for dt in _csv(args.dtype):
        if dt not in dtypes.NAMES:
            raise NemohError(did_you_mean("dtype", dt, dtypes.NAMES))
    from nemoh.output import check_output_paths
    from nemoh.runtime.session import check_device

    # fail before the run, not after it
    check_output_paths({"--json": args.json, "--html": args.html, "--junit": args.junit})
    check_device(args.device)
    from nemoh.conformance.memory import parse_size
    from nemoh.oracle.reference import quiet_transformers

    memory_limit = None if args.memory_limit is None else parse_size(args.memory_limit)
    quiet_transformers()
    report = run_conformance(args.model, _csv(args.backend), _csv(args.dtype),
                             None if args.suite is None else _csv(args.suite),
                             argv=["nemoh", *sys.argv[1:]] if args.argv is None else args.argv,
                             progress=not args.no_progress, device=args.device,
                             case_timeout=args.case_timeout, isolate=args.isolate, json_path=args.json,
                             oracle_mode=args.oracle, memory_limit=memory_limit)
    print_table(report)
    if args.json:
        write_json(report, args.json)
    if args.html:
        write_html(report, args.html, "conformance-html")
    if args.junit:
        write_junit(report, args.junit)
    return report["summary"]["exit_code"]


WIDTH = 120  # the console table never needs a wider terminal


def _lines(text: str, max_lines: int = 1, width: int = WIDTH) -> list[str]:
    """`text` as console lines of at most `width` columns: whitespace runs (newlines too) become one space,
    a long text wraps onto at most `max_lines` lines (continued 4 columns further in) and what is left
    is cut with ' ...' (the JSON keeps the whole text)."""
    import textwrap

    lead = text[:len(text) - len(text.lstrip(" "))]
    return textwrap.wrap(" ".join(text.split()), width=width, initial_indent=lead, subsequent_indent=lead + "    ",
                         max_lines=max_lines, placeholder=" ...", break_on_hyphens=False) or [lead]


def _cell(c: dict | None) -> str:
    if c is None:
        return "-"
    desc = f"{c['status']} {c['counts']['OK']}/{c['cases']}"
    w = c["worst_metric"]
    if w:
        op = ">=" if w["higher_is_better"] else "<="
        desc += f"  {w['name']} {w['value_repr']} ({op} {display.num(w['tolerance'])})"
    return desc


def print_table(report: dict) -> None:
    """Suite x backend/dtype, each cell the suite's status, its cases passed and its worst metric against
    its tolerance (the report's summary computes them); one block per backend/dtype when a grid would be
    wider than 120 columns. Then the failures grouped by where they start, and why cases did not run."""
    sm = report["summary"]
    suites = [s["name"] for s in report["suites"]]
    cols = [f"{r['spec']}/{r['dtype']}" for r in report["runs"]]
    text = {(s, c): _cell(sm["cells"].get(c, {}).get(s)) for s in suites for c in cols}
    print(f"{report['model']['name']}  ({report['model']['pattern']}, {report['model']['params_total']:,} params)")
    w0 = max(len(s) for s in suites + ["suite"])
    widths = [max(len(c), *(len(text[(s, c)]) for s in suites)) for c in cols]
    if w0 + sum(w + 2 for w in widths) <= WIDTH:
        print("  ".join([f"{'suite':<{w0}}"] + [f"{c:<{w}}" for c, w in zip(cols, widths)]).rstrip())
        for s in suites:
            print("  ".join([f"{s:<{w0}}"] + [f"{text[(s, c)]:<{w}}" for c, w in zip(cols, widths)]).rstrip())
    else:
        for c in cols:
            print(c)
            for s in suites:
                print(f"  {s:<{w0}}  {text[(s, c)]}"[:WIDTH])
    clipped = False

    def say(line: str, max_lines: int = 2) -> None:
        nonlocal clipped
        out = _lines(line, max_lines)
        clipped |= out != _lines(line, max_lines=len(line))
        print("\n".join(out))

    for g in sm["failure_groups"]:
        say(f"FAIL x{len(g['cases'])}, first diverging: {g['where']}")
        if len(g.get("sides") or []) > 1:
            say(f"  on {len(g['sides'])} sides: {'; '.join(g['sides'])}", max_lines=1)
        by_column: dict[str, dict[str, list[dict]]] = {}  # column -> message -> cases: one cause, one line
        for x in g["cases"]:
            by_column.setdefault(x["column"], {}).setdefault(x["message"], []).append(x)
        for col, messages in by_column.items():
            say(f"  {col}:")
            for message, xs in messages.items():
                if len(xs) == 1:  # an equivalence case's message starts with its side (the split)
                    say(f"    {xs[0]['id']}: {message}")
                else:
                    say(f"    x{len(xs)} cases ({', '.join(x['id'] for x in xs)}):", max_lines=1)
                    say(f"      {message}")
    for c, reasons in sm["not_run"].items():
        for x in reasons:
            say(f"not run {c} ({x['cases']} {x['status']}): {x['reason']}", max_lines=3)
    for u in report.get("unfinished") or []:
        print(f"never finished {u['spec']}/{u['dtype']} {u['id']}")
    c = sm["counts"]
    print(f"{c['OK']} OK, {c['FAIL']} FAIL, {c['NOT_SUPPORTED']} NOT_SUPPORTED, {c['SKIPPED']} SKIPPED")
    if clipped:
        print(f"(long messages cut to fit {WIDTH} columns; every message in full: --json, --html)")
    if sm.get("exit_code") == 3:
        print("nothing was checked: no case ran (every case NOT_SUPPORTED or SKIPPED); exit code 3")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="nemoh", description="Conformance and benchmarking for Nemotron-H executors.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND", parser_class=_Parser)
    dtype_names = list(dtypes.NAMES)

    p = sub.add_parser("inspect", help="layer table, parameter count and state sizes of a model")
    p.add_argument("model", help="checkpoint directory, config.json, or preset name")
    p.add_argument("--dtype", choices=dtype_names, help="compute dtype for byte counts (default: the config's)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.add_argument("--ir", action="store_true", help="print the graph IR as text")
    g.add_argument("--ir-json", action="store_true", help="print the graph IR as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("make-model", help="write a random-weight checkpoint: a tiny preset, or real shapes (a bench "
                       "preset or a released config.json), written tensor by tensor")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--preset", help="a tiny preset (nemoh presets) or a bench preset (e.g. nemotron-h-8b)")
    g.add_argument("--config", type=Path, help="a config.json (e.g. a released one): its exact shapes")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int)
    p.add_argument("--num-layers", type=int, help="real-size models: only the first N layers of the pattern")
    p.add_argument("--dtype", choices=dtype_names, help="real-size models: the stored dtype (default: the config's)")
    p.add_argument("--max-shard-size", help="e.g. 50KB: write a sharded checkpoint with an index "
                   "(real-size models are always sharded, 2 GiB by default)")
    p.set_defaults(func=cmd_make_model)

    p = sub.add_parser("presets", help="list the built-in model presets")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("generate", help="greedy text generation with a backend")
    p.add_argument("model")
    p.add_argument("--prompt", help="text, tokenised with the checkpoint's own tokenizer")
    p.add_argument("--ids", help="token ids instead of text, e.g. 1,45,300 (prints ids)")
    p.add_argument("-n", "--max-new-tokens", type=int, default=16)
    p.add_argument("--backend", default="torch")
    p.add_argument("--dtype", choices=dtype_names)
    p.add_argument("--device")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("conformance", help="run the conformance suites on backends against the references",
                       epilog=CONFORMANCE_EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory or preset name")
    p.add_argument("--backend", required=True, help="NAME[,NAME...] or package.module:factory")
    p.add_argument("--dtype", default="float32", help="DTYPE[,DTYPE...] (default float32)")
    p.add_argument("--suite", help="SUITE[,SUITE...] (default: all)")
    p.add_argument("--json", type=Path, help="write the results (schema: reports/conformance.schema.json)")
    p.add_argument("--html", type=Path, help="write a self-contained HTML report")
    p.add_argument("--junit", type=Path, help="write JUnit XML")
    p.add_argument("--device")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--case-timeout", type=float, default=DEFAULT_CASE_TIMEOUT, metavar="SECONDS",
                   help=f"time limit per case, and separately per localisation and backend load (default "
                   f"{DEFAULT_CASE_TIMEOUT:g}; 0: none). A case past it is FAILed; without --isolate the partial "
                   "report is written and the run ends (exit 4), with --isolate the worker is killed and the run "
                   "goes on")
    p.add_argument("--isolate", action="store_true",
                   help="run each backend/dtype's cases in a worker process: a case that hangs or crashes the "
                   "process (abort, SIGSEGV) is FAILed and the remaining cases run in a fresh worker")
    p.add_argument("--oracle", choices=("auto", "memory", "stream"), default="auto",
                   help="the fp64 oracle held in memory, or streamed block by block from the memory-mapped "
                   "checkpoint (bit-equal, one layer's fp64 parameters at a time); auto: in memory when it fits")
    p.add_argument("--memory-limit", metavar="SIZE",
                   help="plan the run within SIZE (e.g. 300MB, 20GiB) instead of what the machine has available; "
                   "a run that cannot fit is refused before it starts (exit 2, with the figures)")
    p.set_defaults(func=cmd_conformance, argv=None)

    p = sub.add_parser("verify", help="check every loaded tensor is bit-equal to the checkpoint file")
    p.add_argument("model")
    p.add_argument("--backend", default="torch")
    p.add_argument("--dtype", choices=dtype_names, help="load at this dtype (compared with the file cast to it)")
    p.add_argument("--device")
    p.set_defaults(func=cmd_verify)

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
    p.add_argument("--dtype", choices=dtype_names)
    p.add_argument("--device")
    p.add_argument("--limit", type=float, help="items per (sub)task; the result is then not a benchmark result")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: the task's own)")
    p.add_argument("--data-dir", type=Path, help="a Hugging Face datasets cache holding the tasks' data "
                   "(default: HF_DATASETS_CACHE or ~/.cache/huggingface/datasets)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-gen-toks", type=int, help="cap generated tokens (changes the task: not a benchmark result)")
    p.add_argument("--json", type=Path, help="write the results as JSON")
    p.set_defaults(func=cmd_eval)
    for register in plugins.load_all(plugins.COMMANDS).values():  # e.g. export-onnx, from nemoh.backends
        register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except NemohError as e:
        print(f"nemoh: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nemoh: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())

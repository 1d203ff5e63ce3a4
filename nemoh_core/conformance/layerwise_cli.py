"""`nemoh layerwise trace|check|merge`, registered under the nemoh.commands entry points.

trace: the engine's run, once, with its trace written to a folder. check: each layer of it against the fp64
oracle on the engine's own input (in shards, or as Ray tasks). merge: shard reports into one.

check and merge exit codes: 0 every part checked is OK, 1 a part FAILed (or a merge lacks a shard), 2 bad input,
3 nothing was checked. See nemoh.conformance.layerwise."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

EXIT_CODES = """\
exit codes:
  0  every layer (and the embedding and head, where checked) is within tolerance
  1  a layer, the embedding or the head FAILed; or a merge lacks part of its selection (a shard's report)
  2  bad input or usage (one line on stderr): a missing model or trace, a trace of another model,
     a bad --layers or --shard, reports of different traces or overlapping layers (merge)
  3  nothing was checked (e.g. a shard with no layers)"""


def register(sub: Any) -> None:
    p = sub.add_parser("layerwise", help="per-layer conformance against an engine's own trace: record once "
                       "(trace), check each layer against the fp64 oracle in shards or on Ray (check), join (merge)",
                       epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    lw = p.add_subparsers(dest="layerwise_command", metavar="{trace,check,merge}")
    lw.required = True

    t = lw.add_parser("trace", help="run a backend once on a seeded random prompt and write its trace to a folder")
    t.add_argument("--model", required=True, help="checkpoint directory or preset name")
    t.add_argument("--backend", required=True, help="a registered name or package.module:factory")
    t.add_argument("--dtype", required=True, help="the backend's compute dtype, e.g. float32 or bfloat16")
    t.add_argument("--out", required=True, type=Path, help="the folder to write trace.safetensors and manifest.json")
    t.add_argument("--batch", type=int, default=1, help="sequences in the prompt (default 1)")
    t.add_argument("--length", type=int, default=128, help="tokens per sequence (default 128)")
    t.add_argument("--seed", type=int, default=0, help="torch.Generator seed of the token ids (default 0)")
    t.add_argument("--device")
    t.set_defaults(func=cmd_trace)

    c = lw.add_parser("check", help="check each layer of a trace against the fp64 oracle on the engine's own input",
                      epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--model", required=True, help="the checkpoint directory or preset the trace was made from")
    c.add_argument("--trace", required=True, type=Path, help="a folder written by `nemoh layerwise trace`")
    c.add_argument("--layers", help="layer indices and ranges, e.g. 0-5,9 (default: every layer, plus the "
                   "embedding and the head)")
    c.add_argument("--shard", metavar="K/N", help="check only the K-th of N contiguous parts of the layer list "
                   "(1-based); the embedding goes with the first part, the head with the last")
    c.add_argument("--json", type=Path, help="write the report (schema nemoh-layerwise/1)")
    c.add_argument("--ray", metavar="ADDRESS", help="run each layer as a Ray task: 'local' starts Ray on this "
                   "machine, anything else is ray.init(address=ADDRESS); the model and the trace must be on "
                   "storage every node reads (pip install 'nemoh[ray]')")
    c.add_argument("--quiet", action="store_true", help="print only the summary line")
    c.set_defaults(func=cmd_check)

    m = lw.add_parser("merge", help="merge shard reports of one trace into the report of a single run",
                      epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("reports", nargs="+", type=Path, help="the shards' --json reports")
    m.add_argument("--json", type=Path, required=True, help="write the merged report")
    m.add_argument("--quiet", action="store_true", help="print only the summary line")
    m.set_defaults(func=cmd_merge)


def cmd_trace(args: argparse.Namespace) -> int:
    from nemoh.conformance.layerwise import write_trace

    man = write_trace(args.model, args.backend, args.dtype, args.out, batch=args.batch, length=args.length,
                      seed=args.seed, device=args.device)
    print(f"wrote {len(man['tensors'])} tensors of {man['num_layers']} layers ({man['backend']}, {man['dtype']}, "
          f"B={man['batch']} T={man['length']} seed={man['seed']}) to {args.out}")
    return 0


def _print(report: dict[str, Any], quiet: bool) -> None:
    from nemoh.conformance.layerwise import missing_note

    if not quiet:
        emb, head = report["embedding"], report["head"]
        if emb is not None:
            print(f"  {'embedding':<20} {emb['status']:<4}  {emb['error_repr']:>9} (tol {emb['tolerance']:.3g})")
        for r in report["layers"]:
            w = r["worst_op"]
            where = "" if r["status"] == "OK" or w is None else f"  worst op {w['op']} {w['error_repr']}"
            print(f"  layer {r['layer']:>3} {r['kind']:<10} {r['status']:<4}  {r['error_repr']:>9} "
                  f"(tol {r['tolerance']:.3g}){where}")
        if head is not None:
            bad = ", ".join(head["failed_metrics"])
            print(f"  {'head':<20} {head['status']:<4}" + (f"  out of tolerance: {bad}" if bad else ""))
    s, man = report["summary"], report["manifest"]
    first = "" if s["first_failing_layer"] is None else f", first failing layer {s['first_failing_layer']}"
    print(f"{man['backend']} {man['dtype']}: {s['checked'] - s['failed']}/{s['checked']} parts OK{first}")
    note = missing_note(report)
    if note:
        print(f"note: {note}", file=sys.stderr)


def cmd_check(args: argparse.Namespace) -> int:
    from nemoh.conformance.layerwise import run_check
    from nemoh.output import check_output_paths, write_json

    check_output_paths({"--json": args.json})
    report = run_check(args.model, args.trace, layers=args.layers, shard=args.shard, ray=args.ray)
    _print(report, args.quiet)
    if args.json is not None:
        write_json(report, args.json)
    return int(report["exit_code"])


def cmd_merge(args: argparse.Namespace) -> int:
    from nemoh.conformance.layerwise import merge
    from nemoh.output import check_output_paths, write_json

    check_output_paths({"--json": args.json})
    report = merge(args.reports)
    _print(report, args.quiet)
    write_json(report, args.json)
    return int(report["exit_code"])

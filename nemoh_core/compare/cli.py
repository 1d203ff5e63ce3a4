"""`nemoh compare BASE NEW` and `nemoh history DIR`, registered under the nemoh.commands entry points.

compare exit codes: 0 no regression by the --fail-on rules, 1 a regression, 2 bad input (not nemoh
reports, different schemas, kinds or models, a truncated, incomplete or hand-edited report): one line."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register_compare(sub: Any) -> None:
    p = sub.add_parser("compare", help="what changed between two runs (conformance or nemoh-bench reports, or "
                       "two folders of them paired by model), and whether it is a regression")
    p.add_argument("base", type=Path, help="the earlier report, or a folder of reports (e.g. main's artifacts)")
    p.add_argument("new", type=Path, help="the later report, or a folder of reports")
    p.add_argument("--fail-on", default="new-fail", metavar="RULES",
                   help="comma-separated: new-fail (default: a newly FAILing case or WRONG bench gate), "
                        "drift=X (a metric's share of its tolerance grew by > X points), "
                        "slowdown=Y (a speed figure > Y%% slower, significantly, on the valid comparison)")
    p.add_argument("--drift-flag", type=float, default=10.0, metavar="X",
                   help="flag (without failing) a metric whose share of tolerance grew by > X points (default 10)")
    p.add_argument("--allow-different-model", action="store_true", help="compare reports of different models")
    p.add_argument("--json", type=Path, help="write the comparison (schema reports/compare.schema.json)")
    p.add_argument("--html", type=Path, help="write a self-contained HTML page of the comparison")
    p.add_argument("--markdown", type=Path, help="write the short markdown summary (a pull-request comment)")
    p.add_argument("--quiet", action="store_true", help="do not print the markdown summary")
    p.set_defaults(func=cmd_compare)


def register_history(sub: Any) -> None:
    p = sub.add_parser("history", help="each headline figure over a folder of successive runs, with steps marked")
    p.add_argument("dir", type=Path, help="a folder of reports (one per run), or of one sub-folder per run")
    p.add_argument("--html", type=Path, default=Path("history.html"), help="the page to write (default history.html)")
    p.add_argument("--json", type=Path, help="also write the series as JSON")
    p.set_defaults(func=cmd_history)


def _outputs(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Path]:
    from nemoh.output import check_output_paths

    outs = {f"--{n}": getattr(args, n) for n in names if getattr(args, n, None) is not None}
    check_output_paths(outs)
    return outs


def cmd_compare(args: argparse.Namespace) -> int:
    from nemoh.output import atomic_write, write_html, write_json

    from . import markdown
    from .run import compare_paths

    outs = _outputs(args, ("json", "html", "markdown"))
    comp = compare_paths(args.base, args.new, args.fail_on, args.allow_different_model, args.drift_flag)
    text = markdown.render(comp)
    if "--json" in outs:
        write_json(comp, outs["--json"])
    if "--html" in outs:
        write_html(comp, outs["--html"], "compare-html")
    if "--markdown" in outs:
        atomic_write(outs["--markdown"], text)
    if not args.quiet:
        print(text, end="")
    return int(comp["verdict"]["exit_code"])


def cmd_history(args: argparse.Namespace) -> int:
    from nemoh.output import write_html, write_json

    from .history import history

    outs = _outputs(args, ("json", "html"))
    h = history(args.dir)
    if "--json" in outs:
        write_json(h, outs["--json"])
    write_html(h, outs["--html"], "history-html")
    steps = sum(len(s["steps"]) for s in h["series"])
    print(f"{len(h['runs'])} runs, {len(h['series'])} series, {steps} steps; wrote {outs['--html']}")
    return 0

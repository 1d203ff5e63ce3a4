"""Render a conformance JSON report as one self-contained HTML file.

It only renders: every number comes from the JSON (written by nemoh.conformance.runner); nothing is
computed here beyond formatting. Every string from the input is escaped (jinja2 autoescape), and
the page needs no network: inline CSS, no scripts.
"""

from __future__ import annotations

import json
import math
from importlib.resources import files
from typing import Any

from nemoh import display


def _err(v: Any) -> str:
    """An error value; the JSON holds null for a non-finite one (NaN or inf)."""
    return "NaN/inf" if v is None else display.num(v, 4)


def _bar(error: float | None, tolerance: float | None) -> int:
    """Bar width in percent on a log scale: tolerance sits at 50%; non-finite is a full bar."""
    if error is None:
        return 100
    if tolerance in (None, 0) or error <= 0:
        return 0 if not error else 100
    r = math.log10(error / tolerance)  # -inf..inf, 0 at the tolerance
    return int(max(1, min(100, 50 + 10 * r)))


def _detail(v: Any) -> str:
    """A detail value as text: numbers formatted, anything nested as compact JSON (non-ASCII escaped,
    so a generated text with odd bytes reads as the escapes it is, not as garbled glyphs)."""
    if isinstance(v, (dict, list)):
        return json.dumps(v, ensure_ascii=True, separators=(", ", ": "), default=str)
    if isinstance(v, str):
        return v if v.isascii() else json.dumps(v, ensure_ascii=True)
    return display.num(v, 4)


def render(report: dict[str, Any]) -> str:
    from jinja2 import Environment, StrictUndefined, select_autoescape

    env = Environment(autoescape=select_autoescape(default=True, default_for_string=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = display.num
    env.filters["bytes"] = lambda v: "-" if v is None else display.si(v, "B")
    env.filters["err"] = _err
    env.filters["detail"] = _detail
    env.globals["bar"] = _bar
    template = env.from_string((files("nemoh.reports") / "templates" / "conformance.html.j2").read_text("utf-8"))
    cols = [f"{r['spec']}/{r['dtype']}" for r in report["runs"]]
    # the rows that judged this run: its dtypes, plain or of the model's variant (every row is in the JSON)
    dts, var = {r["dtype"] for r in report["runs"]}, report["options"].get("tolerance_variant", "")
    tols = [t for t in report["tolerances"] if t["dtype"].split("+")[0] in dts
            and t["dtype"].partition("+")[2] in ("", var)]
    return template.render(r=report, cols=cols, suites=[s["name"] for s in report["suites"]], tols=tols,
                           tols_hidden=len(report["tolerances"]) - len(tols))

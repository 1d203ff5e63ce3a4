"""Render a conformance JSON report as one self-contained HTML file.

It only renders: every number comes from the JSON (written by nemoh.conformance); nothing is
computed here beyond formatting. Every string from the input is escaped (jinja2 autoescape), and
the page needs no network: inline CSS, no scripts.
"""

from __future__ import annotations

import math
from importlib.resources import files
from typing import Any


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v == 0 or (1e-3 <= abs(v) < 1e5):
            return f"{v:.4g}"
        return f"{v:.3e}"
    return str(v)


def _err(v: Any) -> str:
    """An error value; the JSON holds null for a non-finite one (NaN or inf)."""
    return "NaN/inf" if v is None else _fmt(v)


def _bar(error: float | None, tolerance: float | None) -> int:
    """Bar width in percent on a log scale: tolerance sits at 50%; non-finite is a full bar."""
    if error is None:
        return 100
    if tolerance in (None, 0) or error <= 0:
        return 0 if not error else 100
    r = math.log10(error / tolerance)  # -inf..inf, 0 at the tolerance
    return int(max(1, min(100, 50 + 10 * r)))


def render(report: dict[str, Any]) -> str:
    from jinja2 import Environment, StrictUndefined, select_autoescape

    env = Environment(autoescape=select_autoescape(default=True, default_for_string=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = _fmt
    env.filters["err"] = _err
    env.globals["bar"] = _bar
    template = env.from_string((files("nemoh.reports") / "templates" / "conformance.html.j2").read_text("utf-8"))
    cols = [f"{r['spec']}/{r['dtype']}" for r in report["runs"]]
    return template.render(r=report, cols=cols, suites=[s["name"] for s in report["suites"]])

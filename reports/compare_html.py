"""Render a comparison (`nemoh compare --json`, schema compare.schema.json) or a history (`nemoh history`)
as one self-contained HTML page.

It only renders: every figure and verdict comes from the JSON (nemoh.compare); the history's inline SVG
only maps the values it is given to pixels. Every string from the input is escaped (jinja2 autoescape),
and the page needs no network: inline CSS and SVG, no scripts.
"""

from __future__ import annotations

import math
from importlib.resources import files
from typing import Any

from nemoh import display

W, H, PAD = 560, 120, 8  # one history chart, in pixels


def _env() -> Any:
    from jinja2 import Environment, StrictUndefined, select_autoescape

    env = Environment(autoescape=select_autoescape(default=True, default_for_string=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = display.num
    env.filters["pct"] = lambda x: "-" if x is None else f"{x * 100:.3g}%"
    env.filters["si"] = display.si
    env.globals["chart"] = _chart
    return env


def _template(name: str) -> Any:
    return _env().from_string((files("nemoh.reports") / "templates" / name).read_text("utf-8"))


def _chart(values: list[float | None], steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Pixel positions of a series: the points, the polyline and a marker at each step."""
    ys = [v for v in values if v is not None and math.isfinite(v)]
    lo, hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
    if hi == lo:
        lo, hi = lo - 0.5 * (abs(lo) or 1), hi + 0.5 * (abs(hi) or 1)
    n = max(len(values) - 1, 1)

    def x(i: int) -> float:
        return round(PAD + (W - 2 * PAD) * i / n, 1)

    def y(v: float) -> float:
        return round(H - PAD - (H - 2 * PAD) * (v - lo) / (hi - lo), 1)

    pts = [(x(i), y(v)) for i, v in enumerate(values) if v is not None and math.isfinite(v)]
    return {"w": W, "h": H, "points": pts, "line": " ".join(f"{a},{b}" for a, b in pts),
            "steps": [x(s["index"]) - round((W - 2 * PAD) / n / 2, 1) for s in steps],
            "lo": display.num(lo), "hi": display.num(hi)}


def render(comparison: dict[str, Any]) -> str:
    return str(_template("compare.html.j2").render(c=comparison))


def render_history(hist: dict[str, Any]) -> str:
    return str(_template("compare_history.html.j2").render(h=hist))


if __name__ == "__main__":  # python -m nemoh.reports.compare_html compare.json out.html
    import json
    import sys
    from pathlib import Path

    data = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    page = render_history(data) if data.get("schema", "").startswith("nemoh-history") else render(data)
    Path(sys.argv[2]).write_text(page, encoding="utf-8")

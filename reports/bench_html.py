"""The nemoh-bench HTML page: rendered from the JSON result alone, self-contained, escaped.

    python -m nemoh.reports.bench_html result.json page.html

It computes nothing: every number on the page is a field of the JSON (formatted), and the plots
draw those fields (throughput vs prompt length, decode latency vs context depth, carried state and
peak memory vs context length). Plots are matplotlib PNGs embedded as base64 data URIs; the page
loads nothing from the network. Every string that comes from the input goes through the template's
autoescaping (HTML) and, inside a plot, through `_mpl_text` (matplotlib would read `$...$` as math).
"""

from __future__ import annotations

import base64
import io
import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from nemoh import display
from nemoh.bench.plan import FORMAT
from nemoh.output import atomic_write

TEMPLATE = "bench.html.j2"


def _mpl_text(s: Any) -> str:
    """Plain text for matplotlib: no mathtext, and no leading '_' (legend would hide the entry)."""
    s = str(s).replace("\\", "\\\\").replace("$", r"\$")
    return " " + s if s.startswith("_") else s


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _series(result: dict[str, Any], part: str, x_key: str, y_key: str, scale: float = 1.0):
    """Per backend: xs, p50s and (p10, p90) error bars of one statistic, straight from the JSON."""
    out = []
    for b in result["backends"]:
        rows = b.get(part) or []
        if not rows:
            continue
        xs = [r[x_key] for r in rows]
        p50 = [r[y_key]["p50"] * scale for r in rows]
        lo = [(r[y_key]["p50"] - r[y_key]["p10"]) * scale for r in rows]
        hi = [(r[y_key]["p90"] - r[y_key]["p50"]) * scale for r in rows]
        out.append((b["name"], xs, p50, lo, hi))
    return out


def plots(result: dict[str, Any]) -> dict[str, str]:
    """name -> base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs: dict[str, str] = {}

    def line_plot(series, title, xlabel, ylabel, logy=False):
        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        for name, xs, ys, lo, hi in series:
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=_mpl_text(name))
        ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if series:
            ax.legend()
        return _png(fig)

    figs["prefill"] = line_plot(_series(result, "prefill", "prompt_length", "tokens_per_second"),
                                "Prefill throughput (p50, bars p10-p90)", "prompt length (tokens)", "tokens / s")
    figs["decode"] = line_plot(_series(result, "decode", "context_depth", "tpot_seconds", 1e3),
                               "Decode latency per output token (p50, bars p10-p90)", "context depth (tokens)",
                               "ms / token")

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ir = result["state_memory"]["ir"]
    ax.plot([max(p["context"], 1) for p in ir], [p["bytes"] / 2 ** 20 for p in ir], color="black", lw=1.5,
            label="IR: per-sequence + context x per-token")
    by_backend: dict[str, list] = {}
    for p in result["state_memory"]["measured"]:
        by_backend.setdefault(p["backend"], []).append((p["context"], p["bytes"] / 2 ** 20))
    for name, pts in by_backend.items():
        pts.sort()
        ax.plot([x for x, _ in pts], [y for _, y in pts], "o", label=_mpl_text(f"measured: {name}"))
    ax.set_xscale("log", base=2)
    ax.set_title("Carried state vs context length")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("MiB")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    figs["state"] = _png(fig)

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    drawn = False
    for b in result["backends"]:
        for part, key, marker in (("prefill", "prompt_length", "o-"), ("decode", "context_depth", "s--")):
            rows = [r for r in (b.get(part) or []) if r["peak_memory_bytes"] is not None]
            if rows:
                ax.plot([r[key] for r in rows], [r["peak_memory_bytes"] / 2 ** 20 for r in rows], marker,
                        label=_mpl_text(f"{b['name']} {part}"))
                drawn = True
    ax.set_xscale("log", base=2)
    ax.set_title("Peak memory above the pre-load baseline (weights included)")
    ax.set_xlabel("prompt length / context depth (tokens)")
    ax.set_ylabel("MiB")
    ax.grid(True, which="both", alpha=0.3)
    if drawn:
        ax.legend()
    figs["memory"] = _png(fig)
    return figs


# -- formatting filters (presentation only) ----------------------------------------------------

def _num(x: Any, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _mib(x: Any) -> str:
    return "–" if x is None else f"{x / 2 ** 20:.1f}"


def _plain(v: Any) -> str:
    """A value as a person reads it, not as JSON: lists joined with commas, a nested mapping as
    `key value` pairs, None as a dash, booleans as yes/no."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, dict):
        return "; ".join(f"{k} {_plain(x)}" for k, x in v.items()) or "–"
    if isinstance(v, (list, tuple)):
        return ", ".join(_plain(x) for x in v) or "–"
    if isinstance(v, float):
        return display.num(v)
    return str(v)


def render(result: dict[str, Any]) -> str:
    """The page for one nemoh-bench result (a dict as written by nemoh-bench --json)."""
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    env.filters.update(si=display.si, ms=display.ms, pct=display.pct, num=_num, mib=_mib, plain=_plain)
    text = resources.files("nemoh.reports").joinpath("templates", TEMPLATE).read_text(encoding="utf-8")
    return env.from_string(text).render(r=result, plots=plots(result))


def write_html(result: dict[str, Any], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(p, render(result))
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m nemoh.reports.bench_html RESULT.json PAGE.html", file=sys.stderr)
        return 2
    try:
        result = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        print(f"bench_html: error: {argv[0]}: {e}", file=sys.stderr)
        return 2
    if result.get("format") != FORMAT:
        print(f"bench_html: error: {argv[0]}: not a {FORMAT} result", file=sys.stderr)
        return 2
    write_html(result, argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How numbers and progress look, in the terminal and in the HTML reports: one formatter per kind
of number and one progress helper, so a figure reads the same wherever it appears.

Presentation only: nothing here computes a result.
"""

from __future__ import annotations

import math
import sys
import unicodedata
from typing import Any

MISSING = "–"


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def num(x: Any, digits: int = 3) -> str:
    """A measured value: `digits` significant digits, exponent form outside [1e-3, 1e5); NaN/inf named."""
    if x is None:
        return MISSING
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return "NaN"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        if x == 0 or 1e-3 <= abs(x) < 1e5:
            return f"{x:.{digits}g}"
        return f"{x:.{max(digits - 1, 0)}e}"
    return str(x)


def si(x: Any, unit: str = "", digits: int = 3) -> str:
    """1.23e9 -> '1.23 G' + unit (k, M, G, T prefixes)."""
    if not _finite(x):
        return MISSING
    for p, f in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= f:
            return f"{x / f:.{digits}g} {p}{unit}"
    return f"{x:.{digits}g} {unit}".strip()


def nbytes(n: Any) -> str:
    """A size in bytes with binary prefixes: '1.50 GiB'."""
    if not _finite(n):
        return MISSING
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def ms(seconds: Any) -> str:
    """A duration in milliseconds, two decimals."""
    return MISSING if not _finite(seconds) else f"{seconds * 1e3:.2f}"


def pct(fraction: Any) -> str:
    """0.123 -> '12.3%'."""
    return MISSING if not _finite(fraction) else f"{100 * fraction:.1f}%"


def ratio(x: Any) -> str:
    """A speed ratio, '1.44x'."""
    return MISSING if not _finite(x) else f"{x:.2f}x"


def printable(text: str) -> tuple[str, int]:
    """`text` safe for a terminal: control and format characters (an escape sequence could rewrite the
    screen) and U+FFFD (bytes that did not decode as UTF-8 on their own) shown as their escapes
    (`\\x1f`, `\\ufffd`); newlines and tabs kept. Returns (text, how many characters were escaped)."""
    out, n = [], 0
    for ch in text:
        if ch in "\n\t" or (ch != "\ufffd" and unicodedata.category(ch)[0] != "C"):
            out.append(ch)
            continue
        n += 1
        o = ord(ch)
        out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}")
    return "".join(out), n


class _NoProgress:
    def update(self, n: int = 1) -> None: ...
    def set_description(self, desc: str) -> None: ...
    def close(self) -> None: ...
    def __enter__(self) -> _NoProgress:
        return self
    def __exit__(self, *exc: Any) -> None: ...


def progress(total: int, desc: str = "", unit: str = "it", enabled: bool = True):
    """A progress bar on stderr when it is a terminal and `enabled`; otherwise nothing at all.

    Returns an object with update(n), set_description(text), close(), usable as a context manager.
    """
    if not enabled:
        return _NoProgress()
    from tqdm import tqdm

    # disable=None: bars on a terminal only, never in CI logs
    return tqdm(total=total, desc=desc or None, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True,
                disable=None)

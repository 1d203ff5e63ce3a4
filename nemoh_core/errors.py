"""User-facing errors.

A `NemohError` is bad input or bad usage: the CLI prints its message as one line and exits 2,
without a traceback. The message names the file, field or tensor at fault and, where it can,
what to do about it. Anything else that escapes is a bug in nemoh and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class NemohError(Exception):
    """Bad input or usage; `str(err)` is a complete one-line message."""


class ConfigError(NemohError):
    """An invalid or inconsistent `config.json`."""


class WeightsError(NemohError):
    """A missing, unexpected, mis-shaped or unreadable checkpoint tensor."""


class InputError(NemohError):
    """Bad runtime input: token ids out of range, wrong shapes, a bad mask."""


def one_line(text: object) -> str:
    """`text` on one printable line: control characters (a newline inside a tensor name, a path or a
    key from a hostile file) are shown escaped, so an error message is always exactly one line."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


def did_you_mean(kind: str, name: str, choices: Iterable[str]) -> str:
    """"Unknown backend 'cupyy'. Did you mean: cupy? Available: cupy, onnx, torch"."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return f"Unknown {kind} '{name}'.{hint} Available: {', '.join(choices) or '(none)'}"

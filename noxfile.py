"""nox sessions. `nox` alone runs `tests`.

The CPU build of torch is pinned first in every session: an unpinned torch would pull the
multi-GB CUDA build (see README).
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True
TORCH = "torch==2.13.0"


def install(session: nox.Session, extras: str = "test") -> None:
    session.install(TORCH)
    session.install("-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """The default test run (the README's test command)."""
    install(session)
    session.run("pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "nemoh_core", "backends", "suites", "reports", "tests", "noxfile.py")


@nox.session
def tolerances(session: nox.Session) -> None:
    """Re-measure the figures quoted in nemoh/tolerances.py."""
    install(session)
    session.run("python", "-m", "nemoh.measure_tolerances", *session.posargs)

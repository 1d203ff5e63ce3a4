"""nox sessions. `nox` alone runs `tests`.

The CPU build of torch is pinned first in every session: an unpinned torch would pull the
multi-GB CUDA build (see README).
"""

from __future__ import annotations

from pathlib import Path

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
def conformance(session: nox.Session) -> None:
    """Every preset x every registered backend x (float32, bfloat16), into artifacts/conformance/.

    Per preset: PRESET.json (schema reports/conformance.schema.json), PRESET.html and PRESET.junit.xml.
    A backend that cannot run here (cupy without CUDA, onnx at bf16 on the CPU) reports NOT_SUPPORTED
    with its reason; only a FAIL fails the session. `nox -s conformance -- --backend torch` narrows it.
    """
    install(session)
    out = Path("artifacts/conformance")
    out.mkdir(parents=True, exist_ok=True)
    presets = session.run("python", "-c", "from nemoh.presets import PRESETS; print(' '.join(PRESETS))",
                          silent=True).split()
    backends = session.run("python", "-c", "from nemoh.registry import available_backends as a; "
                           "print(','.join(sorted(a())))", silent=True).strip()
    args = list(session.posargs) or ["--backend", backends]
    failed = []
    for preset in presets:
        try:
            session.run("nemoh", "conformance", "--model", preset, "--dtype", "float32,bfloat16", *args,
                        "--json", str(out / f"{preset}.json"), "--html", str(out / f"{preset}.html"),
                        "--junit", str(out / f"{preset}.junit.xml"), "--no-progress")
        except nox.command.CommandFailed:
            failed.append(preset)  # keep going: every preset gets its report
    if failed:
        session.error(f"conformance failed on: {', '.join(failed)} (see {out}/*.html)")


@nox.session(name="eval")
def eval_(session: nox.Session) -> None:
    """`nemoh eval` on nemoh's fixture tasks (MMLU- and GSM8K-style, offline) for the torch and onnx
    backends, into artifacts/eval/BACKEND.json. `nox -s eval -- ARGS` runs `nemoh eval ARGS` instead
    (e.g. `-- --model DIR --backend onnx --tasks mmlu,gsm8k --num-fewshot 5 --data-dir HF_DATASETS_CACHE`).
    """
    install(session)
    if session.posargs:
        session.run("nemoh", "eval", *session.posargs)
        return
    out = Path("artifacts/eval")
    out.mkdir(parents=True, exist_ok=True)
    for backend in ("torch", "onnx"):
        session.run("nemoh", "eval", "--model", "tiny-moe", "--backend", backend, "--dtype", "float32",
                    "--tasks", "nemoh_mmlu_fixture,nemoh_gsm8k_fixture", "--json", str(out / f"{backend}.json"))


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "nemoh_core", "backends", "suites", "reports", "tests", "noxfile.py")


@nox.session
def tolerances(session: nox.Session) -> None:
    """Re-measure the figures quoted in nemoh/tolerances.py."""
    install(session)
    session.run("python", "-m", "nemoh.measure_tolerances", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """nemoh-bench: the PyTorch executor against the transformers reference (docs/bench/README.md).

    `nox -s bench` measures the small CPU preset into artifacts/bench/; `nox -s bench -- ARGS` runs
    `nemoh-bench ARGS` instead (e.g. `-- --backend torch --model tiny-moe --prompt-lengths 512 2048`).
    """
    install(session)
    args = session.posargs or ["--backend", "torch", "--model", "cpu-small", "--prompt-lengths", "512", "2048",
                               "--context-depths", "128", "2048", "--json", "artifacts/bench/cpu-small.json",
                               "--html", "artifacts/bench/cpu-small.html"]
    session.run("nemoh-bench", *args)

"""Who made an error: the backend, the references (fp64 oracle, transformers) or the harness. An
exception becomes a FAIL charged to its source, read from where it was raised."""

from __future__ import annotations

import inspect
import os
import re
import traceback
from pathlib import Path
from typing import Any

from nemoh.conformance.case import Case, Result, Status
from nemoh.runtime.backend import BackendError
from nemoh.runtime.registry import optional_hint

# ----------------------------------------------------------------------------------------------

_REFERENCE_PARTS = ("/nemoh/oracle/", "/nemoh_core/oracle/", "/transformers/", "/nemoh/conformance/deviations.py",
                    "/nemoh_core/conformance/deviations.py")
_REFERENCE_FUNCS = {"_oracle", "oracle_logits", "params", "hf", "hf_logits", "hf_generate"}  # Reference, Ctx


def files_of_backend(backend: Any) -> set[str]:
    """The source files of the backend's class and its bases (and nemoh's BackendBase wrappers)."""
    files = set()
    for cls in type(backend).__mro__:
        if cls is object or cls.__module__ in ("builtins", "typing"):
            continue
        try:
            f = inspect.getsourcefile(cls)
        except (TypeError, OSError):
            f = None
        if f:
            files.add(os.path.realpath(f))
    return files


def frames_of(summaries) -> list[dict]:
    return [{"file": f.filename, "line": f.lineno, "func": f.name} for f in summaries]


_FH_LINE = re.compile(r'^\s*File "(?P<file>.*)", line (?P<line>\d+) in (?P<func>\S+)')


def parse_faulthandler(text: str) -> list[dict]:
    """faulthandler's dump (most recent call first) -> frames outermost first, like a traceback."""
    frames = [{"file": m["file"], "line": int(m["line"]), "func": m["func"]}
              for m in map(_FH_LINE.match, text.splitlines()) if m]
    if "Current thread" in text or "Thread 0x" in text:  # keep the last dump only
        last = text.rfind("Current thread") if "Current thread" in text else text.rfind("Thread 0x")
        frames = [{"file": m["file"], "line": int(m["line"]), "func": m["func"]}
                  for m in map(_FH_LINE.match, text[last:].splitlines()) if m]
    return frames[::-1]


def classify_frames(frames: list[dict], backend_files: set[str]) -> str:
    """'backend' when the backend's code is on the stack, else 'reference' when the oracle or
    transformers is, else 'harness'; 'unknown' when there is no stack at all."""
    if not frames:
        return "unknown"
    real = [os.path.realpath(f["file"]) if f["file"] and not f["file"].startswith("<") else f["file"] for f in frames]
    if any(r in backend_files for r in real):
        return "backend"
    for f, r in zip(frames, real):
        norm = r.replace(os.sep, "/")
        if any(part in norm for part in _REFERENCE_PARTS):
            return "reference"
        if norm.endswith("/conformance/runner.py") and f["func"] in _REFERENCE_FUNCS:
            return "reference"
    return "harness"


def _innermost_tb(e: BaseException) -> list[dict]:
    """The frames of the exception and of the chain it was raised from, outermost first."""
    frames = frames_of(traceback.extract_tb(e.__traceback__))
    inner = e.__cause__ or e.__context__
    seen = {id(e)}
    while inner is not None and id(inner) not in seen:
        seen.add(id(inner))
        frames += frames_of(traceback.extract_tb(inner.__traceback__))
        inner = inner.__cause__ or inner.__context__
    return frames


def error_source(e: BaseException, backend: Any) -> str:
    if isinstance(e, BackendError):
        return "backend"
    return classify_frames(_innermost_tb(e), files_of_backend(backend))


def missing_module(e: BaseException) -> str | None:
    """The module a ModuleNotFoundError in `e` or its chain names, else None."""
    seen = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ModuleNotFoundError):
            return cur.name
        cur = cur.__cause__ or cur.__context__
    return None


def describe_exc(e: BaseException) -> str:
    if isinstance(e, SystemExit):
        return f"SystemExit({e.code!r}) (sys.exit was called)"
    if isinstance(e, BackendError) and e.__cause__ is not None:
        c = e.__cause__
        first = f"{type(c).__name__}: {(str(c).splitlines() or [''])[0]}"
        # the wrapper's own context only: its message already ends with the cause (said once here)
        context = getattr(e, "context", "") or (str(e).splitlines() or [""])[0]
        if context.endswith(first):
            context = context[:-len(first)].rstrip(": ")
        return f"{first} [{context}]" if context and context != first else first
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


def _where(frames: list[dict]) -> str:
    if not frames:
        return ""
    f = frames[-1]
    return f"{Path(f['file']).name}:{f['line']} in {f['func']}"


_BLAME = {
    "backend": "backend raised {e}",
    "reference": "reference raised {e} (not the backend: the fp64 oracle or transformers failed)",
    "harness": "harness error {e} (not the backend: a bug in nemoh or in the suite)",
    "unknown": "error {e}",
}


def error_result(case: Case, e: BaseException, backend: Any) -> Result:
    """A case whose run raised: SKIPPED when an optional package is missing (with the pip extra),
    else FAIL charged to the backend, the reference or the harness (details.error_source)."""
    frames = _innermost_tb(e)
    source = error_source(e, backend)
    missing = missing_module(e)
    hint = optional_hint(missing)
    details = {"exception": type(e).__name__, "error_source": source, "error_kind": "exception",
               "where": _where(frames)}
    if missing and hint:
        details.update(missing_module=missing, install=hint)
        return Result(case, Status.SKIPPED, message=f"needs the module '{missing}', which is not installed: {hint}",
                      details=details)
    return Result(case, Status.FAIL, message=_BLAME[source].format(e=describe_exc(e)), details=details)


def timeout_result(case: Case, timeout: float, stack: list[dict], backend_files: set[str], *,
                    isolated: bool = False, what: str = "") -> Result:
    source = classify_frames(stack, backend_files)
    where = f" in {_where(stack)}" if stack else ""
    after = ("the worker was killed; the remaining cases run in a fresh worker (the backend reloaded)" if isolated
             else "the run stops here")
    msg = f"{what or 'case'} timed out after {timeout:g} s (--case-timeout){where}, charged to: {source}; {after}"
    return Result(case, Status.FAIL, message=msg,
                  details={"error_source": source, "error_kind": "timeout", "timeout_s": timeout,
                           "where": _where(stack), "stack": [f"{_where([f])}" for f in stack[-12:]]},
                  localisation={"available": False,
                                "reason": "not localised: the case timed out (a replay would hang again)"})


def crash_result(case: Case, death: str, stack: list[dict], backend_files: set[str]) -> Result:
    source = classify_frames(stack, backend_files)
    where = f" in {_where(stack)}" if stack else ""
    msg = (f"the worker process died ({death}){where}, charged to: {source}; the remaining cases run in a "
           "fresh worker (the backend reloaded)")
    return Result(case, Status.FAIL, message=msg,
                  details={"error_source": source, "error_kind": "crash", "death": death, "where": _where(stack),
                           "stack": [f"{_where([f])}" for f in stack[-12:]]},
                  localisation={"available": False, "reason": "not localised: the case crashed its worker process"})

"""Running one case: the suites of a run, the per-case bookkeeping, a case run with its time limit,
then localised when it fails."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any

from nemoh import plugins
from nemoh.conformance.blame import describe_exc, error_result, error_source, missing_module
from nemoh.conformance.case import Case, Result, Status, Suite
from nemoh.conformance.localise import localise
from nemoh.conformance.references import Ctx
from nemoh.conformance.summary import summarize
from nemoh.errors import NemohError, did_you_mean
from nemoh.runtime.backend import ModelNotSupported
from nemoh.runtime.registry import optional_hint

# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

def select_suites(names: list[str] | None) -> list[Suite]:
    """The suites registered under the `nemoh.suites` entry points (all, or those named), in report order."""
    suites = {s.name: s for s in sorted(plugins.load_all(plugins.SUITES).values(), key=lambda s: (s.order, s.name))}
    if not names:
        return list(suites.values())
    out = []
    for n in names:
        if ":" in n:  # an unregistered suite, `package.module:SUITE`
            out.append(plugins.load(plugins.SUITES, n))
            continue
        if n not in suites:
            raise NemohError(did_you_mean("suite", n, suites))
        out.append(suites[n])
    return out


#: exit codes of `nemoh conformance`, also in report["summary"]["exit_code"]
DEFAULT_CASE_TIMEOUT = 600.0
#: without --isolate, if the watchdog thread itself can't run (a C call holding the GIL), faulthandler
#: ends the process this long after the case's limit, printing every thread's stack
FAULTHANDLER_GRACE = 30.0


def load_failed_result(case: Case, kind: str, reason: str, source: str) -> Result:
    if kind == "missing":
        return Result(case, Status.NOT_SUPPORTED, message=reason, details={"error_source": "environment"})
    if kind == "unsupported":  # the backend read the checkpoint and cannot run it (ModelNotSupported)
        return Result(case, Status.NOT_SUPPORTED, message=reason,
                      details={"error_source": source, "error_kind": "load"})
    who = "backend failed to load" if source == "backend" else f"loading the model failed ({source}, not the backend)"
    return Result(case, Status.FAIL, message=f"{who}: {reason}", details={"error_source": source, "error_kind": "load"})


def load_failure(e: BaseException, backend: Any) -> tuple[str, str, str]:
    """("missing", reason, "environment") for a missing optional package, ("unsupported", reason, "backend") for a
    backend's ModelNotSupported, else ("fail", "Type: message", source)."""
    cur: BaseException | None = e
    while cur is not None:
        if isinstance(cur, ModelNotSupported):
            return "unsupported", str(cur), "backend"
        cur = cur.__cause__
    missing = missing_module(e)
    hint = optional_hint(missing)
    if missing and hint:
        return "missing", f"needs the module '{missing}', which is not installed: {hint}", "environment"
    return "fail", describe_exc(e), error_source(e, backend)


class Book:
    """The report as cases finish: results appended, the unfinished list and summary kept current,
    the JSON rewritten atomically after every case (when a path is given)."""

    def __init__(self, report: dict, path: Path | None, plan: list[tuple[str, str, list[str]]]):
        self.report, self.path = report, path
        self.plan = [(spec, dtype, list(ids)) for spec, dtype, ids in plan]
        self.lock = threading.RLock()

    def record(self, idx: int, run: dict, res_json: dict) -> None:
        with self.lock:
            run["results"].append(res_json)
            ids = self.plan[idx][2]
            if res_json["id"] in ids:
                ids.remove(res_json["id"])
            self.write()

    def write(self, complete: bool = False) -> None:
        with self.lock:
            r = self.report
            r["unfinished"] = [{"spec": spec, "dtype": dtype, "id": i} for spec, dtype, ids in self.plan for i in ids]
            r["complete"] = complete and not r["unfinished"] and not r["aborted"]
            r["summary"] = summarize(r)
            if self.path is not None:
                from nemoh.output import write_json

                write_json(r, self.path)


# ----------------------------------------------------------------------------------------------
# Time limits without --isolate: a watchdog thread that FAILs the case, writes the partial report
# and ends the process (the hung call can't be interrupted, nor its backend reused)
def run_case(suite: Suite, case: Case, ctx: Ctx, limit=None) -> Result:
    limit = limit or no_limit
    t0 = time.perf_counter()
    with limit(kind="case", case=case):
        res = execute_case(suite, case, ctx)
    if res.status is Status.FAIL and suite.scenario is not None:
        with limit(kind="localisation", result=res):
            res.localisation = localise_case(suite, res, ctx)
    res.duration_s = time.perf_counter() - t0
    return res


def execute_case(suite: Suite, case: Case, ctx: Ctx) -> Result:
    """The suite's verdict on the case; an exception is charged to whoever raised it."""
    try:
        return suite.run(case, ctx)
    except NemohError:
        raise
    except (Exception, SystemExit) as e:
        return error_result(case, e, ctx.model.backend)


def localise_case(suite: Suite, res: Result, ctx: Ctx) -> dict[str, Any]:
    """Localise a FAIL on every side its scenario names (an equivalence case has two: the bug may be on
    either), and report the first side where a layer leaves tolerance or NaN/inf appears."""
    if suite.scenario is None:
        return {"available": False, "reason": f"suite {suite.name} names no forward calls to replay"}
    try:
        sides = suite.scenario(res, ctx)
        sides = sides if isinstance(sides, dict) else {"": sides}
        loc: dict[str, Any] = {}
        for name, forwards in sides.items():
            loc = localise(ctx, forwards)
            if name:
                loc["side"], loc["sides_checked"] = name, list(sides)[:list(sides).index(name) + 1]
            if loc.get("found") or loc.get("non_finite") or not loc.get("available"):
                return loc
        if len(sides) > 1:
            loc["message"] = (f"every layer is within tolerance when checked in isolation, on each side "
                              f"({', '.join(sides)}); the error is in the embedding or the head, or builds up "
                              "from within-tolerance differences")
        return loc
    except Exception as e:
        return {"available": False, "reason": f"localisation itself failed: {type(e).__name__}: {e}"}


@contextlib.contextmanager
def no_limit(*_a, **_k):
    yield

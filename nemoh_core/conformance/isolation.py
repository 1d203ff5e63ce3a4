"""Keeping a run alive and honest when a backend hangs or crashes: the per-case time limit (a watchdog
without --isolate; a worker process per backend/dtype with --isolate, restarted after a crash)."""

from __future__ import annotations

import contextlib
import faulthandler
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from nemoh.conformance.blame import (
    classify_frames,
    crash_result,
    files_of_backend,
    frames_of,
    parse_faulthandler,
    timeout_result,
)
from nemoh.conformance.case import Status, jsonable
from nemoh.conformance.execute import (
    FAULTHANDLER_GRACE,
    Book,
    execute_case,
    load_failed_result,
    load_failure,
    localise_case,
    select_suites,
)
from nemoh.conformance.references import Ctx, Reference
from nemoh.conformance.summary import EXIT_ABORTED
from nemoh.errors import NemohError
from nemoh.model.config import load_config
from nemoh.model.ir import build_graph
from nemoh.runtime.registry import get_backend
from nemoh.runtime.session import open_model

# ----------------------------------------------------------------------------------------------



class Watchdog:
    def __init__(self, on_expire):
        self._on_expire = on_expire
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._info: dict | None = None
        self._closed = False
        self._main = threading.get_ident()
        self._thread = threading.Thread(target=self._loop, name="nemoh-case-watchdog", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def limit(self, seconds: float | None, **info):
        if not seconds:
            yield
            return
        with self._cond:
            self._deadline, self._info = time.monotonic() + seconds, info
            self._cond.notify()
        _faulthandler_arm(seconds + FAULTHANDLER_GRACE)
        try:
            yield
        finally:
            _faulthandler_cancel()
            with self._cond:
                self._deadline, self._info = None, None
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _loop(self) -> None:
        with self._cond:
            while not self._closed:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                # still holding the lock: the main thread can't leave the case (and record it) meanwhile
                frame = sys._current_frames().get(self._main)
                stack = frames_of(traceback.extract_stack(frame)) if frame is not None else []
                self._on_expire(self._info, stack)  # writes the report and ends the process
                return


def _faulthandler_arm(seconds: float) -> None:
    try:
        # sys.__stderr__ is None under pythonw-style launchers; faulthandler then wants sys.stderr
        faulthandler.dump_traceback_later(seconds, exit=True, file=sys.__stderr__ or sys.stderr)
    except (ValueError, AttributeError, OSError, RuntimeError):
        pass


def _faulthandler_cancel() -> None:
    try:
        faulthandler.cancel_dump_traceback_later()
    except (ValueError, RuntimeError):
        pass


def abort_on_timeout(book: Book, timeout: float, bar, info: dict, stack: list[dict]) -> None:
    """The watchdog fired: charge the case (or load, or localisation), write the report, exit."""
    kind, run, idx, files = info["kind"], info["run"], info["idx"], info["files"]
    report = book.report
    with book.lock:
        if kind == "load":
            reason = f"load timed out after {timeout:g} s (--case-timeout)"
            run["load_error"] = reason
            cases = info["cases"]
            first = cases[0][1]
            book.record(idx, run, timeout_result(first, timeout, stack, files, what="the backend's load").to_json())
            what = f"loading {run['spec']}/{run['dtype']}"
        elif kind == "localisation":
            res = info["result"]
            res.localisation = {"available": False, "reason": f"localisation timed out after {timeout:g} s "
                                "(--case-timeout); the case's own result stands"}
            book.record(idx, run, res.to_json())
            what = f"localising {res.case.id} on {run['spec']}/{run['dtype']}"
        else:
            case = info["case"]
            book.record(idx, run, timeout_result(case, timeout, stack, files).to_json())
            what = f"case {case.id} on {run['spec']}/{run['dtype']}"
        report["aborted"] = (f"{what} ran past --case-timeout {timeout:g} s; without --isolate a hung call cannot be "
                             "stopped inside the process, so the run ends here (--isolate FAILs it and goes on)")
        book.write()
        n = len(report["unfinished"])
        try:
            bar.close()
        except Exception:
            pass
        where = f"; partial report: {book.path}" if book.path is not None else ""
        lines = [f"never finished {u['spec']}/{u['dtype']} {u['id']}" for u in report["unfinished"]]
        if len(lines) > 20:
            lines = [*lines[:20], f"... and {len(lines) - 20} more"]
        print("\n".join([f"\nnemoh: FAIL {report['aborted']}; {n} case(s) never ran{where}", *lines]),
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_ABORTED)


# ----------------------------------------------------------------------------------------------
# --isolate: each backend/dtype's cases in a worker process
# ----------------------------------------------------------------------------------------------

_LOAD_TIMEOUT_MIN = 120.0  # a fresh worker imports torch and the backend before it loads anything


def run_isolated(idx, run, spec, be, dtype, cases, path, device, timeout, record, bar, suite_specs,
                 ref_opts: dict | None = None) -> None:
    """`ref_opts`: the keyword arguments of the worker's Reference (the run's memory plan: oracle mode, ...)."""
    backend_files = files_of_backend(be)
    worker: _Worker | None = None
    restarts = 0
    try:
        i = 0
        while i < len(cases):
            if worker is None:
                worker = _Worker(path, spec, dtype, device, suite_specs, ref_opts)
                kind, payload = worker.recv(None if timeout is None else max(timeout, _LOAD_TIMEOUT_MIN))
                if kind == "ready":
                    if not run["describe"]:
                        run["describe"] = payload
                else:
                    if kind == "nemoh_error":
                        raise NemohError(payload)
                    if kind == "load_error":
                        lkind, reason, source = payload
                    elif kind == "timeout":
                        source = classify_frames(worker.dump_and_kill(), backend_files)
                        lkind, reason = "fail", f"load timed out after {max(timeout, _LOAD_TIMEOUT_MIN):g} s"
                    else:
                        source = classify_frames(worker.stack(), backend_files)
                        lkind, reason = "fail", f"the worker process died while loading ({payload})"
                    worker.close()
                    worker = None
                    run["load_error"] = reason
                    for _suite, case in cases[i:]:
                        record(idx, run, load_failed_result(case, lkind, reason, source).to_json())
                    return
            suite, case = cases[i]
            bar.set_description(f"{be.name}/{dtype} {case.id}"[:70])
            t0 = time.perf_counter()
            worker.send(("case", suite.name, case))
            kind, payload = worker.recv(timeout)
            if kind == "result":
                res_json = payload
                if res_json["status"] == "FAIL" and suite.scenario is not None:
                    k2, loc = worker.recv(timeout)
                    if k2 == "localisation":
                        res_json["localisation"] = loc
                    else:
                        if k2 == "nemoh_error":
                            raise NemohError(loc)
                        why = (f"localisation timed out after {timeout:g} s" if k2 == "timeout"
                               else f"the worker process died while localising ({loc})")
                        res_json["localisation"] = {"available": False, "reason": why + "; the case's result stands"}
                        worker.dump_and_kill() if k2 == "timeout" else worker.close()
                        worker, restarts = None, restarts + 1
            elif kind == "nemoh_error":
                raise NemohError(payload)
            elif kind == "timeout":
                stack = worker.dump_and_kill()
                worker, restarts = None, restarts + 1
                res_json = timeout_result(case, timeout, stack, backend_files, isolated=True).to_json()
            else:  # died
                stack = worker.stack()
                worker.close()
                worker, restarts = None, restarts + 1
                res_json = crash_result(case, payload, stack, backend_files).to_json()
            res_json["duration_s"] = round(time.perf_counter() - t0, 4)
            record(idx, run, res_json)
            i += 1
    finally:
        if worker is not None:
            worker.close()
        run["worker_restarts"] = restarts


class _Worker:
    """A spawned process holding one backend instance at one dtype; it runs cases sent over a pipe."""

    def __init__(self, path: Path, spec: str, dtype: str, device: str | None, suite_specs: list[str] | None,
                 ref_opts: dict | None = None):
        mp = multiprocessing.get_context("spawn")
        fd, self.trace_path = tempfile.mkstemp(prefix="nemoh-worker-", suffix=".stack")
        os.close(fd)
        self.conn, child = mp.Pipe()
        self.proc = mp.Process(target=_worker_main, name=f"nemoh-worker {spec}/{dtype}",
                               args=(child, str(path), spec, dtype, device, suite_specs, self.trace_path,
                                     ref_opts or {}))
        self.proc.start()
        child.close()

    def send(self, msg) -> None:
        try:
            self.conn.send(msg)
        except (BrokenPipeError, OSError, EOFError):
            pass  # recv() reports the death

    def recv(self, timeout: float | None) -> tuple[str, Any]:
        """The worker's next message, ("timeout", None), or ("died", how)."""
        try:
            if not self.conn.poll(timeout):
                return "timeout", None
            return self.conn.recv()
        except (EOFError, OSError, BrokenPipeError):
            self.proc.join(10)
            return "died", _death(self.proc.exitcode)

    def stack(self) -> list[dict]:
        try:
            return parse_faulthandler(Path(self.trace_path).read_text(errors="replace"))
        except OSError:
            return []

    def dump_and_kill(self) -> list[dict]:
        """Ask the hung worker for its stack (faulthandler, SIGUSR1), then kill it."""
        pid = self.proc.pid  # None only before start(); a live process has one
        if pid is not None and self.proc.is_alive() and hasattr(signal, "SIGUSR1"):
            try:
                os.kill(pid, signal.SIGUSR1)
                deadline = time.monotonic() + 2.0
                while time.monotonic() < deadline and not Path(self.trace_path).stat().st_size:
                    time.sleep(0.05)
                time.sleep(0.1)
            except OSError:
                pass
        stack = self.stack()
        self.proc.kill()
        self.close()
        return stack

    def close(self) -> None:
        if self.proc.is_alive():
            self.send(("stop",))
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()
        Path(self.trace_path).unlink(missing_ok=True)


def _worker_main(conn, path: str, spec: str, dtype: str, device: str | None, suite_specs: list[str] | None,
                 trace_path: str, ref_opts: dict | None = None) -> None:
    trace = open(trace_path, "w")  # noqa: SIM115 - faulthandler writes here until the process ends
    faulthandler.enable(file=trace, all_threads=False)
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, file=trace, all_threads=False)
    try:
        from nemoh.oracle.reference import quiet_transformers

        quiet_transformers()
        p = Path(path)
        config = load_config(p)
        graph = build_graph(config, dtype)
        suites = {s.name: s for s in select_suites(suite_specs)}
        be = None
        try:
            be = get_backend(spec)
            model_obj = open_model(p, be, dtype, device)
            describe = model_obj.backend.describe()
        except NemohError as e:
            conn.send(("nemoh_error", str(e)))
            return
        except (Exception, SystemExit) as e:
            conn.send(("load_error", load_failure(e, be)))
            return
        conn.send(("ready", jsonable(describe)))
        ctx = Ctx(config, graph, dtype, model_obj, Reference(p, config, **(ref_opts or {})))
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                return
            if msg[0] != "case":
                return
            suite, case = suites[msg[1]], msg[2]
            t0 = time.perf_counter()
            try:
                res = execute_case(suite, case, ctx)
            except NemohError as e:
                conn.send(("nemoh_error", str(e)))
                return
            res.duration_s = time.perf_counter() - t0
            conn.send(("result", res.to_json()))
            if res.status is Status.FAIL and suite.scenario is not None:
                conn.send(("localisation", jsonable(localise_case(suite, res, ctx))))
    except KeyboardInterrupt:
        return
    finally:
        conn.close()


def _death(exitcode: int | None) -> str:
    if exitcode is None:
        return "it stopped answering"
    if exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"it exited with status {exitcode}"

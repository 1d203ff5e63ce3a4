"""Verdicts must be true: a missing optional package is SKIPPED (or a one-line usage error), an error
is charged to whoever made it, a run that checks nothing does not pass, and a backend that hangs or
kills its process costs one FAILed case, not the run. The misbehaving backends and the small suites
are in tests/robust_backends.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import torch

from nemoh.cli import main
from nemoh.conformance.blame import error_result
from nemoh.conformance.case import Case, Metric
from nemoh.conformance.runner import run_conformance
from nemoh.runtime.registry import get_backend

ROOT = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parents[1]  # the shared helpers: robust_backends, broken_backends
SCHEMA = json.loads((ROOT / "reports" / "conformance.schema.json").read_text())
SMALL = "robust_backends:SUITE"  # 40 tokens split 1+rest, 1x6+rest (the trigger), 17+rest
TIMEOUT = 10  # generous against a loaded 2-core machine: a normal case takes about a second


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), **extra}


def _statuses(report) -> list[tuple[str, str]]:
    return [(r["name"].split(",T=")[0], r["status"]) for run in report["runs"] for r in run["results"]]


@pytest.fixture(scope="module", autouse=True)
def _warm_cache():
    """Generate the preset once, so subprocesses (same NEMOH_CACHE) time only what they test."""
    from nemoh.model.presets import resolve_model

    resolve_model("tiny-dense")


# ------------------------------------------------------------------------------ prefill splits

def test_random_partitions_differ_per_seed_and_are_reproducible():
    from nemoh.suites.prefill_chunks import random_partitions

    a, b = random_partitions(260, 1), random_partitions(260, 2)
    assert a == random_partitions(260, 1)
    assert a[0] != b[0] and not set(map(tuple, a)) & set(map(tuple, b))
    for split in a + b:
        assert sum(split) == 260 and min(split) >= 1 and 3 <= len(split) <= 7


def test_short_chunk_after_a_full_conv_window_is_a_case():
    from nemoh.model.config import parse_config
    from nemoh.model.presets import PRESETS
    from nemoh.suites.prefill_chunks import fixed_splits

    class Shape:
        config = parse_config(PRESETS["tiny-dense"].config)

    K = Shape.config.conv_kernel
    splits = fixed_splits(Shape)
    short = [s for s in splits.values() if any(1 < c < K - 1 and sum(s[:i]) >= K - 1 for i, c in enumerate(s))]
    assert short, splits


def test_shrink_merges_chunks_while_the_split_still_fails():
    from nemoh.suites.prefill_chunks import shrink

    def check(split):  # "fails" while some chunk boundary falls at token 7
        cuts = {sum(split[:i + 1]) for i in range(len(split) - 1)}
        return [Metric("equiv_nmse", 1.0 if 7 in cuts else 0.0, 0.5)]

    minimal, ms = shrink([3, 4, 5, 20, 8], check)
    assert minimal == [7, 33] and not ms[0].ok


# ------------------------------------------------------------------------------ missing packages

def test_random_partitions_need_no_hypothesis(monkeypatch):
    monkeypatch.setitem(sys.modules, "hypothesis", None)  # `import hypothesis` raises ModuleNotFoundError
    r = run_conformance("tiny-dense", ["torch"], ["float32"], ["robust_backends:RANDOM"], progress=False,
                        deviations=False)
    res = r["runs"][0]["results"][0]
    assert res["status"] == "OK" and len(res["details"]["partitions_tried"]) == 4, res


def test_preset_without_transformers_is_a_one_line_error(tmp_path):
    code = ("import sys; sys.modules['transformers'] = None\n"
            "from nemoh.cli import main\n"
            "sys.exit(main(['conformance', '--model', 'tiny-dense', '--backend', 'torch', '--no-progress']))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=_env(NEMOH_CACHE=str(tmp_path / "empty-cache")))
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and res.stderr.count("\n") == 1
    assert "preset 'tiny-dense'" in res.stderr and "pip install 'nemoh[ref]'" in res.stderr


def test_missing_optional_module_in_a_case_is_skipped(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ModuleNotFoundError
    r = run_conformance("tiny-dense", ["torch"], ["float32"], ["robust_backends:NEEDS_ONNXRUNTIME"], progress=False,
                        deviations=False)
    res = r["runs"][0]["results"][0]
    assert res["status"] == "SKIPPED" and "pip install 'nemoh[onnx]'" in res["message"]
    assert res["details"]["missing_module"] == "onnxruntime"
    assert r["summary"]["exit_code"] == 3  # the only case was skipped: nothing was checked


# ------------------------------------------------------------------------------ who made the error

def test_errors_are_charged_to_whoever_raised_them():
    r = run_conformance("tiny-dense", ["torch"], ["float32"],
                        ["robust_backends:HARNESS_BUG", "robust_backends:REFERENCE_BUG"], progress=False,
                        deviations=False)
    jsonschema.validate(r, SCHEMA)
    by_suite = {x["suite"]: x for x in r["runs"][0]["results"]}
    harness, ref = by_suite["harness-bug"], by_suite["reference-bug"]
    assert harness["status"] == "FAIL" and harness["details"]["error_source"] == "harness"
    assert harness["message"].startswith("harness error KeyError") and "not the backend" in harness["message"]
    assert ref["status"] == "FAIL" and ref["details"]["error_source"] == "reference"
    assert ref["message"].startswith("reference raised") and "backend raised" not in ref["message"]


def test_backend_errors_without_backendbase_are_charged_by_their_stack():
    r = run_conformance("tiny-dense", ["robust_backends:PlainExplodes", "broken_backends:Explodes"], ["float32"],
                        [SMALL], progress=False, deviations=False)
    plain, wrapped = ({x["name"].split(",T=")[0]: x for x in run["results"]} for run in r["runs"])
    for res in (plain["split=1+rest"], plain["split=1x6+rest"], wrapped["split=1+rest"]):
        assert res["status"] == "FAIL" and res["details"]["error_source"] == "backend", res
        assert res["message"].startswith("backend raised RuntimeError")
    assert plain["split=17+rest"]["status"] == "OK"


def test_error_source_unit():
    from nemoh import oracle
    from nemoh.model.config import parse_config
    from nemoh.model.ir import build_graph
    from nemoh.model.presets import PRESETS

    case, be = Case("x", "y"), get_backend("torch")
    try:
        oracle.run(build_graph(parse_config(PRESETS["tiny-dense"].config), "float64"), {}, torch.ones(1, 2).long())
    except Exception as e:
        assert error_result(case, e, be).details["error_source"] == "reference"
    try:
        {}["x"]
    except KeyError as e:
        assert error_result(case, e, be).details["error_source"] == "harness"
    try:
        be.new_state(1)  # not loaded: BackendBase wraps the failure in a BackendError
    except Exception as e:
        assert error_result(case, e, be).details["error_source"] == "backend"


def test_sys_exit_in_a_backend_is_a_fail():
    r = run_conformance("tiny-dense", ["robust_backends:ExitsOnManyChunks"], ["float32"], [SMALL], progress=False,
                        deviations=False)
    assert _statuses(r) == [("split=1+rest", "OK"), ("split=1x6+rest", "FAIL"), ("split=17+rest", "OK")]
    res = r["runs"][0]["results"][1]
    assert "SystemExit(0)" in res["message"] and res["details"]["error_source"] == "backend"
    assert r["summary"]["exit_code"] == 1


# ------------------------------------------------------------------------------ runs that check nothing

@pytest.mark.parametrize("argv,needle", [
    (["--backend", "torch", "--dtype", ","], "--dtype ',' names nothing"),
    (["--backend", ""], "--backend '' names nothing"),
    (["--backend", " , "], "names nothing"),
    (["--backend", "torch", "--suite", ","], "--suite ',' names nothing"),
    (["--backend", "builtins:exit"], "exited (SystemExit"),
    (["--backend", "robust_backends:not_a_backend"], "returned int, not a backend"),
    (["--backend", "torch", "--case-timeout", "-1"], "--case-timeout must be >= 0"),
])
def test_empty_lists_and_bad_factories_exit_2(argv, needle, capsys):
    assert main(["conformance", "--model", "tiny-dense", *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


def test_a_run_where_nothing_ran_exits_3(capsys, monkeypatch):
    monkeypatch.setattr("nemoh.conformance.deviations.measure_all", lambda *a, **k: [])  # not under test
    if get_backend("cupy").available().ok:
        pytest.skip("cupy runs here")
    assert main(["conformance", "--model", "tiny-dense", "--backend", "cupy", "--suite", "weights,prefill-chunks",
                 "--no-progress"]) == 3
    out = capsys.readouterr().out
    from nemoh.conformance.references import ShapeCtx
    from nemoh.model.config import load_config
    from nemoh.model.ir import build_graph
    from nemoh.model.presets import resolve_model
    from nemoh.suites import prefill_chunks

    cfg = load_config(resolve_model("tiny-dense"))
    n = len(prefill_chunks.cases(ShapeCtx(cfg, build_graph(cfg, "float32"), "float32"))) + 1  # + the weights case
    assert f"0 OK, 0 FAIL, {n} NOT_SUPPORTED" in out and "nothing was checked" in out


# ------------------------------------------------------------------------------ hangs and crashes

def test_hang_is_a_timeout_fail_and_the_run_goes_on_isolated(tmp_path):
    out = tmp_path / "r.json"
    seen = []
    r = run_conformance("tiny-dense", ["robust_backends:HangsOnManyChunks"], ["float32"], [SMALL], progress=False,
                        deviations=False, isolate=True, case_timeout=TIMEOUT, json_path=out,
                        on_result=lambda run, res: seen.append(json.loads(out.read_text())["unfinished"]))
    assert _statuses(r) == [("split=1+rest", "OK"), ("split=1x6+rest", "FAIL"), ("split=17+rest", "OK")]
    hung = r["runs"][0]["results"][1]
    assert f"timed out after {TIMEOUT} s" in hung["message"] and "fresh worker" in hung["message"]
    assert hung["id"] == "robust-prefill(split=1x6+rest,T=40,B=2)"
    assert hung["details"]["error_kind"] == "timeout" and hung["details"]["error_source"] == "backend"
    assert hung["localisation"] == {"available": False,
                                    "reason": "not localised: the case timed out (a replay would hang again)"}
    assert r["runs"][0]["worker_restarts"] == 1
    assert [len(u) for u in seen] == [2, 1, 0]  # the JSON was rewritten as each case finished
    written = json.loads(out.read_text())
    jsonschema.validate(written, SCHEMA)
    assert written["complete"] is True and written["unfinished"] == [] and written["summary"]["exit_code"] == 1


def test_abort_kills_only_the_worker(tmp_path):
    r = run_conformance("tiny-dense", ["robust_backends:AbortsOnManyChunks"], ["float32"], [SMALL], progress=False,
                        deviations=False, isolate=True, case_timeout=60)
    assert _statuses(r) == [("split=1+rest", "OK"), ("split=1x6+rest", "FAIL"), ("split=17+rest", "OK")]
    res = r["runs"][0]["results"][1]
    assert "worker process died (killed by signal SIGABRT)" in res["message"]
    assert res["details"]["error_kind"] == "crash" and res["details"]["error_source"] == "backend"
    assert "robust_backends.py" in res["details"]["where"]
    assert r["summary"]["exit_code"] == 1 and r["complete"] is True


def test_hang_without_isolate_fails_the_case_writes_the_report_and_exits_4(tmp_path):
    out = tmp_path / "r.json"
    argv = ["conformance", "--model", "tiny-dense", "--backend", "robust_backends:HangsOnManyChunks", "--suite", SMALL,
            "--case-timeout", str(TIMEOUT), "--json", str(out), "--no-progress"]
    code = ("import sys, nemoh.conformance.deviations as d; d.measure_all = lambda *a, **k: []\n"  # not under test
            f"from nemoh.cli import main; sys.exit(main({argv!r}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=300)
    assert res.returncode == 4, res.stderr
    assert "ran past --case-timeout" in res.stderr and "1 case(s) never ran" in res.stderr
    report = json.loads(out.read_text())
    jsonschema.validate(report, SCHEMA)
    assert _statuses(report) == [("split=1+rest", "OK"), ("split=1x6+rest", "FAIL")]
    hung = report["runs"][0]["results"][1]
    assert "timed out" in hung["message"] and hung["details"]["error_source"] == "backend"
    assert report["complete"] is False and report["aborted"] and report["summary"]["exit_code"] == 4
    assert [u["id"] for u in report["unfinished"]] == ["robust-prefill(split=17+rest,T=40,B=2)"]


def test_partial_json_survives_a_kill(tmp_path):
    out, marker = tmp_path / "r.json", tmp_path / "hanging"
    code = ("from nemoh.conformance.runner import run_conformance\n"
            f"run_conformance('tiny-dense', ['robust_backends:HangsOnManyChunks'], ['float32'], [{SMALL!r}],"
            f" progress=False, deviations=False, case_timeout=None, json_path={str(out)!r})")
    proc = subprocess.Popen([sys.executable, "-c", code], env=_env(NEMOH_TEST_HANG_MARKER=str(marker)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert marker.exists(), "the backend never reached its hang"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    report = json.loads(out.read_text())
    jsonschema.validate(report, SCHEMA)
    assert report["complete"] is False
    assert _statuses(report) == [("split=1+rest", "OK")]
    assert [u["id"].split(",T=")[0] for u in report["unfinished"]] == ["robust-prefill(split=1x6+rest",
                                                                       "robust-prefill(split=17+rest"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".r.json.")]  # no temp file left behind

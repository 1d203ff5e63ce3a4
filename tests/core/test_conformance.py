"""The conformance command: suites pass on the unbroken executor, statuses, exit codes, JSON (against
its schema), JUnit, HTML (escaped, self-contained), plugin backends, known deviations."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import pytest
import torch

from nemoh.backends.torch_backend import TorchBackend
from nemoh.cli import main
from nemoh.conformance.deviations import DEVIATIONS
from nemoh.conformance.runner import run_conformance
from nemoh.model.presets import PRESETS

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "reports" / "conformance.schema.json").read_text())


@pytest.fixture(scope="module")
def full_report():
    """Every suite, fp32 and bf16, the deviation probes: the run nox -s conformance does per preset."""
    return run_conformance("tiny-moe", ["torch"], ["float32", "bfloat16"], progress=False)


def test_every_suite_passes_and_the_json_is_valid(full_report):
    jsonschema.validate(full_report, SCHEMA)
    assert full_report["summary"]["exit_code"] == 0, [
        (r["id"], r["message"]) for run in full_report["runs"] for r in run["results"] if r["status"] == "FAIL"]
    suites = {r["suite"] for run in full_report["runs"] for r in run["results"]}
    assert suites == {"logits", "prefill-chunks", "decode", "determinism", "weights", "eval-parity", "quant"}
    for run in full_report["runs"]:
        for r in run["results"]:
            if r["suite"] == "quant":  # the torch executor has no quantized weight types: said so, not failed
                assert r["status"] == "NOT_SUPPORTED" and "no quantized weight types" in r["message"], r["id"]
                continue
            assert r["status"] == "OK" and r["metrics"], r["id"]
            assert all(m["tolerance"] is None or m["ok"] for m in r["metrics"])
    ids = [r["id"] for r in full_report["runs"][0]["results"]]
    assert len(ids) == len(set(ids)) and "prefill-chunks(split=1+rest,T=260,B=2)" in ids


def test_logits_compares_against_oracle_and_transformers(full_report):
    labels = {m["label"] for run in full_report["runs"] for r in run["results"] if r["suite"] == "logits"
              for m in r["metrics"]}
    assert {"vs oracle", "vs transformers float64", "vs transformers float32", "vs transformers bfloat16"} <= labels
    names = {m["name"] for run in full_report["runs"] for r in run["results"] if r["suite"] == "logits"
             for m in r["metrics"]}
    assert {"logits_max_abs", "logits_rel_max_abs", "logits_nmse", "logits_top1", "logits_kl"} <= names
    r = next(r for r in full_report["runs"][0]["results"] if r["suite"] == "logits")
    assert "worst_position" in r["details"]


def test_deviations_are_measured_on_the_model(full_report):
    """Each known deviation is measured on the installed reference, the registry's versions agree with the
    measurement, and the text shown is the one that follows it (tests/core/test_deviations.py covers both
    sides of each measurement whatever transformers is installed)."""
    devs = {d["id"]: d for d in full_report["deviations"]}
    assert set(devs) == {d.id for d in DEVIATIONS}
    for d in DEVIATIONS:
        got = devs[d.id]
        assert got["status"] == "measured", got["status"]
        assert got["consistent"] is True, (d.id, got["installed"], d.affects, got["measured"])
        assert got["description"] == (d.description if got["present"] else d.absent)
    clamp = devs["hf-dt-clamp-prefill-only"]["measured"]
    assert 0.05 < clamp["dt_below_min_fraction"] < 0.95  # the preset has dt on both sides of the minimum
    assert clamp["oracle_clamped_vs_intended_rel_max_abs"] > 100 * 2e-5  # so a clamp would show
    assert devs["hf-eager-fp64-padded-nan"]["measured"]["sdpa_nan_at_real_tokens"] is False


def test_junit_and_html(full_report, tmp_path):
    from nemoh.conformance.junit import write_junit
    from nemoh.output import write_html

    write_junit(full_report, tmp_path / "r.xml")
    root = ET.parse(tmp_path / "r.xml").getroot()
    cases = root.findall(".//testcase")
    assert len(cases) == sum(len(run["results"]) for run in full_report["runs"])
    assert not root.findall(".//failure")
    write_html(full_report, tmp_path / "r.html", "conformance-html")
    html = (tmp_path / "r.html").read_text()
    assert "Backend x suite" in html and "hf-dt-clamp-prefill-only" in html and "dt_below_min_fraction" in html
    assert "http://" not in html and "https://" not in html and "<script" not in html  # self-contained


def test_html_escapes_every_input_string(full_report, tmp_path):
    from nemoh.reports.conformance_html import render

    evil = "<img src=x onerror=alert(1)>"
    r = json.loads(json.dumps(full_report))
    r["model"]["name"] = evil
    r["runs"][0]["results"][0]["message"] = evil
    r["runs"][0]["results"][0]["id"] = evil
    r["deviations"][0]["description"] = evil
    r["environment"]["command_line"] = [evil]
    html = render(r)
    assert evil not in html and "&lt;img src=x onerror=alert(1)&gt;" in html


def test_failure_report_has_localisation_and_exit_1(tmp_path, capsys):
    out = tmp_path / "f.json"
    rc = main(["conformance", "--model", "tiny-dense", "--backend", "broken_backends:GatedNormUngrouped",
               "--suite", "logits", "--json", str(out), "--html", str(tmp_path / "f.html"),
               "--junit", str(tmp_path / "f.xml"), "--no-progress"])
    assert rc == 1
    text = capsys.readouterr().out
    assert "FAIL" in text and "first diverging: layer 0 (mamba), op layers.0.mixer.gated_norm" in text
    report = json.loads(out.read_text())
    jsonschema.validate(report, SCHEMA)
    html_text = re.sub(r"<[^>]+>", "", (tmp_path / "f.html").read_text())  # the words, whatever the markup
    assert "First diverging: layer 0 (mamba)" in html_text
    assert ET.parse(tmp_path / "f.xml").getroot().findall(".//failure")


def test_not_supported_and_plugin_backend(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    r = run_conformance("tiny-dense", ["wrapped_backend:WrappedTorch"], ["float32", "float16"], ["weights"],
                        progress=False, deviations=False)
    by_dtype = {run["dtype"]: run for run in r["runs"]}
    assert by_dtype["float32"]["results"][0]["status"] == "OK"
    assert by_dtype["float32"]["describe"]["wraps"] == "torch"
    fp16 = by_dtype["float16"]["results"][0]
    assert fp16["status"] == "NOT_SUPPORTED" and "runs float64, float32, bfloat16 only, not float16" in fp16["message"]
    assert r["summary"]["exit_code"] == 0  # NOT_SUPPORTED is not a failure


def test_skipped_without_transformers(monkeypatch):
    import nemoh.conformance.runner as conf

    orig = conf.Reference.__init__

    def no_hf(self, *a, **k):
        orig(self, *a, **k)
        self.hf_unavailable = "transformers is not installed (pip install 'nemoh[ref]')"

    monkeypatch.setattr(conf.Reference, "__init__", no_hf)
    r = run_conformance("tiny-dense", ["torch"], ["float32"], ["logits"], progress=False, deviations=False)
    st = {x["name"].split(",")[0]: x["status"] for x in r["runs"][0]["results"]}
    assert st["ref=oracle"] == "OK" and st["ref=hf-float64"] == "SKIPPED"


def test_backend_exception_is_a_fail_not_a_crash():
    r = run_conformance("tiny-dense", ["broken_backends:Explodes"], ["float32"], ["decode"], progress=False,
                        deviations=False)
    res = r["runs"][0]["results"][0]
    assert res["status"] == "FAIL" and "backend raised RuntimeError: kernel exploded" in res["message"]


@pytest.mark.parametrize("argv,needle", [
    (["--backend", "trch"], "Did you mean: torch?"),
    (["--backend", "torch", "--suite", "logit"], "Unknown suite 'logit'. Did you mean: logits?"),
    (["--backend", "torch", "--dtype", "float8"], "Unknown dtype 'float8'"),
    (["--backend", "torch", "--json", "/nonexistent-dir/r.json"], "no such directory"),
])
def test_usage_errors_exit_2(argv, needle, capsys):
    assert main(["conformance", "--model", "tiny-dense", *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_existing_report_survives_a_bad_run(tmp_path):
    out = tmp_path / "r.json"
    out.write_text('{"previous": true}')
    assert main(["conformance", "--model", "nope-preset", "--backend", "torch", "--json", str(out)]) == 2
    assert out.read_text() == '{"previous": true}'


def test_cli_subprocess_table(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "examples")}
    res = subprocess.run([sys.executable, "-m", "nemoh.cli", "conformance", "--model", "tiny-list", "--backend",
                          "torch,wrapped_backend:WrappedTorch", "--suite", "weights,determinism", "--no-progress"],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert "torch/float32" in res.stdout and "wrapped_backend:WrappedTorch/float32" in res.stdout
    assert sorted(PRESETS)  # presets exist for nox -s conformance


class FlipsOneBit(TorchBackend):
    """Holds dt_bias of layer 0 with one bit flipped: a loader that corrupts one tensor."""

    def load(self, graph, checkpoint, *, device=None):
        super().load(graph, checkpoint, device=device)
        self.p["layers.0.mixer.dt_bias"].view(torch.int32)[0] ^= 1


def test_a_weights_failure_names_the_tensors_on_the_console(capsys):
    from nemoh.cli import main

    rc = main(["conformance", "--model", "tiny-dense", "--backend", "test_conformance:FlipsOneBit",
               "--suite", "weights", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 1 and "mismatched_tensors=1 > 0: layers.0.mixer.dt_bias" in out


class NaNInGatedNorm(TorchBackend):
    """The gated norm of every Mamba layer returns NaN: an overflow or a 0/0 in a real kernel."""

    def _gated_norm(self, y, z, w, group_size, eps):
        return super()._gated_norm(y, z, w, group_size, eps) * float("nan")


def test_non_finite_values_are_named_with_the_first_layer_and_op():
    r = run_conformance("tiny-dense", ["test_conformance:NaNInGatedNorm"], ["float32"], ["logits"], progress=False,
                        deviations=False)
    fails = [x for x in r["runs"][0]["results"] if x["status"] == "FAIL"]
    nf = fails[0]["localisation"]["non_finite"]
    assert nf["what"] == "NaN" and nf["op"] == "layers.0.mixer.gated_norm" and nf["layer"] == 0 and nf["call"] == 0
    where = r["summary"]["failure_groups"][0]["where"]
    assert where == "NaN first produced by layer 0 (mamba), op layers.0.mixer.gated_norm, in forward call 1"


class LongPrefillOnly(TorchBackend):
    """Wrong only on prefills of 200+ tokens (say, a kernel's second tiling path): the one-shot side of a
    chunked-prefill comparison is the broken one, and the chunks are all fine."""

    def _ssd(self, x, dt, A, B, C, D, s0, chunk):
        y, s = super()._ssd(x, dt, A, B, C, D, s0, chunk)
        return (y * 1.5, s) if x.shape[1] >= 200 else (y, s)


def test_localisation_replays_both_sides_of_an_equivalence():
    r = run_conformance("tiny-dense", ["test_conformance:LongPrefillOnly"], ["float32"], ["prefill-chunks"],
                        progress=False, deviations=False)
    fails = {x["name"]: x for x in r["runs"][0]["results"] if x["status"] == "FAIL"}
    short_chunks = [x for x in fails.values() if all(c < 200 for c in x["details"].get("split", [999]))]
    assert short_chunks, sorted(fails)
    loc = short_chunks[0]["localisation"]
    assert loc["found"] and loc["side"] == "one-shot" and loc["op"] == "layers.0.mixer.ssd", loc.get("message")
    assert loc["sides_checked"][-1] == "one-shot" and loc["sides_checked"][0].startswith("split")


# -- low precision: judged relative to transformers at the same dtype (issue 18) --------------------

def test_bf16_logits_report_both_distances_and_their_ratio(full_report):
    bf16 = next(run for run in full_report["runs"] if run["dtype"] == "bfloat16")
    logits = [r for r in bf16["results"] if r["suite"] == "logits"]
    assert logits and all(r["status"] == "OK" for r in logits)
    for r in logits:
        rel = {m["name"]: m for m in r["metrics"] if "baseline" in m}
        assert set(rel) == {"logits_nmse", "logits_kl", "logits_top1"}, r["id"]
        nm = rel["logits_nmse"]
        assert nm["ratio"] == pytest.approx(nm["value"] / nm["baseline"]) and nm["baseline_label"].startswith(
            "transformers bfloat16 vs")
        summary = r["details"]["vs_reference_at_dtype"]["summary"]
        assert "transformers bfloat16" in summary and ("as close" in summary or "further" in summary
                                                       or "closer" in summary or "own distance" in summary)
    fp32 = next(run for run in full_report["runs"] if run["dtype"] == "float32")
    assert not any("baseline" in m for r in fp32["results"] for m in r["metrics"])  # fp32 stays absolute


def test_low_precision_rule_passes_an_executor_as_close_as_the_reference():
    """The Super-derived finding: top-1 0.79, NMSE 0.078 against fp64 FAILs the fixed bf16 floors (0.85 /
    0.05) though transformers' own bf16 is as far; the dtype-relative rule passes it, and still FAILs
    an executor 10x further than transformers."""
    from nemoh.conformance.case import judge, Case, logit_metrics, metric_values

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 53, 64, generator=g, dtype=torch.float64)
    noisy = lambda s: ref + s * torch.randn(ref.shape, generator=g, dtype=torch.float64)  # noqa: E731
    ours, theirs = noisy(0.28), noisy(0.28)
    base, _ = logit_metrics(theirs, ref, "bfloat16", "transformers bfloat16 vs oracle", judged=False)
    fixed, _ = logit_metrics(ours, ref, "bfloat16", "vs oracle")
    v = metric_values(fixed)
    assert v["logits_nmse"] > 0.05 and v["logits_top1"] < 0.85  # the fixed floors FAIL it
    case = Case("logits", "synthetic")
    assert judge(case, fixed).status == "FAIL"
    rel, _ = logit_metrics(ours, ref, "bfloat16", "vs oracle", baseline=metric_values(base),
                           baseline_label="transformers bfloat16 vs oracle")
    assert judge(case, rel).status == "OK", judge(case, rel).message
    worse, _ = logit_metrics(noisy(0.9), ref, "bfloat16", "vs oracle", baseline=metric_values(base))
    assert judge(case, worse).status == "FAIL"


def test_latent_moe_passes_bf16_logits_under_the_relative_rule():
    r = run_conformance("tiny-latent-moe", ["torch"], ["bfloat16"], ["logits"], progress=False, deviations=False)
    results = r["runs"][0]["results"]
    assert r["summary"]["exit_code"] == 0, [(x["id"], x["message"]) for x in results if x["status"] != "OK"]
    assert all("vs_reference_at_dtype" in x["details"] for x in results)
    jsonschema.validate(r, SCHEMA)


def test_without_transformers_at_the_dtype_the_fixed_floors_judge(monkeypatch):
    import nemoh.conformance.runner as conf

    orig = conf.Reference.__init__

    def no_hf(self, *a, **k):
        orig(self, *a, **k)
        self.hf_unavailable = "transformers is not installed (pip install 'nemoh[ref]')"

    monkeypatch.setattr(conf.Reference, "__init__", no_hf)
    r = run_conformance("tiny-dense", ["torch"], ["bfloat16"], ["logits"], progress=False, deviations=False)
    oracle = [x for x in r["runs"][0]["results"] if x["name"].startswith("ref=oracle")]
    assert oracle and all(x["status"] == "OK" for x in oracle)
    for x in oracle:
        assert "fixed floors" in x["details"]["verdict_rule"] and "not installed" in x["details"]["verdict_rule"]
        top1 = next(m for m in x["metrics"] if m["name"] == "logits_top1")
        assert "baseline" not in top1 and top1["tolerance"] == 0.85


def test_splits_run_at_batch_one_and_two_and_mixed_lengths(full_report):
    res = full_report["runs"][0]["results"]
    pc = [r for r in res if r["suite"] == "prefill-chunks"]
    assert {r["params"]["B"] for r in pc} >= {1, 2, 3}
    assert any("lengths" in r["params"] and len(set(r["params"]["lengths"])) == 3 for r in pc)
    sched = [r for r in res if r["suite"] == "decode" and "schedule" in r["params"]]
    assert sched and any(n > 1 for n in sched[0]["params"]["schedule"][4:])  # a multi-token chunk after steps
    assert {r["params"].get("B") for r in res if r["suite"] == "decode"} >= {1, 2}

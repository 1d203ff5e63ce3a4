"""Issue 18, reports as a new user saw them: the console keeps to 120 columns and says one cause once,
failures that start at the same layer and op are one group whatever split localised them, a carried
state that diverges while every layer is within tolerance is named, a backend's error is said once,
the bench page leads with its figure and shows no raw JSON. Synthetic reports keep this file fast; the
HTML page of a real failing run is checked in test_report_html.py."""

from __future__ import annotations

import copy
import json
import re
from importlib import resources

import jsonschema
import pytest

from nemoh.cli import WIDTH, print_table
from nemoh.conformance.blame import describe_exc
from nemoh.conformance.execute import load_failure, load_failed_result
from nemoh.conformance.summary import summarize
from nemoh.runtime.backend import BackendBase, BackendError

SSD = {"available": True, "found": True, "calls": 2, "tolerance": 1e-5, "metric": "layer_rel_rms", "layer": 0,
       "kind": "mamba", "error": 0.0019, "op": "layers.0.mixer.ssd", "op_kind": "ssd_scan", "call": 1,
       "call_tokens": 259, "layers": [], "ops": []}
SPEC = "broken_backends:SsmStateDropped"
ORT = ("NOT_IMPLEMENTED : Could not find an implementation for {op}(13) node with name '/layers.{i}/{op}' "
       "[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : the provider CPUExecutionProvider has no kernel for "
       "tensor(bfloat16) inputs of this node")


def metric(label: str, value: float, tol: float, name: str = "equiv_nmse") -> dict:
    return {"name": name, "label": label, "value": value, "value_repr": f"{value:.3g}", "tolerance": tol,
            "higher_is_better": False, "ok": value <= tol, "badness": value / tol}


def result(i: int, suite: str, status: str, message: str, **kw) -> dict:
    return {"id": f"{suite}(case={i},T=260,B=2)", "suite": suite, "name": f"case={i}", "params": {}, "seed": 7,
            "status": status, "metrics": [], "message": message, "details": {}, **kw}


def report(runs: list[dict]) -> dict:
    r = {"model": {"name": "tiny-moe", "pattern": "M*ME-", "params_total": 1234}, "runs": runs,
         "suites": [{"name": s} for s in dict.fromkeys(x["suite"] for run in runs for x in run["results"])]}
    r["summary"] = summarize(r)
    return r


def split_failures(n: int) -> list[dict]:
    """SsmStateDropped on prefill-chunks: every split localises to the same layer and op, each on its own side."""
    out = []
    for i in range(n):
        side = f"split [{i + 1}, {259 - i}]"
        msg = (f"{side} state layers.3.v equiv_nmse=3.52e-05 > 1e-09; {side} logits equiv_nmse=3.07e-05 > 1e-09; "
               f"{side} state layers.3.k equiv_nmse=2.6e-05 > 1e-09; and 8 more metrics out of tolerance")
        out.append(result(i, "prefill-chunks", "FAIL", msg,
                          localisation={**SSD, "side": side, "sides_checked": [side]}))
    return out


# -- the console ------------------------------------------------------------------------------------

def test_console_keeps_to_120_columns_and_says_one_cause_once(capsys):
    not_run = "; ".join(ORT.format(op=op, i=i) for i, op in enumerate(("MatMul", "Softplus", "Exp", "CumSum", "Mul")))
    assert len(not_run) > 900  # as long as the onnx/bfloat16 reason the issue met
    load = ("backend failed to load: RuntimeError: llama.cpp worker: llama_model_load: error loading model: "
            "missing tensor 'blk.0.ssm_d' [backend 'llamacpp' load(Graph, Checkpoint) at float32]")
    r = report([
        {"spec": SPEC, "dtype": "float32", "results": split_failures(11)},
        {"spec": "onnx", "dtype": "bfloat16",
         "results": [result(i, "logits", "NOT_SUPPORTED", not_run) for i in range(5)]},
        {"spec": "llamacpp", "dtype": "float32",
         "results": [result(i, "decode", "FAIL", load, details={"error_source": "backend"}) for i in range(29)]},
    ])
    print_table(r)
    out = capsys.readouterr().out.splitlines()
    assert max(map(len, out)) <= WIDTH, max(out, key=len)
    # one cause, one line: the 29 identical load failures are said once, with their count
    said = [line for line in out if "missing tensor" in line]
    assert len(said) == 1, said
    assert any("x29" in line for line in out)
    # the backend spec is not repeated on every FAIL line
    assert sum(SPEC in line for line in out) <= 2
    assert any(line.startswith("not run onnx/bfloat16 (5 NOT_SUPPORTED): NOT_IMPLEMENTED") for line in out)
    assert "--json" in out[-1] or any("--json" in line for line in out[-3:])  # where the full text is


# -- grouping ---------------------------------------------------------------------------------------

def test_failures_at_one_layer_and_op_are_one_group_whatever_the_split():
    r = report([{"spec": SPEC, "dtype": "float32", "results": split_failures(11)}])
    groups = r["summary"]["failure_groups"]
    assert len(groups) == 1, [g["where"] for g in groups]
    g = groups[0]
    assert g["where"] == "layer 0 (mamba), op layers.0.mixer.ssd" and len(g["cases"]) == 11
    assert len(g["sides"]) == 11 and g["sides"][0] == "split [1, 259]"
    assert [x["side"] for x in g["cases"]] == g["sides"]
    assert r["summary"]["failing_suites"] == ["prefill-chunks"]
    # a different place stays its own group
    other = split_failures(1)[0]
    other["id"] = "prefill-chunks(other)"
    other["localisation"] = {**SSD, "layer": 2, "op": "layers.2.mixer.ssd", "side": "split [1, 259]"}
    r = report([{"spec": SPEC, "dtype": "float32", "results": [*split_failures(3), other]}])
    assert [len(g["cases"]) for g in r["summary"]["failure_groups"]] == [3, 1]


def test_a_diverging_carried_state_is_named_when_every_layer_is_within_tolerance():
    side = "split [128, 128, 4]"
    loc = {"available": True, "found": False, "calls": 3, "tolerance": 1e-5, "metric": "layer_rel_rms", "layers": [],
           "side": side, "message": "every layer is within tolerance when checked in isolation; the error is in "
           "the embedding or the head, or builds up from within-tolerance differences"}
    x = result(0, "prefill-chunks", "FAIL", f"{side} state layers.0.ssm equiv_nmse=1.83 > 1e-09", localisation=loc,
               metrics=[metric(f"{side} logits", 0.02, 1e-9), metric(f"{side} state layers.0.ssm", 1.83, 1e-9),
                        metric(f"{side} state layers.2.conv", 1e-10, 1e-9)])
    g = report([{"spec": SPEC, "dtype": "float32", "results": [x]}])["summary"]["failure_groups"][0]
    assert "layers.0.ssm" in g["where"] and "diverges" in g["where"], g["where"]
    assert "embedding" not in g["where"]
    assert g["state"]["state"] == "layers.0.ssm" and g["state"]["side"] == side and g["state"]["layer"] == 0
    assert g["state"]["states"] == ["layers.0.ssm"]  # the conv state is within tolerance
    # without a diverging state the old wording stands
    x2 = copy.deepcopy(x)
    x2["metrics"] = [metric(f"{side} logits", 0.02, 1e-9)]
    g2 = report([{"spec": SPEC, "dtype": "float32", "results": [x2]}])["summary"]["failure_groups"][0]
    assert "embedding" in g2["where"] and g2["state"] is None


def test_summary_views_match_the_schema():
    schema = json.loads(resources.files("nemoh.reports").joinpath("conformance.schema.json").read_text())
    r = report([{"spec": SPEC, "dtype": "float32", "results": split_failures(2)}])
    summary_schema = {"$defs": schema.get("$defs", {}), **schema["properties"]["summary"]}
    jsonschema.validate(r["summary"], summary_schema, cls=jsonschema.Draft202012Validator)
    broken = copy.deepcopy(r["summary"])
    del broken["failure_groups"][0]["cases"][0]["side"]  # the schema rejects what it should
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, summary_schema, cls=jsonschema.Draft202012Validator)
    props = schema["properties"]["summary"]["properties"]
    assert {"failure_groups", "failing_suites", "failing_columns"} <= set(props)


# -- a backend's error, said once ---------------------------------------------------------------------

class FailsToLoad(BackendBase):
    name = "fails-to-load"
    MESSAGE = "llama.cpp worker: llama_model_load: error loading model: missing tensor 'blk.0.ssm_d'"

    def load(self, graph, checkpoint, *, device=None):
        raise RuntimeError(self.MESSAGE + "\nsecond line")

    def new_state(self, batch): ...
    def forward(self, state, ids, mask=None, *, last_only=False, trace=None): ...
    def export_state(self, state): ...
    def import_state(self, tensors): ...
    def read_param(self, name): ...


def test_a_backend_error_says_the_backends_message_once():
    be = FailsToLoad()
    with pytest.raises(BackendError) as e:
        be.load(object(), object())
    # the error itself names backend, method, argument types and dtype
    assert e.value.context == "backend 'fails-to-load' load(object, object) at ?"
    assert str(e.value) == f"{e.value.context}: RuntimeError: {FailsToLoad.MESSAGE}"
    text = describe_exc(e.value)
    assert text.count("missing tensor 'blk.0.ssm_d'") == 1, text
    assert "backend 'fails-to-load' load(object, object)" in text
    kind, reason, source = load_failure(e.value, be)
    assert kind == "fail" and source == "backend" and reason.count("error loading model") == 1, reason


def test_load_failures_of_one_cause_are_one_console_line(capsys):
    """The real path: the same load error on every case of a run is one line, with the count."""
    from nemoh.conformance.case import Case

    be = FailsToLoad()
    try:
        be.load(object(), object())
    except BackendError as e:
        kind, reason, source = load_failure(e, be)
    cases = [Case(suite="decode", name=f"n={i}", params=(("n", i),)) for i in range(29)]
    results = [load_failed_result(c, kind, reason, source).to_json() for c in cases]
    print_table(report([{"spec": "llamacpp", "dtype": "float32", "results": results}]))
    out = capsys.readouterr().out.splitlines()
    assert sum("error loading model" in line for line in out) == 1, out
    assert max(map(len, out)) <= WIDTH


# -- the bench page -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bench_result():
    import torch

    from nemoh.bench.plan import Settings
    from nemoh.bench.run import run_bench

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_bench(Settings(model="tiny-moe", backends=["torch"], prompt_lengths=[8, 20], context_depths=[6, 12],
                                  decode_tokens=3, repeats=2, warmup=1, progress=False, probe_copy_bytes=4 << 20,
                                  probe_matmul_n=64), ["--model", "tiny-moe"])
    finally:
        torch.set_num_threads(old)


def test_bench_headline_is_in_the_json_and_first_on_the_page(bench_result):
    from nemoh.reports.bench_html import render

    res = json.loads(json.dumps(bench_result, allow_nan=False))
    schema = json.loads(resources.files("nemoh.reports").joinpath("bench.schema.json").read_text())
    jsonschema.validate(res, schema, cls=jsonschema.Draft202012Validator)
    (h,) = res["headline"]
    torch_ = next(b for b in res["backends"] if b["name"] == "torch")
    longest = max(torch_["prefill"], key=lambda w: w["prompt_length"])
    deepest = max(torch_["decode"], key=lambda w: w["context_depth"])
    assert h["backend"] == "torch" and h["reference"] == "hf" and h["status"] == torch_["status"]
    assert h["prefill"]["prompt_length"] == 20 and h["prefill"]["ratio_to_reference"] == longest["ratio_to_reference"]
    assert h["decode"]["context_depth"] == 12 and h["decode"]["ratio_to_reference"] == deepest["ratio_to_reference"]
    assert h["prefill"]["tokens_per_second"] == longest["tokens_per_second"]["p50"]
    page = render(res)
    first = page.index('class="headline"')
    assert first < page.index("<h2>")  # above every section, on the first screen
    assert f"{h['prefill']['ratio_to_reference']:.2f}× ref" in page[first:page.index("<h2>")]
    # x ref sits right after the gate in both tables, not as the last, narrow column
    for head in re.findall(r"<tr><th>[TS]</th>.*?</tr>", page, flags=re.S):
        cols = re.findall(r"<th[^>]*>(.*?)</th>", head)
        assert cols.index("× ref") == cols.index("gate") + 1, cols


def test_bench_page_shows_no_raw_json(bench_result):
    from nemoh.reports.bench_html import render

    page = render(bench_result)
    runners = page[page.index("<h2>Runners</h2>"):page.index("<h2>Prefill")]
    settings = page[page.index("<h2>Settings</h2>"):]
    for part in (runners, settings):
        assert '{"' not in part and '{&#34;' not in part and "<pre>" not in part, part[:400]
    describe = next(b for b in bench_result["backends"] if b["name"] == "torch")["describe"]
    key = next(iter(describe))
    assert f"{key}: " in runners
    assert "<td class=\"l\">prompt_lengths</td><td class=\"kv\">8, 20</td>" in settings

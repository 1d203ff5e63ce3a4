"""lm-eval integration: the `nemoh` model (registration, scoring from a shared prefilled state,
rolling log-likelihood, generation), `nemoh lm-eval` and `nemoh eval`, the fixture tasks, and the
eval-parity suite. Nothing here touches the network: every test runs with sockets refused."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

os.environ["HF_HUB_OFFLINE"] = "1"  # before lm_eval / datasets / huggingface_hub read them at import
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'nemoh[eval]')")

from nemoh.cli import main  # noqa: E402
from nemoh.conformance.tolerances import rel_max_abs, tol  # noqa: E402
from nemoh.errors import NemohError  # noqa: E402
from nemoh.eval.lm_eval_model import NemohLM  # noqa: E402
from nemoh.eval.tasks import FIXTURE_DIR, FIXTURE_TASKS, task_manager  # noqa: E402
from nemoh.model.presets import corpus_text, resolve_model  # noqa: E402
from nemoh.runtime.registry import get_backend  # noqa: E402

MMLU, GSM8K = FIXTURE_TASKS
BACKENDS = ["torch", pytest.param("onnx", marks=pytest.mark.skipif(
    not get_backend("onnx").available().ok, reason=f"onnx backend: {get_backend('onnx').available().reason}"))]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test that made it."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def path() -> Path:
    return resolve_model("tiny-moe")


@pytest.fixture(scope="module")
def lm(path) -> NemohLM:
    return NemohLM(pretrained=path, backend="torch", dtype="float32", batch_size=3)


# -- registration --------------------------------------------------------------------------------

def test_registered_in_lm_eval_without_hiding_its_own_models():
    from lm_eval.api.registry import get_model

    import nemoh.eval.lm_eval_model as mod

    assert mod.NemohLM is NemohLM and get_model("nemoh") is NemohLM
    assert get_model("hf").__name__ == "HFLM"  # lm-eval's built-ins still resolve


def test_core_does_not_import_lm_eval():
    code = ("import sys, nemoh, nemoh.runtime.session, nemoh.cli, nemoh.eval.tasks, nemoh.conformance.runner; "
            "from nemoh import plugins; plugins.load_all(plugins.SUITES); "
            "bad = [m for m in ('lm_eval', 'datasets') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_model_args_typo_is_an_error_naming_the_key(path):
    with pytest.raises(NemohError, match="Unknown nemoh model_args key 'dtpye'. Did you mean: dtype"):
        NemohLM.create_from_arg_string(f"pretrained={path},dtpye=float32")


# -- scoring: one prefill per context == one sequence per request ------------------------------------

def _pairs(lm):
    """Three contexts (one longer than the rest) with 4 continuations each: one-token letters and
    multi-token words of different lengths; plus one context of its own."""
    text = corpus_text()
    ctxs = [text[:300], text[300:420], text[420:800]]
    conts = [" A", " B", " the answer is 42", " (C) seven hundred and six"]
    pairs = [lm._encode_pair(c, k) for c in ctxs for k in conts]
    return pairs + [lm._encode_pair(text[900:950], " and so on")]


class CountingForward:
    def __init__(self, model):
        self.be, self.calls = model.backend, []
        self._orig = self.be.forward

    def __enter__(self):
        def fwd(state, ids, mask=None, **kw):
            self.calls.append(tuple(ids.shape))
            return self._orig(state, ids, mask, **kw)

        self.be.forward = fwd
        return self

    def __exit__(self, *exc):
        self.be.forward = self._orig


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_context_scoring_equals_one_sequence_per_request(path, backend):
    lm = NemohLM(pretrained=path, backend=backend, dtype="float32", batch_size=2)
    pairs = _pairs(lm)
    assert len({tuple(c) for c, _ in pairs}) == 4 and any(len(k) > 3 for _, k in pairs)
    with CountingForward(lm.model) as shared_calls:
        shared = lm.score(pairs, share_context=True)
    with CountingForward(lm.model) as naive_calls:
        naive = lm.score(pairs, share_context=False)
    a = torch.tensor([ll for ll, _ in shared], dtype=torch.float64)
    b = torch.tensor([ll for ll, _ in naive], dtype=torch.float64)
    assert bool((a < 0).all()) and a.unique().numel() == len(pairs)
    assert rel_max_abs(a, b) <= tol("equiv_rel_max_abs", "float32"), (a - b).abs().max()
    assert [g for _, g in shared] == [g for _, g in naive]
    # each context is prefilled once: the first forward of each batch covers the contexts only
    ctx_tokens = sum(len(c) for c in {tuple(c) for c, _ in pairs})
    fed = sum(b * t for b, t in shared_calls.calls)
    assert fed < sum(b * t for b, t in naive_calls.calls)
    assert shared_calls.calls[0] == (2, max(len(c) for c, _ in pairs))
    assert fed < ctx_tokens + 2 * sum(len(k) for _, k in pairs) < sum(len(c) + len(k) for c, k in pairs)


def test_one_token_continuations_need_no_forward_after_the_prefill(lm):
    ctx = lm.tok_encode("Question: which letter?\nAnswer:")
    words = [" the", " and", " of", " to", " in", " is", " a", " that", " for", " it"]
    conts = [k for k in (lm.tok_encode(w, add_special_tokens=False) for w in words) if len(k) == 1][:4]
    assert len(conts) == 4
    pairs = [(ctx, k) for k in conts]
    with CountingForward(lm.model) as calls:
        got = lm.score(pairs)
    assert calls.calls == [(1, len(ctx))]
    logp = torch.log_softmax(lm.model.session(1).forward(torch.tensor([ctx]))[0, -1].double(), -1)
    want = [logp[k[0]].item() for _, k in pairs]
    # last_only prefill vs all positions: the same executor another way
    assert rel_max_abs(torch.tensor([g for g, _ in got]), torch.tensor(want)) <= tol("equiv_rel_max_abs", "float32")
    assert [g for _, g in got] == [k[0] == int(logp.argmax()) for _, k in pairs]


def test_requests_longer_than_max_length_are_left_truncated_like_lm_eval(path):
    lm = NemohLM(pretrained=path, dtype="float32", max_length=24)
    ctx, cont = lm.tok_encode(corpus_text()[:400]), lm.tok_encode(" the end", add_special_tokens=False)
    (got, _), = lm.score([(ctx, cont)])
    seq = (ctx + cont)[-25:][:-1]  # lm-eval's hf model: the last max_length + 1 tokens, minus the last
    logp = torch.log_softmax(lm.model.session(1).forward(torch.tensor([seq]))[0].double(), -1)
    want = sum(logp[len(seq) - len(cont) + i, t].item() for i, t in enumerate(cont))
    assert abs(got - want) <= 1e-9


# -- rolling log-likelihood ------------------------------------------------------------------------

def _direct_sum(model, ids: list[int], first_scored: int) -> float:
    """sum over t >= first_scored of log p(ids[t] | ids[:t]), one forward."""
    logp = torch.log_softmax(model.session(1).forward(torch.tensor([ids]))[0].double(), -1)
    return sum(logp[t - 1, ids[t]].item() for t in range(first_scored, len(ids)))


def test_loglikelihood_rolling_is_the_sum_of_token_logprobs(lm):
    text = corpus_text()[:500]
    toks = lm.tok_encode(text, add_special_tokens=False)
    (got,) = lm.loglikelihood_rolling([SimpleNamespace(args=(text,))])
    want = _direct_sum(lm.model, [lm.prefix_token_id, *toks], 1)
    assert abs(got - want) <= tol("equiv_rel_max_abs", "float32") * abs(want)
    assert got < 0


def test_loglikelihood_rolling_in_windows_conditions_each_window_on_the_tokens_before(path):
    L = 32
    lm = NemohLM(pretrained=path, dtype="float32", max_length=L)
    text = corpus_text()[:300]
    toks = lm.tok_encode(text, add_special_tokens=False)
    assert len(toks) > 2 * L
    (got,) = lm.loglikelihood_rolling([SimpleNamespace(args=(text,))])
    # lm-eval's rolling windows (context_len=1): the first L tokens after BOS, then up to L tokens at a
    # time, each scored after the L + 1 - n tokens before it
    want, p = _direct_sum(lm.model, [lm.prefix_token_id, *toks[:L]], 1), L
    while p < len(toks):
        e = min(len(toks), p + L)
        want += _direct_sum(lm.model, toks[e - L - 1:e], L + 1 - (e - p))
        p = e
    whole = _direct_sum(lm.model, [lm.prefix_token_id, *toks], 1)
    assert abs(got - want) <= 1e-6 * abs(want)
    assert abs(got - whole) > 1e-3  # the windows really cut the context


# -- generation ----------------------------------------------------------------------------------

def _gen(lm, ctx, until, n=20):
    req = SimpleNamespace(args=(ctx, {"until": until, "max_gen_toks": n, "do_sample": False}))
    return lm.generate_until([req])[0]


def test_generate_until_stops_at_the_first_until_string(lm):
    ctx = "Question: Sara reads 15 pages a day. How many pages in a week?\nAnswer:"
    full = _gen(lm, ctx, [], 20)
    # a stop string from the middle of the text (not a partial UTF-8 character: those come and go)
    stop = next(full[i:i + 3] for i in range(4, len(full) - 3) if "\ufffd" not in full[i:i + 3]
                and full[i:i + 3].strip())
    cut = full.index(stop)
    with CountingForward(lm.model) as calls:
        got = _gen(lm, ctx, [stop], 20)
    assert got == full[:cut] and stop not in got
    assert len(calls.calls) < 20  # it stopped decoding, it did not just cut the text afterwards
    assert full.startswith(_gen(lm, ctx, [], 5)) and len(_gen(lm, ctx, [], 5)) < len(full)  # max_gen_toks


def test_batched_generation_equals_one_prompt_at_a_time(lm):
    ctxs = ["Question: What is 2 + 2?\nAnswer:", "Hi", corpus_text()[:200]]
    reqs = [SimpleNamespace(args=(c, {"until": ["\n\n"], "max_gen_toks": 12})) for c in ctxs]
    batched = lm.generate_until(reqs)  # batch_size 3: one left-padded batch
    alone = [lm.generate_until([r])[0] for r in reqs]
    assert batched == alone and len(set(batched)) == 3


def test_sampling_is_refused(lm):
    req = SimpleNamespace(args=("Hi", {"until": [], "do_sample": True, "temperature": 0.7}))
    with pytest.raises(NemohError, match="greedily only"):
        lm.generate_until([req])


# -- lm-eval end to end: simple_evaluate on the fixture tasks ------------------------------------

@pytest.fixture(scope="module", params=BACKENDS)
def evaluated(request, path):
    res = lm_eval.simple_evaluate(
        model="nemoh", model_args=f"pretrained={path},backend={request.param},dtype=float32",
        tasks=[MMLU, GSM8K], task_manager=task_manager(False), limit=6, gen_kwargs={"max_gen_toks": 12},
        log_samples=True)
    return request.param, res


def test_simple_evaluate_reports_accuracy_with_stderr(evaluated):
    backend, res = evaluated
    r = res["results"]
    assert r[MMLU]["acc_stderr,none"] > 0 and 0 <= r[MMLU]["acc,none"] <= 1
    for f in ("strict-match", "flexible-extract"):
        assert 0 <= r[GSM8K][f"exact_match,{f}"] <= 1 and isinstance(r[GSM8K][f"exact_match_stderr,{f}"], float)
    assert res["n-samples"][MMLU] == {"original": 16, "effective": 6}
    assert res["n-samples"][GSM8K] == {"original": 12, "effective": 6}
    assert res["config"]["nemoh"]["backend"] == backend
    # lm-eval's per-item accuracy is the argmax of the log-likelihoods the model returned
    for s in res["samples"][MMLU]:
        lls = [float(x[0][0]) for x in s["resps"]]
        assert s["acc"] == float(max(range(4), key=lls.__getitem__) == s["target"])
    # and the strict filter is lm-eval's gsm8k regex over the generated text
    for s in res["samples"][GSM8K]:
        if s["filter"] == "strict-match":
            text = s["resps"][0][0]
            assert ("#### " in text) or s["filtered_resps"][0] == "[invalid]"


def test_fixture_tasks_match_lm_evals_own_task_definitions():
    """The fixtures use the prompts, choices, filters and metrics of lm-eval's mmlu and gsm8k."""
    from nemoh.eval.tasks import _read_yaml

    tasks = Path(lm_eval.__file__).parent / "tasks"
    mmlu, ours = _read_yaml(tasks / "mmlu/default/mmlu_anatomy.yaml"), _read_yaml(FIXTURE_DIR / f"{MMLU}.yaml")
    gsm, ours_g = _read_yaml(tasks / "gsm8k/gsm8k.yaml"), _read_yaml(FIXTURE_DIR / f"{GSM8K}.yaml")
    for k in ("doc_to_text", "doc_to_choice", "doc_to_target", "metric_list", "output_type", "fewshot_config"):
        assert ours[k] == mmlu[k], k
    for k in ("doc_to_text", "doc_to_target", "metric_list", "generation_kwargs", "filter_list", "num_fewshot"):
        assert ours_g[k] == gsm[k], k
    for name in ("mmlu_fixture_test", "gsm8k_fixture_test"):
        rows = [json.loads(x) for x in (FIXTURE_DIR / "data" / f"{name}.jsonl").read_text().splitlines()]
        assert 12 <= len(rows) <= 20
        if name.startswith("mmlu"):
            assert all(len(r["choices"]) == 4 and r["answer"] in range(4) and r["subject"] for r in rows)
        else:
            assert all(r["answer"].rsplit("\n", 1)[-1].startswith("#### ") for r in rows)


# -- the command line ------------------------------------------------------------------------------

def test_nemoh_lm_eval_passes_everything_through(path, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["lm-eval", "--model", "nemoh", "--model_args", f"pretrained={path},backend=torch,dtype=float32",
               "--tasks", MMLU, "--include_path", str(FIXTURE_DIR), "--limit", "2", "--batch_size", "2",
               "--log_samples", "--output_path", str(out)])
    assert rc == 0
    results = list(out.rglob("results_*.json"))
    samples = list(out.rglob(f"samples_{MMLU}_*.jsonl"))
    assert len(results) == 1 and len(samples) == 1
    r = json.loads(results[0].read_text())
    assert r["results"][MMLU]["alias"] == MMLU and "acc,none" in r["results"][MMLU]
    assert len(samples[0].read_text().splitlines()) == 2
    assert "nemoh" in capsys.readouterr().out


def test_nemoh_lm_eval_exits_with_lm_evals_code(path, capsys):
    assert main(["lm-eval", "--model", "nemoh", "--no-such-flag"]) == 2  # lm-eval's argparse error
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    rc = main(["lm-eval", "--model", "nemoh", "--model_args", f"pretrained={path},dtpye=float32", "--tasks", MMLU,
               "--include_path", str(FIXTURE_DIR)])
    assert rc == 2 and "Did you mean: dtype" in capsys.readouterr().err


def test_nemoh_eval_without_local_data_is_exit_2_one_line(tmp_path, capsys):
    empty = tmp_path / "hf-datasets"
    empty.mkdir()
    assert main(["eval", "--model", "tiny-moe", "--backend", "torch", "--tasks", "mmlu", "--data-dir", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nemoh: error: the data of lm-eval task 'mmlu'")
    assert "57 of 57 datasets" in err and "cais/mmlu:abstract_algebra" in err and "never downloads" in err
    assert main(["eval", "--model", "tiny-moe", "--tasks", "mmlu,gsm8kk", "--data-dir", str(empty)]) == 2
    assert "Did you mean: gsm8k" in capsys.readouterr().err


def test_nemoh_eval_fixture_tasks_json(path, tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc = main(["eval", "--model", str(path), "--backend", "torch", "--tasks", f"{MMLU},{GSM8K}", "--limit", "3",
               "--max-gen-toks", "8", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"WARNING: {MMLU}: nemoh's fixture data; n=3 of 16 (--limit 3) - not a benchmark result" in printed
    rep = json.loads(out.read_text())
    m = rep["tasks"][MMLU]
    assert (m["n"], m["n_test_set"], m["limit"], m["version"], m["benchmark_result"]) == (3, 16, 3, 1.0, False)
    assert set(m["metrics"]) == {"acc"} and m["metrics"]["acc"]["stderr"] is not None
    g = rep["tasks"][GSM8K]
    assert set(g["metrics"]) == {"exact_match (strict-match)", "exact_match (flexible-extract)"}
    assert "--max-gen-toks 8 changes the task" in g["warning"] and g["num_fewshot"] == 5
    assert rep["seeds"] == {"random_seed": 0, "numpy_seed": 1234, "torch_seed": 1234, "fewshot_seed": 1234}
    assert rep["model"]["backend"] == "torch" and rep["lm_eval"]["version"] == lm_eval.__version__


def _fake_datasets_cache(root: Path, repo: str, config: str, splits: dict[str, list[dict]]) -> None:
    """What an online `datasets.load_dataset(repo, config)` leaves in HF_DATASETS_CACHE, made here from
    local rows (datasets' cache layout: namespace___name/config/version/hash/name-split.arrow)."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.json.json import Json

    src = root / ".src" / config
    src.mkdir(parents=True)
    files = {}
    for split, rows in splits.items():
        (src / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        files[split] = [str(src / f"{split}.jsonl")]
    cached = repo.replace("/", "___")
    b = Json(cache_dir=str(root), dataset_name=cached, config_name=config, hash="local",
             data_files=DataFilesDict.from_local_or_remote(files, base_path=str(src)))
    b.download_and_prepare()
    built = Path(b.cache_dir)  # root/cached/<config>-<data files hash>/<version>/local
    final = built.parents[1].rename(built.parents[2] / config) / built.parent.name / built.name
    short = repo.split("/")[-1]
    for f in final.glob(f"{cached}-*.arrow"):
        f.rename(f.with_name(short + f.name[len(cached):]))
    shutil.rmtree(root / ".src")


def test_nemoh_eval_runs_lm_evals_mmlu_and_gsm8k_from_a_local_datasets_cache(tmp_path, capsys):
    import datasets

    from nemoh.eval.tasks import task_datasets

    cache = tmp_path / "hf-datasets"
    rows = [{"question": f"Tom has {i} apples and buys {i} more. How many?",
             "answer": f"{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}"} for i in range(1, 5)]
    _fake_datasets_cache(cache, "openai/gsm8k", "main", {"train": rows, "test": rows})
    for repo, subject in task_datasets("mmlu"):  # lm-eval's mmlu: 57 subjects, one dataset config each
        q = [{"question": f"{subject} {i}?", "subject": subject, "choices": list("wxyz"), "answer": i}
             for i in range(3)]
        _fake_datasets_cache(cache, repo, subject, {"test": q, "dev": q})
    try:
        datasets.load_dataset("openai/gsm8k", "main", cache_dir=str(cache))
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"cannot emulate datasets {datasets.__version__}'s cache layout here: {e}")
    out = tmp_path / "std.json"
    rc = main(["eval", "--model", "tiny-moe", "--backend", "torch", "--tasks", "mmlu,gsm8k", "--data-dir", str(cache),
               "--limit", "2", "--num-fewshot", "1", "--max-gen-toks", "6", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    tasks = json.loads(out.read_text())["tasks"]
    g, m = tasks["gsm8k"], tasks["mmlu"]
    assert (g["n"], g["n_test_set"], g["num_fewshot"], g["benchmark_result"]) == (2, 4, 1, False)
    assert "exact_match (flexible-extract)" in g["metrics"] and g["version"]  # lm-eval's own gsm8k
    assert (m["subtasks"], m["n"], m["n_test_set"], m["num_fewshot"]) == (57, 114, 171, 1)
    assert 0 <= m["metrics"]["acc"]["value"] <= 1 and not m["benchmark_result"]
    assert "WARNING: mmlu: n=114 of 171 (--limit 2) - not a benchmark result" in capsys.readouterr().out


# -- the eval-parity conformance suite -------------------------------------------------------------

@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe", "tiny-latent-moe", "tiny-list"])
def test_eval_parity_suite_passes_on_tiny_presets(preset):
    from nemoh.conformance.runner import run_conformance

    rep = run_conformance(preset, ["torch"], ["float32"], ["eval-parity"], progress=False)
    res = rep["runs"][0]["results"]
    assert [r["status"] for r in res] == ["OK", "OK"], [r["message"] for r in res]
    names = {m["name"]: m for r in res for m in r["metrics"]}
    assert names["eval_loglik_abs"]["value"] <= names["eval_loglik_abs"]["tolerance"] == tol("eval_loglik_abs",
                                                                                              "float32")
    assert names["eval_choice_agreement"]["value"] == 1.0 and names["eval_generation_match"]["value"] == 1.0
    assert len(res[0]["details"]["per_item"]) == 8 and len(res[1]["details"]["per_item"]) == 4


def test_eval_parity_suite_at_bf16_judges_mean_loglik_and_parting_gap():
    """tiny-latent-moe rounds expert choices differently at bf16: judged by the mean, not the max."""
    from nemoh.conformance.runner import run_conformance

    rep = run_conformance("tiny-latent-moe", ["torch"], ["bfloat16"], ["eval-parity"], progress=False)
    res = rep["runs"][0]["results"]
    assert [r["status"] for r in res] == ["OK", "OK"], [r["message"] for r in res]
    m = {x["name"]: x for r in res for x in r["metrics"]}
    assert m["eval_loglik_abs"]["tolerance"] is None and m["eval_generation_match"]["tolerance"] is None
    assert m["eval_loglik_mean_abs"]["tolerance"] == tol("eval_loglik_mean_abs", "bfloat16")
    assert m["eval_parting_logit_gap"]["tolerance"] == tol("eval_parting_logit_gap", "bfloat16")
    for p in res[1]["details"]["partings"]:  # each parting looked at with the fp32 reference
        assert p["step"] is None or p["precise_logit_gap"] <= tol("eval_parting_logit_gap", "bfloat16")


def test_eval_parity_suite_fails_a_broken_backend():
    """The dt clamp transformers ships (a real bug class) moves log-likelihoods far past tolerance."""
    from nemoh.conformance.runner import run_conformance

    rep = run_conformance("tiny-moe", ["broken_backends:DtClamped"], ["float32"], ["eval-parity"], progress=False)
    mmlu = rep["runs"][0]["results"][0]
    assert mmlu["status"] == "FAIL" and "eval_loglik_abs" in mmlu["message"]
    assert mmlu["worst_metric"]["value"] > 100 * tol("eval_loglik_abs", "float32")


def test_conformance_with_eval_parity_prints_no_library_chatter():
    """lm-eval's, accelerate's and datasets' warnings and progress bars stay out of a --no-progress run."""
    res = subprocess.run([sys.executable, "-m", "nemoh.cli", "conformance", "--model", "tiny-moe", "--backend", "torch",
                          "--suite", "eval-parity", "--no-progress"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stderr.strip() == "", res.stderr[-2000:]
    assert "eval-parity" in res.stdout and "OK 2/2" in res.stdout

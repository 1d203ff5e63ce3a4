"""`nemoh layerwise trace|check|merge`: per-layer conformance against the engine's own trace, in shards and
on Ray (nemoh.conformance.layerwise)."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nemoh.cli import main
from nemoh.conformance import layerwise
from nemoh.conformance.layerwise import RUN_FIELDS, merge, parse_layers, run_check, shard_of, write_trace
from nemoh.model.config import load_config
from nemoh.model.presets import all_presets, resolve_model

MODEL = "tiny-moe"  # MEM*EME: 7 layers, layer 3 the attention layer
T = 24


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lw") / "trace"
    assert main(["layerwise", "trace", "--model", MODEL, "--backend", "torch", "--dtype", "float32",
                 "--out", str(d), "--length", str(T), "--batch", "2", "--seed", "3"]) == 0
    return d


def _check(capsys, *argv: str) -> tuple[int, dict | None, str]:
    """main(['layerwise', 'check', ...]) -> (exit code, the --json report if one was asked for, stderr)."""
    capsys.readouterr()
    code = main(["layerwise", "check", *argv])
    err = capsys.readouterr().err
    if "--json" in argv:
        path = argv[argv.index("--json") + 1]
        return code, json.loads(open(path).read()) if code != 2 else None, err
    return code, None, err


def _without_run_fields(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in RUN_FIELDS}


def _one_line_error(err: str, *words: str) -> None:
    assert err.count("\n") == 1 and err.startswith("nemoh: error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in err, (w, err)


def test_trace_writes_manifest_and_every_tensor(trace_dir):
    man = json.loads((trace_dir / "manifest.json").read_text())
    cfg = load_config(resolve_model(MODEL))
    assert man["schema"] == "nemoh-layerwise-trace/1" and man["backend"] == "torch" and man["dtype"] == "float32"
    assert (man["batch"], man["length"], man["seed"], man["num_layers"]) == (2, T, 3, cfg.num_layers)
    assert man["config_fingerprint"] == layerwise.config_fingerprint(cfg)
    with safe_open(str(trace_dir / "trace.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert f.metadata()["trace_id"] == man["trace_id"]
        ids = f.get_tensor("ids")
        assert f.get_tensor("logits").shape == (2, T, cfg.vocab_size)
    assert names == set(man["tensors"])
    assert {"ids", "embeddings", "logits", "layers.3.mixer.o_proj"} | {f"layers.{i}" for i in range(7)} <= names
    assert ids.shape == (2, T) and int(ids.min()) >= 4 and int(ids.max()) < cfg.vocab_size
    assert torch.equal(ids, layerwise.prompt(2, T, cfg.vocab_size, 3))  # seeded: the same prompt again
    assert not list(trace_dir.glob(".*"))  # no temporary file left behind


def test_every_preset_checks_ok_at_float32(tmp_path):
    for name in all_presets():
        d = tmp_path / name
        write_trace(name, "torch", "float32", d, length=8)
        r = run_check(name, d)
        L = load_config(resolve_model(name)).num_layers
        assert r["exit_code"] == 0, (name, r["summary"])
        assert r["layers_checked"] == list(range(L)) and [l["layer"] for l in r["layers"]] == list(range(L))
        assert all(l["status"] == "OK" and 0 <= l["error"] <= l["tolerance"] == 1e-5 for l in r["layers"]), name
        assert r["embedding"]["status"] == "OK" and r["head"]["status"] == "OK", name
        assert r["summary"] == {"checked": L + 2, "failed": 0, "failed_layers": [], "first_failing_layer": None,
                                "embedding": "OK", "head": "OK", "complete": True}
        # streamed: only one block's fp64 weights at a time, never the whole model
        g = layerwise.build_graph(load_config(resolve_model(name)), "float64")
        assert 0 < r["memory"]["oracle_param_peak_bytes"] <= 8 * max(sum(t.numel for t in b.params)
                                                                     for b in g.layers)
        assert r["memory"]["peak_rss_bytes"] > 0


def test_cli_check_ok_and_report(trace_dir, tmp_path, capsys):
    code, r, _ = _check(capsys, "--model", MODEL, "--trace", str(trace_dir), "--json", str(tmp_path / "r.json"))
    assert code == 0 and r is not None
    assert r["schema"] == "nemoh-layerwise/1" and r["manifest"]["trace_id"]
    assert r["selection"] == {"layers": None, "layers_requested": list(range(7)), "shard": None}
    att = r["layers"][3]
    assert att["kind"] == "attention" and att["mixer_op"] == "layers.3.mixer.o_proj"
    assert {o["op"] for o in att["ops"]} >= {"layers.3.mixer.attention", "layers.3.mixer.o_proj"}
    assert {m["name"] for m in r["head"]["metrics"]} >= {"logits_nmse", "logits_kl", "logits_top1"}


def test_planted_bug_fails_exactly_that_layer(tmp_path, capsys):
    # RoPE added to the attention layer (tests/broken_backends.py): only layer 3 computes wrongly; each
    # later layer is checked on the engine's own (wrong) input to it, so it stays OK
    d = tmp_path / "broken"
    assert main(["layerwise", "trace", "--model", MODEL, "--backend", "broken_backends:RopeAdded",
                 "--dtype", "float32", "--out", str(d), "--length", "12"]) == 0
    code, r, _ = _check(capsys, "--model", MODEL, "--trace", str(d), "--json", str(tmp_path / "r.json"))
    assert code == 1 and r is not None
    assert [l["layer"] for l in r["layers"] if l["status"] == "FAIL"] == [3]
    assert r["summary"]["first_failing_layer"] == 3 and r["summary"]["failed_layers"] == [3]
    bad = r["layers"][3]
    assert bad["error"] > 100 * bad["tolerance"]
    assert bad["first_op_out_of_tolerance"] in ("layers.3.mixer.attention", "layers.3.mixer.o_proj")
    assert bad["worst_op"]["op"].startswith("layers.3.mixer.")
    assert r["head"]["status"] == "OK" and r["embedding"]["status"] == "OK"


def test_edited_trace_fails_at_that_layer_and_no_earlier(trace_dir, tmp_path, capsys):
    d = tmp_path / "edited"
    shutil.copytree(trace_dir, d)
    with safe_open(str(d / "trace.safetensors"), framework="pt") as f:
        meta, tensors = f.metadata(), {n: f.get_tensor(n) for n in f.keys()}
    x = tensors["layers.3"]
    tensors["layers.3"] = x + 1e-3 * x.pow(2).mean().sqrt() * torch.randn(x.shape, generator=torch.Generator()
                                                                          .manual_seed(0))
    tensors["layers.5"] = torch.full_like(tensors["layers.5"], float("nan"))  # and a NaN later on
    save_file(tensors, str(d / "trace.safetensors"), metadata=meta)
    code, r, _ = _check(capsys, "--model", MODEL, "--trace", str(d), "--json", str(tmp_path / "r.json"))
    assert code == 1 and r is not None
    failed = r["summary"]["failed_layers"]
    assert failed[0] == 3 and r["summary"]["first_failing_layer"] == 3 and 5 in failed
    assert all(l["status"] == "OK" for l in r["layers"][:3])
    assert r["layers"][5]["error"] is None and r["layers"][5]["error_repr"] == "nan"  # JSON has no NaN


def test_shards_merge_to_the_single_run(trace_dir, tmp_path, capsys):
    code, single, _ = _check(capsys, "--model", MODEL, "--trace", str(trace_dir), "--json", str(tmp_path / "all.json"))
    assert code == 0 and single is not None
    for n in (2, 3):
        parts = []
        for k in range(1, n + 1):
            p = tmp_path / f"s{k}of{n}.json"
            code, r, _ = _check(capsys, "--model", MODEL, "--trace", str(trace_dir), "--shard", f"{k}/{n}",
                                "--json", str(p), "--quiet")
            assert code == 0 and r is not None
            assert r["layers_checked"] == shard_of(range(7), (k, n)) and r["selection"]["shard"] == {"k": k, "n": n}
            assert (r["embedding"] is not None) == (k == 1) and (r["head"] is not None) == (k == n)
            parts.append(p)
        out = tmp_path / f"merged{n}.json"
        capsys.readouterr()
        assert main(["layerwise", "merge", *map(str, reversed(parts)), "--json", str(out), "--quiet"]) == 0
        assert capsys.readouterr().err == ""  # complete: no note
        merged = json.loads(out.read_text())
        assert _without_run_fields(merged) == _without_run_fields(single)
        assert len(merged["timing"]["shards"]) == n


def test_shards_are_contiguous_and_cover_the_list():
    for items in ([], [0], list(range(7)), list(range(52))):
        for n in range(1, 9):
            parts = [shard_of(items, (k, n)) for k in range(1, n + 1)]
            assert sum(parts, []) == items
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parse_layers("0-2,5,4", 7) == [0, 1, 2, 4, 5] and parse_layers(None, 3) == [0, 1, 2]
    assert layerwise.ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


def test_merge_refuses_other_traces_and_overlaps_and_names_missing_layers(trace_dir, tmp_path, capsys):
    s = {}
    for k in (1, 2, 3):
        s[k] = tmp_path / f"s{k}.json"
        assert _check(capsys, "--model", MODEL, "--trace", str(trace_dir), "--shard", f"{k}/3",
                      "--json", str(s[k]), "--quiet")[0] == 0
    other = tmp_path / "other"
    write_trace(MODEL, "torch", "float32", other, length=8, batch=2, seed=3)  # another trace of the model
    o2 = tmp_path / "o2.json"
    assert _check(capsys, "--model", MODEL, "--trace", str(other), "--shard", "2/3", "--json", str(o2))[0] == 0
    out = str(tmp_path / "m.json")
    capsys.readouterr()
    assert main(["layerwise", "merge", str(s[1]), str(o2), "--json", out]) == 2
    _one_line_error(capsys.readouterr().err, "different traces")
    assert main(["layerwise", "merge", str(s[1]), str(s[2]), str(s[1]), "--json", out]) == 2
    _one_line_error(capsys.readouterr().err, "overlap", "layers 0-1", "the embedding")
    assert main(["layerwise", "merge", str(s[1]), str(tmp_path / "nope.json"), "--json", out]) == 2
    _one_line_error(capsys.readouterr().err, "nope.json")
    (tmp_path / "bad.json").write_text('{"schema": "nemoh-conformance/1"}')
    assert main(["layerwise", "merge", str(tmp_path / "bad.json"), "--json", out]) == 2
    _one_line_error(capsys.readouterr().err, "not a layer-wise report")
    # shard 2 of 3 lost: merged anyway, the gap is named, and it is not a pass
    assert shard_of(range(7), (2, 3)) == [2, 3]
    assert main(["layerwise", "merge", str(s[1]), str(s[3]), "--json", out, "--quiet"]) == 1
    assert "layers 2-3 missing" in capsys.readouterr().err
    r = json.loads(open(out).read())
    assert r["missing_layers"] == [2, 3] and r["summary"]["complete"] is False


@pytest.mark.parametrize("argv, words", [
    (["--shard", "0/2"], ["--shard '0/2'", "between 1 and N"]),
    (["--shard", "3/2"], ["--shard '3/2'"]),
    (["--shard", "1/0"], ["--shard '1/0'"]),
    (["--shard", "half"], ["--shard 'half'", "K/N"]),
    (["--layers", "9"], ["--layers '9'", "7 layers"]),
    (["--layers", "4-2"], ["backwards"]),
    (["--layers", "x"], ["--layers 'x'"]),
])
def test_check_bad_selection_is_one_line(trace_dir, capsys, argv, words):
    code, _, err = _check(capsys, "--model", MODEL, "--trace", str(trace_dir), *argv)
    assert code == 2
    _one_line_error(err, *words)


def test_check_bad_traces_are_one_line(trace_dir, tmp_path, capsys):
    code, _, err = _check(capsys, "--model", "tiny-dense", "--trace", str(trace_dir))
    assert code == 2
    _one_line_error(err, "not from --model tiny-dense", "fingerprint")
    broken = tmp_path / "no-tensors"
    shutil.copytree(trace_dir, broken)
    (broken / "trace.safetensors").unlink()
    code, _, err = _check(capsys, "--model", MODEL, "--trace", str(broken))
    assert code == 2
    _one_line_error(err, "trace.safetensors: missing")
    code, _, err = _check(capsys, "--model", MODEL, "--trace", str(tmp_path / "nowhere"))
    assert code == 2
    _one_line_error(err, "no such directory")
    (broken / "trace.safetensors").write_bytes(b"not a safetensors file")
    code, _, err = _check(capsys, "--model", MODEL, "--trace", str(broken))
    assert code == 2
    _one_line_error(err, "not a readable safetensors file")
    stale = tmp_path / "stale"  # a trace file of one run next to the manifest of another
    shutil.copytree(trace_dir, stale)
    man = json.loads((stale / "manifest.json").read_text())
    (stale / "manifest.json").write_text(json.dumps({**man, "trace_id": "0" * 32}))
    code, _, err = _check(capsys, "--model", MODEL, "--trace", str(stale))
    assert code == 2
    _one_line_error(err, "different runs")


def test_trace_bad_input_is_one_line(tmp_path, capsys):
    base = ["layerwise", "trace", "--model", MODEL, "--backend", "torch", "--dtype", "float32", "--length", "4"]
    capsys.readouterr()
    assert main(["layerwise", "trace", "--model", MODEL, "--backend", "torchh", "--dtype", "float32",
                 "--out", str(tmp_path / "a")]) == 2
    _one_line_error(capsys.readouterr().err, "torchh", "Did you mean: torch")
    assert main(["layerwise", "trace", "--model", str(tmp_path / "no-model"), "--backend", "torch",
                 "--dtype", "float32", "--out", str(tmp_path / "b")]) == 2
    _one_line_error(capsys.readouterr().err, "no-model")
    (tmp_path / "file").write_text("x")
    assert main([*base, "--out", str(tmp_path / "file")]) == 2
    _one_line_error(capsys.readouterr().err, "not a directory")
    assert main([*base, "--out", str(tmp_path / "file" / "sub")]) == 2
    _one_line_error(capsys.readouterr().err, "not a directory")
    assert main([*base, "--dtype", "float33", "--out", str(tmp_path / "c")]) == 2
    _one_line_error(capsys.readouterr().err, "float33")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_nothing_checked_is_exit_3(trace_dir, capsys):
    assert shard_of([0, 1], (1, 3)) == []  # more shards than layers: a shard may be empty
    code, _, _ = _check(capsys, "--model", MODEL, "--trace", str(trace_dir), "--layers", "0-1", "--shard", "1/3")
    assert code == 3


def test_ray_missing_is_exit_2_with_the_pip_hint(trace_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    code, _, err = _check(capsys, "--model", MODEL, "--trace", str(trace_dir), "--ray", "local")
    assert code == 2
    _one_line_error(err, "pip install 'nemoh[ray]'")


class _RayStandIn:
    """The part of ray's API the check uses, run in this process: a cluster already initialised by the caller,
    or one whose address cannot be reached."""

    def __init__(self, initialized: bool, reachable: bool = True):
        self.initialized, self.reachable, self.calls = initialized, reachable, []

    def is_initialized(self):
        return self.initialized

    def init(self, **kw):
        self.calls.append(("init", kw))
        if not self.reachable:
            raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to.")
        self.initialized = True

    def shutdown(self):
        self.calls.append(("shutdown", {}))
        self.initialized = False

    def remote(self, fn):
        outer = self

        class Task:
            def remote(self, *args):
                outer.calls.append(("task", args))
                return fn(*args)  # the object ref is the value itself

        return Task()

    def get(self, refs):
        return list(refs)


def test_ray_stand_in_cluster_of_the_caller_is_used_and_left_running(trace_dir, monkeypatch):
    fake = _RayStandIn(initialized=True)
    monkeypatch.setitem(sys.modules, "ray", fake)
    r = run_check(MODEL, trace_dir, ray="ray://head:10001")
    assert [c[0] for c in fake.calls] == ["task"] * 9 and fake.initialized  # no init, no shutdown
    assert [c[1][2] for c in fake.calls] == ["embedding", *range(7), "head"]  # (model, trace dir, part)
    assert _without_run_fields(r) == _without_run_fields(run_check(MODEL, trace_dir))


def test_ray_unreachable_address_is_one_line(trace_dir, capsys, monkeypatch):
    fake = _RayStandIn(initialized=False, reachable=False)
    monkeypatch.setitem(sys.modules, "ray", fake)
    code, _, err = _check(capsys, "--model", MODEL, "--trace", str(trace_dir), "--ray", "10.0.0.1:6379")
    assert code == 2 and fake.calls == [("init", {"address": "10.0.0.1:6379"})]
    _one_line_error(err, "--ray 10.0.0.1:6379", "Could not find any running Ray instance")


def test_ray_local_cluster_gives_the_single_run_report(trace_dir, tmp_path, capsys, monkeypatch):
    try:
        import ray
    except ImportError:
        pytest.skip("Ray is not installed: pip install 'nemoh[ray]'")
    single = run_check(MODEL, trace_dir)
    real_init = ray.init
    # `--ray local` is ray.init(include_dashboard=False) on this machine: two workers here
    monkeypatch.setattr(ray, "init", lambda **kw: real_init(num_cpus=2, log_to_driver=False, **kw))
    try:
        code, r, _ = _check(capsys, "--model", MODEL, "--trace", str(trace_dir), "--ray", "local",
                            "--json", str(tmp_path / "ray.json"), "--quiet")
        assert not ray.is_initialized()  # the cluster it started is shut down
    finally:
        ray.shutdown()
    assert code == 0 and r is not None and r["timing"]["executor"] == "ray"
    assert _without_run_fields(r) == _without_run_fields(single)
    # and a Ray run's report merges like any shard's
    assert _without_run_fields(merge([tmp_path / "ray.json"])) == _without_run_fields(single)

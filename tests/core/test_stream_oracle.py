"""The streamed oracle (nemoh.oracle.stream) and the memory plan (nemoh.conformance.memory): bit-equal to the
in-memory oracle on every preset, and a model of a few hundred MB checked under a memory cap that the
in-memory oracle would exceed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from nemoh import oracle
from nemoh.bench.models import BENCH_PRESETS
from nemoh.conformance.memory import parse_size, plan_memory
from nemoh.conformance.references import Reference
from nemoh.errors import NemohError
from nemoh.model.config import load_config, parse_config
from nemoh.model.ir import build_graph
from nemoh.model.presets import get_preset, known_presets, resolve_model
from nemoh.model.realsize import hub_names, truncate_layers, write_random_checkpoint
from nemoh.model.weights import Checkpoint
from nemoh.oracle import ops
from nemoh.oracle.stream import StreamedParams


@pytest.mark.parametrize("name", sorted(known_presets()))
def test_streamed_oracle_is_bit_equal_to_the_in_memory_one(name, monkeypatch):
    """Same logits, same op outputs, bit for bit, on every preset (the ModelOpt FP8/NVFP4 ones too: their
    linears dequantized and their activations quantized the same way); the LM head in slices of 7 rows (far
    fewer than the vocabulary), and never more than one block's fp64 tensors held."""
    monkeypatch.setattr(ops, "HEAD_ROWS", 7)
    path = resolve_model(name)
    g = build_graph(load_config(path), "float64")
    whole = Checkpoint(path).load(g)
    ids = torch.randint(4, g.config.vocab_size, (2, g.config.chunk_size + 9),
                        generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding, through every op's padding path
    ta: dict = {}
    tb: dict = {}
    a = oracle.run(g, whole, ids, mask=mask, trace=ta)
    sp = StreamedParams(Checkpoint(path), g)
    b = oracle.run(g, sp, ids, mask=mask, trace=tb)
    assert torch.equal(a, b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    largest = max(sum(whole[t.name].numel() * 8 for t in blk.params) for blk in g.layers)
    assert 0 < sp.peak_bytes <= largest < sum(t.numel() * 8 for t in whole.values())
    assert set(sp) == set(whole)  # the input scales of quantized activations too


def test_reference_in_stream_mode_gives_the_same_oracle_logits():
    path = resolve_model("tiny-moe")
    cfg = load_config(path)
    ids = torch.randint(4, cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    a = Reference(path, cfg).oracle_logits(ids)
    s = Reference(path, cfg, oracle_mode="stream", logits_cache=0)
    assert torch.equal(a, s.oracle_logits(ids)) and isinstance(s.params, StreamedParams)
    assert torch.equal(a, s.oracle_logits(ids))  # cache of 0 bytes: the last one is still kept


def test_memory_plan_streams_refuses_and_leaves_transformers_out_with_figures():
    cfg = parse_config(BENCH_PRESETS["nemotron-h-8b"].config)
    g64 = build_graph(cfg, "float64")
    graphs = {"bfloat16": build_graph(cfg, "bfloat16")}
    p = plan_memory(g64, graphs, 2 * 165, limit=parse_size("24GiB"), hf_dtypes=("bfloat16",))
    assert p.oracle == "stream" and not p.transformers and p.estimate <= parse_size("24GiB") - (512 << 20)
    assert 15e9 < p.parts["backend"] < 17e9 and p.parts["oracle"] < 2e9  # bf16 weights; one layer in fp64
    assert any("transformers not run" in w for w in p.why)
    with pytest.raises(NemohError) as e:
        plan_memory(g64, graphs, 2 * 165, limit=parse_size("24GiB"), oracle="memory")
    msg = str(e.value)
    assert "\n" not in msg and "oracle 64.8 GB" in msg and "--oracle stream needs" in msg, msg
    with pytest.raises(NemohError, match=r"backend 16\.\d GB.*4 GB is available"):
        plan_memory(g64, graphs, 330, limit=parse_size("4GB"))
    tiny = load_config(resolve_model("tiny-moe"))
    small = plan_memory(build_graph(tiny, "float64"), {"float32": build_graph(tiny, "float32")}, 330,
                        limit=parse_size("24GiB"))
    assert small.oracle == "memory" and small.transformers and not small.why[1:]
    with pytest.raises(NemohError, match="--memory-limit"):
        parse_size("lots")


def test_random_checkpoint_in_the_hub_layout_loads(tmp_path):
    """The real-size writer, on a small config: hub names (one tensor per expert), shards and index that the
    loader validates; a truncated pattern."""
    cfg = truncate_layers(dict(get_preset("tiny-moe").config), 4)
    out = write_random_checkpoint(cfg, tmp_path / "m", seed=5, dtype="bfloat16", shard_bytes=40_000, progress=False)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
    c = load_config(out)
    assert c.num_layers == 4
    g = build_graph(c, "bfloat16")
    Checkpoint(out).validate(g)
    names = [k for k, _ in hub_names("layers.1.mixer.experts.up_proj", torch.zeros(3, 2, 2))]
    assert names == [f"backbone.layers.1.mixer.experts.{e}.up_proj.weight" for e in range(3)]
    with pytest.raises(NemohError, match="--num-layers 99"):
        truncate_layers(cfg, 99)


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory):
    """cpu-small's shapes (hidden 1024, vocab 32768, 8 layers): 109 M parameters, 218 MB in bf16, 873 MB as
    the fp64 oracle would hold it."""
    return write_random_checkpoint(dict(BENCH_PRESETS["cpu-small"].config), tmp_path_factory.mktemp("mid") / "m",
                                   seed=1, dtype="bfloat16", progress=False)


CLI = "import sys; from nemoh.cli import main; sys.exit(main())"


def _conformance(model, tmp_path, *extra: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    js = tmp_path / "r.json"
    js.unlink(missing_ok=True)
    r = subprocess.run([sys.executable, "-c", CLI, "conformance", "--model", str(model), "--backend", "torch",
                        "--dtype", "bfloat16", "--suite", "logits", "--no-progress", "--memory-limit", "2.3GB",
                        "--json", str(js), *extra], capture_output=True, text=True, timeout=600)
    return r, json.loads(js.read_text()) if js.exists() else None


def test_a_few_hundred_mb_model_runs_streamed_under_a_cap_the_in_memory_oracle_exceeds(mid_model, tmp_path):
    r, rep = _conformance(mid_model, tmp_path, "--oracle", "memory")
    assert r.returncode == 2 and rep is None and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "oracle 873 MB" in r.stderr and "--oracle stream needs" in r.stderr, r.stderr
    r, rep = _conformance(mid_model, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert rep is not None
    m = rep["memory"]
    assert m["oracle"] == "stream" and rep["options"]["oracle"] == "stream" and not m["transformers"]
    assert m["measured_peak_anon_bytes"] <= m["available_bytes"], m  # what the run allocated stayed in the cap
    assert m["parts_bytes"]["oracle"] < 873e6 / 8
    o = rep["oracle"]
    assert o["mode"] == "stream" and o["logits_calls"] >= 1 and 0 < o["peak_param_bytes"] <= m["parts_bytes"]["oracle"]
    assert set(o["seconds_by_block"]) == {"embed", "head", *map(str, range(8))}
    from nemoh.reports.conformance_html import render

    page = render(rep)  # the plan and the measured peak, on the page too
    assert "<h2>Memory</h2>" in page and "streamed block by block" in page and "transformers not run" in page
    cases = [c for run in rep["runs"] for c in run["results"]]
    assert {c["status"] for c in cases} == {"OK", "NOT_SUPPORTED"}
    assert all("transformers is not run at this size" in c["message"] for c in cases if c["status"] == "NOT_SUPPORTED")

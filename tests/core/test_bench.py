"""nemoh-bench's own logic (not its timings): statistics, IR-derived FLOPs and bytes against hand
counts, the correctness gate, the fit refusal, the JSON schema, the HTML page's escaping and the
CLI's exit codes. Runs are tiny (a few tokens) and probes small, so the file stays fast."""

from __future__ import annotations

import copy
import json
import math
import random
from importlib import resources

import jsonschema
import numpy as np
import pytest
import torch

from nemoh.backends.torch_backend import TorchBackend
from nemoh.bench import models as bench_models
from nemoh.bench.cli import main
from nemoh.bench.cost import active_params, decode_cost, memory_estimate, param_bytes_read, step_cost
from nemoh.bench.device import MemoryMeter, datasheet_key
from nemoh.bench.measure import gate
from nemoh.bench.models import BENCH_PRESETS, RandomWeights, bench_preset_config
from nemoh.bench.plan import Settings, check_fit, resolve_target, tie_tolerance
from nemoh.bench.run import run_bench
from nemoh.bench.stats import percentile, summarize
from nemoh.errors import NemohError
from nemoh.model.config import load_config, parse_config
from nemoh.model.ir import build_graph
from nemoh.model.presets import PRESETS, RELEASES_DIR
from nemoh.reports.bench_html import render

RELEASED = RELEASES_DIR
QUICK = dict(prompt_lengths=[8, 20], context_depths=[6, 12], decode_tokens=3, repeats=2, warmup=1,
             progress=False, probe_copy_bytes=4 << 20, probe_matmul_n=64)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These runs are a few tokens: on a shared 2-core machine, intra-op threads only wait on each
    other (a 10 ms scheduler slice per tiny op under load). Timings are not asserted anyway."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def schema() -> dict:
    return json.loads(resources.files("nemoh.reports").joinpath("bench.schema.json").read_text())


# ----------------------------------------------------------------------------------------------
# statistics

def test_percentiles_by_hand_and_against_numpy():
    xs = [4.0, 1.0, 3.0, 2.0]
    # rank q/100 * (n - 1) into sorted [1, 2, 3, 4]
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 4.0
    assert percentile(xs, 50) == 2.5
    assert percentile(xs, 90) == pytest.approx(3.7)
    assert percentile(xs, 99) == pytest.approx(3.97)
    assert percentile([7.0], 99) == 7.0
    rng = random.Random(0)
    for n in (2, 5, 17, 100):
        ys = [rng.expovariate(1.0) for _ in range(n)]
        for q in (10, 50, 90, 99):
            assert percentile(ys, q) == pytest.approx(float(np.percentile(ys, q)), rel=1e-12)
    with pytest.raises(ValueError):
        percentile([], 50)
    s = summarize([1.0, 2.0, 3.0, 4.0])
    assert s["n"] == 4 and s["mean"] == 2.5 and s["min"] == 1.0 and s["max"] == 4.0
    assert s["std"] == pytest.approx(math.sqrt(5 / 3))  # sample std
    assert s["spread"] == pytest.approx((3.7 - 1.3) / 2.5)  # (p90 - p10) / p50
    assert s["samples"] == [1.0, 2.0, 3.0, 4.0]


# ----------------------------------------------------------------------------------------------
# FLOPs and bytes from the IR, against hand counts

def tiny_moe_graph():
    return build_graph(parse_config(PRESETS["tiny-moe"].config), "float32")


def test_step_cost_tiny_moe_by_hand():
    """tiny-moe (MEM*EME): D 64, V 512, Mamba H 6 x P 16, N 16, G 2, K 4; attention 4 q / 2 kv heads
    x 24; MoE 8 experts top-2 of width 48 plus a shared expert of width 96; fp32 (4 bytes)."""
    g = tiny_moe_graph()
    assert g.config.pattern == "MEM*EME"
    D, V, H, P, N, G, K = 64, 512, 6, 16, 16, 2, 4
    Q, KV, Dh, E, k, I, Ish = 4, 2, 24, 8, 2, 48, 96
    d_inner, conv = H * P, H * P + 2 * G * N  # 96, 160
    in_proj = d_inner + conv + H  # 262
    mamba_p = D + D * in_proj + conv * K + conv + 3 * H + d_inner + d_inner * D
    moe_p = D + E * D + E + k * (I * D + D * I) + 2 * Ish * D  # only the 2 chosen experts
    attn_p = D + D * Q * Dh + 2 * D * KV * Dh + Q * Dh * D
    head_p = D + V * D
    active = D + 3 * mamba_p + 3 * moe_p + attn_p + head_p  # + one embedding row
    assert active_params(g) == active

    S = 10  # a decode step after 10 cached tokens
    c = step_cost(g, 1, 1, S)
    assert c.param_bytes == 4 * active
    fixed = 3 * (conv * (K - 1) + H * P * N) * 4  # conv + ssm state of the 3 Mamba layers, fp32
    kv_tok = 2 * KV * Dh * 4
    assert c.state_read_bytes == fixed + S * kv_tok
    assert c.state_write_bytes == fixed + kv_tok
    mamba_f = 2 * D * in_proj + 2 * K * conv + 5 * H * P * N + 2 * d_inner * D
    moe_f = 2 * D * E + k * 4 * D * I + 2 * 2 * D * Ish
    attn_f = 2 * D * Q * Dh + 2 * 2 * D * KV * Dh + 2 * Q * Dh * D + 4 * Q * Dh * (S + 1)
    assert c.flops == 3 * mamba_f + 3 * moe_f + attn_f + 2 * D * V

    T = 30  # prefill: every token through the layers, causal attention, lm_head on the last only
    p = step_cost(g, 1, T, 0)
    attn_keys = T * (T + 1) // 2
    assert p.flops == T * (3 * mamba_f + 3 * moe_f + attn_f - 4 * Q * Dh * (S + 1)) + 4 * Q * Dh * attn_keys \
        + 2 * D * V
    assert p.state_read_bytes == 0 and p.state_write_bytes == fixed + T * kv_tok
    # 30 tokens x top-2 reach all 8 experts: every expert's bytes are read once
    all_experts = 3 * E * 2 * I * D
    assert p.param_bytes == 4 * (active - 3 * k * 2 * I * D + all_experts - D + T * D)

    d = decode_cost(g, 1, S, 3)  # steps see S, S+1, S+2 cached tokens
    assert d.flops == sum(step_cost(g, 1, 1, S + i).flops for i in range(3))
    assert d.bytes == sum(step_cost(g, 1, 1, S + i).bytes for i in range(3))


def test_active_experts_nano_30b_by_hand():
    """Nemotron 3 Nano 30B-A3B: a decoded token reads 6 of 128 experts per MoE layer, plus the shared one."""
    g = build_graph(load_config(RELEASED / "NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.json"))
    c = g.config
    assert (c.pattern.count("M"), c.pattern.count("E"), c.pattern.count("*")) == (23, 23, 6)
    D, V = 2688, 131072
    d_inner, conv = 64 * 64, 64 * 64 + 2 * 8 * 128
    mamba = D + D * (d_inner + conv + 64) + conv * 4 + conv + 3 * 64 + d_inner + d_inner * D
    moe_dense = D + 128 * D  # norm, router gate (bf16)
    moe_experts_active = 6 * 2 * 1856 * D + 2 * 3712 * D  # 6 routed (up + down) + shared
    attn = D + D * 32 * 128 + 2 * D * 2 * 128 + 32 * 128 * D
    head = D + V * D
    active = D + 23 * mamba + 23 * (moe_dense + 128 + moe_experts_active) + 6 * attn + head
    assert active_params(g) == active
    assert 3.0e9 < active < 3.5e9 < g.params_total / 9  # "A3B": ~3B of 31.6B
    # bytes: bf16 everywhere but the fp32 router correction bias (128 per MoE layer)
    bytes_1 = 2 * (active - 23 * 128) + 4 * 23 * 128
    assert param_bytes_read(g, 1) == bytes_1
    # a 64-token step touches all experts (64 x 6 > 128): every parameter but the unread embedding rows
    total_bytes = sum(t.nbytes for t in g.params)
    assert param_bytes_read(g, 64) == total_bytes - 2 * (V - 64) * D
    dec = step_cost(g, 1, 1, 1000)
    kv = 6 * 2 * 2 * 128 * 2  # 6 attention layers, k and v, 2 kv heads x 128, bf16
    assert g.state_bytes_per_token == kv
    assert dec.state_read_bytes == g.state_bytes_per_sequence + 1000 * kv


def test_memory_estimate_and_fit_refusal():
    g = build_graph(load_config(RELEASED / "NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.json"))
    est = memory_estimate(g, 1, 2048, 2080)
    assert est["params_bytes"] == sum(t.nbytes for t in g.params) > 60e9
    assert est["state_bytes"] == 2 * (g.state_bytes_per_sequence + 2080 * g.state_bytes_per_token)
    assert est["total_bytes"] == est["params_bytes"] + est["state_bytes"] + est["activation_bytes"]
    target = resolve_target("nemotron-3-nano-30b-a3b", None)
    s = Settings(model="nemotron-3-nano-30b-a3b", backends=["torch"], prompt_lengths=[2048], context_depths=[2048])
    # ~60 GB of bf16 weights: not on a 48 GiB card, yes on an 80 GiB one
    with pytest.raises(NemohError, match=r"will not fit cuda \(L40\): about 59\.\d GiB needed.*48\.0 GiB free"):
        check_fit(target, s, 48 << 30, "cuda (L40)")
    assert check_fit(target, s, 80 << 30, "cuda (H100)")["fits"] is True


def test_fit_refusal_cli_exit_2(capsys):
    # fp64 Nano 30B needs ~250 GB: refused before a single weight is made
    code = main(["--backend", "torch", "--model", "nemotron-3-nano-30b-a3b", "--dtype", "float64",
                 "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "will not fit" in err and "GiB" in err and "Traceback" not in err


def test_bench_presets_match_released_configs():
    assert bench_preset_config("nemotron-3-nano-30b-a3b") == load_config(
        RELEASED / "NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.json")
    assert bench_preset_config("nemotron-h-8b") == load_config(RELEASED / "Nemotron-H-8B-Base-8K.json")
    nano9 = build_graph(bench_preset_config("nemotron-nano-9b-v2"))
    assert nano9.config.num_layers == 56 and nano9.config.hidden_size == 4480
    assert nano9.config.d_inner == 10240 != nano9.config.expand * 4480
    small = build_graph(bench_preset_config("cpu-small"))
    assert small.config.hidden_size == 1024 and small.config.num_layers == 8 and small.config.vocab_size == 32768


def test_random_weights_deterministic_and_checkpoint_like():
    g = tiny_moe_graph()
    w = RandomWeights(g, 7)
    a, b = w.read("layers.1.mixer.experts.up_proj"), RandomWeights(g, 7).read("layers.1.mixer.experts.up_proj")
    assert torch.equal(a, b) and a.shape == (8, 48, 64) and a.std() > 0
    assert not torch.equal(a, RandomWeights(g, 8).read("layers.1.mixer.experts.up_proj"))
    assert w.read("layers.1.mixer.gate.e_score_correction_bias").dtype == torch.float32
    loaded = dict(w.load(g))
    assert set(loaded) == {t.name for t in g.params}
    assert w.mismatches(loaded) == []
    loaded["lm_head.weight"] = loaded["lm_head.weight"] + 1
    assert w.mismatches(loaded) == ["lm_head.weight"]
    with pytest.raises(NemohError, match="another graph"):
        w.validate(build_graph(parse_config(PRESETS["tiny-dense"].config), "float32"))


def test_datasheet_names():
    assert datasheet_key("NVIDIA H100 80GB HBM3") == "H100 SXM"
    assert datasheet_key("NVIDIA H100 PCIe") == "H100 PCIe"
    assert datasheet_key("NVIDIA H100 NVL") == "H100 NVL"
    assert datasheet_key("NVIDIA H200") == "H200 SXM"
    assert datasheet_key("NVIDIA H200 NVL") == "H200 NVL"
    assert datasheet_key("NVIDIA A100-SXM4-80GB") is None


def test_cpu_memory_meter_sees_a_phase_allocation():
    meter = MemoryMeter(torch.device("cpu"))
    if not meter.resettable:
        pytest.skip("this kernel does not let a process reset its VmHWM")
    phase = meter.start()
    x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
    peak = meter.peak_since(phase)
    del x
    assert peak >= 60 << 20
    phase = meter.start()  # a fresh phase does not inherit the earlier peak
    assert meter.peak_since(phase) < 32 << 20


def test_cpu_memory_meter_counts_child_processes(tmp_path):
    """An out-of-process backend (llama.cpp's worker) is measured: its RSS counts in the meter's."""
    import subprocess
    import sys
    import time

    meter = MemoryMeter(torch.device("cpu"))
    if not meter.resettable:
        pytest.skip("this kernel does not let a process reset its VmHWM")
    ready = tmp_path / "ready"
    base = meter.current()
    child = subprocess.Popen([sys.executable, "-c", "import pathlib, sys, time\nx = bytearray(96 << 20)\n"
                              f"pathlib.Path({str(ready)!r}).touch()\ntime.sleep(30)"])
    try:
        for _ in range(300):
            if ready.exists():
                break
            time.sleep(0.05)
        assert ready.exists()
        assert meter.current() - base >= 90 << 20
    finally:
        child.kill()
        child.wait()


# ----------------------------------------------------------------------------------------------
# the gate

def test_gate_ok_near_tie_and_wrong():
    V = 10
    ref_logits = torch.zeros(1, 3, V)
    ref_logits[0, :, 3] = 5.0
    ref_logits[0, 1, 4] = 5.0 - 1e-6  # a near-tie at step 1
    ref_tokens = ref_logits.argmax(-1)
    assert gate(ref_tokens, ref_logits, ref_tokens, ref_logits, 1e-5)["status"] == "OK"
    mine = ref_logits.clone()
    mine[0, 1, 4] = 5.0 + 1e-6  # flips the near-tie
    g = gate(mine.argmax(-1), mine, ref_tokens, ref_logits, 1e-5)
    assert g["status"] == "OK" and g["first_diverging_step"] == 1 and g["near_ties"][0]["token"] == 4
    mine = ref_logits.clone()
    mine[0, 2, 7] = 9.0  # a clear difference at step 2
    g = gate(mine.argmax(-1), mine, ref_tokens, ref_logits, 1e-5)
    assert g["status"] == "WRONG" and g["first_diverging_step"] == 2
    assert g["divergence"]["token"] == 7 and g["divergence"]["reference_token"] == 3
    assert tie_tolerance("float32") == pytest.approx(4e-5)


class PerturbedTorch(TorchBackend):
    """The PyTorch executor with a bug that starts two tokens into decoding: a large bump on token 5
    once a sequence holds PERTURB_FROM tokens, in single-token steps only (prefill stays right)."""

    name = "perturbed"
    PERTURB_FROM = 8  # context depth 6 (QUICK) + 2 decode steps

    def forward(self, state, ids, mask=None, **kw):
        logits = super().forward(state, ids, mask, **kw)
        if ids.shape[1] == 1 and state.mask.shape[1] >= self.PERTURB_FROM:
            logits = logits.clone()
            logits[..., 5] += 1e3
        return logits


class NoMoE(TorchBackend):
    """Declines MoE ops: a capability gap is NOT_SUPPORTED, never a crash."""

    def supports(self, op_kind, dtype):
        from nemoh.runtime.backend import Support

        return Support.no("no MoE kernels yet") if op_kind.startswith("moe") else super().supports(op_kind, dtype)


class Crashing(TorchBackend):
    """Fails inside a decode step: an ERROR result for this runner, the others still measured."""

    def forward(self, state, ids, mask=None, **kw):
        if ids.shape[1] == 1:
            raise RuntimeError("kernel launch failed")
        return super().forward(state, ids, mask, **kw)


def test_unsupported_failing_and_unchecked_runners(capsys):
    s = Settings(model="tiny-moe", backends=["test_bench:NoMoE", "test_bench:Crashing", "torch"],
                 reference="none", **{**QUICK, "repeats": 1, "warmup": 0})
    res = run_bench(s)
    jsonschema.validate(json.loads(json.dumps(res)), schema(), cls=jsonschema.Draft202012Validator)
    by = {b["name"]: b for b in res["backends"]}
    assert "hf" not in by and res["reference"] is None
    assert by["test_bench:NoMoE"]["status"] == "NOT_SUPPORTED" and "moe_experts" in by["test_bench:NoMoE"]["error"]
    crash = by["test_bench:Crashing"]
    assert crash["status"] == "ERROR" and "kernel launch failed" in crash["error"]
    t = by["torch"]
    assert t["status"] == "UNCHECKED" and t["decode"][0]["ratio_to_reference"] is None
    assert t["decode"][0]["gate"]["status"] == "UNCHECKED" and t["decode"][0]["tpot_seconds"]["n"] == 3
    from nemoh.bench.cli import format_report

    text = format_report(res)
    assert "NOT_SUPPORTED" in text and "kernel launch failed" in text and "UNCHECKED" in text
    assert render(res).count("data:image/png;base64,") == 4


@pytest.fixture(scope="module")
def perturbed_run():
    s = Settings(model="tiny-moe", backends=["torch", "test_bench:PerturbedTorch"], **{**QUICK, "context_depths": [6]})
    return run_bench(s)


def test_gate_catches_a_wrong_backend(perturbed_run):
    res = perturbed_run
    by = {b["name"]: b for b in res["backends"]}
    assert by["hf"]["status"] == "REFERENCE" and by["torch"]["status"] == "OK"
    bad = by["test_bench:PerturbedTorch"]
    assert bad["status"] == "WRONG"
    assert all(w["gate"]["status"] == "OK" for w in bad["prefill"])  # single-token steps only are wrong
    (d,) = bad["decode"]
    ref_tokens = by["hf"]["decode"][0]["tokens"][0]
    assert 5 not in ref_tokens[2:]  # precondition: the reference never picks the bumped token
    assert d["gate"]["status"] == "WRONG" and d["gate"]["first_diverging_step"] == 2
    assert d["gate"]["divergence"]["token"] == 5
    assert d["tokens"][0][:2] == ref_tokens[:2]
    # a wrong run keeps its speed numbers, but they are never reported as OK
    assert d["tpot_seconds"]["p50"] > 0 and d["ratio_to_reference"] > 0


def test_cli_exit_1_on_a_wrong_backend(tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(["--backend", "test_bench:PerturbedTorch", "--model", "tiny-moe", "--prompt-lengths", "8",
                 "--context-depths", "6", "--decode-tokens", "3", "--repeats", "1", "--warmup", "0",
                 "--no-progress", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 1 and "WRONG@2" in text
    assert json.loads(out.read_text())["backends"][1]["status"] == "WRONG"


# ----------------------------------------------------------------------------------------------
# a real short run: schema, figures, HTML

@pytest.fixture(scope="module")
def short_run():
    return run_bench(Settings(model="tiny-moe", backends=["torch"], **QUICK), ["--model", "tiny-moe"])


def test_short_run_matches_schema_and_is_consistent(short_run):
    res = json.loads(json.dumps(short_run, allow_nan=False))  # what --json writes
    jsonschema.Draft202012Validator.check_schema(schema())
    jsonschema.validate(res, schema(), cls=jsonschema.Draft202012Validator)
    ref, torch_ = res["backends"]
    assert ref["name"] == "hf" and ref["status"] == "REFERENCE" and torch_["status"] == "OK"
    for part, n in (("prefill", 2), ("decode", 2)):
        assert len(torch_[part]) == n
        for w, rw in zip(torch_[part], ref[part]):
            assert w["gate"]["status"] == "OK" and w["repeat_identical"]
            assert w["tokens"] == rw["tokens"]
            # the executor's exported state is exactly what the IR says
            assert w["state_bytes_measured"] == w["state_bytes_ir"]
            stats = w["ttft_seconds"] if part == "prefill" else w["tpot_seconds"]
            assert stats["n"] == (2 if part == "prefill" else 2 * 3)  # warm-up excluded
            # the ratio is the ratio of the two throughputs printed beside it: they never contradict
            assert w["ratio_to_reference"] == pytest.approx(
                w["tokens_per_second"]["p50"] / rw["tokens_per_second"]["p50"])
            assert w["tokens_per_second"]["n"] == stats["n"]  # one rate per timed forward or step
    assert res["environment"]["loadavg_start"] is not None and res["model"]["kind"] == "checkpoint"
    assert 0.0 <= res["environment"]["cpu_foreign_fraction"] <= 1.05
    # the reference's label follows the installed transformers (the dt clamp is a 5.15-5.24 quirk)
    from nemoh.conformance.deviations import DEVIATIONS, installed_version

    clamp = next(d for d in DEVIATIONS if d.id == "hf-dt-clamp-prefill-only")
    version = installed_version("transformers")
    assert version is not None and version in ref["describe"]["note"]
    assert ref["describe"]["note"].startswith("dt clamp of" if clamp.expected(version) else "no dt clamp")
    # the schema rejects what it should
    broken = copy.deepcopy(res)
    broken["backends"][1]["decode"][0]["gate"]["status"] = "FAST"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema(), cls=jsonschema.Draft202012Validator)


def test_html_escapes_input_strings(short_run):
    res = copy.deepcopy(short_run)
    evil = '<script>alert("pwn")</script>$\\frac{1}{0}$'
    res["model"]["name"] = evil
    res["backends"][1]["name"] = "_" + evil
    res["command"] = f"nemoh-bench --model '{evil}'"
    html = render(res)
    assert "<script>" not in html and "alert(\"pwn\")" not in html
    assert "&lt;script&gt;alert(&#34;pwn&#34;)&lt;/script&gt;" in html
    assert html.count("data:image/png;base64,") == 4
    assert "http://" not in html and "https://" not in html  # self-contained


def test_in_memory_weights_run_end_to_end(monkeypatch):
    """A bench preset (random weights made in memory, no checkpoint) through both the executor and
    transformers: the same tensors reach both, so their greedy tokens agree."""
    tiny = bench_models.BenchPreset("test-tiny", "tiny-dense shapes, in memory", "test",
                                    copy.deepcopy(PRESETS["tiny-dense"].config), seed=5)
    monkeypatch.setitem(BENCH_PRESETS, "test-tiny", tiny)
    res = run_bench(Settings(model="test-tiny", backends=["torch"], **{**QUICK, "prompt_lengths": [8]}))
    assert res["model"]["kind"] == "bench-preset" and res["model"]["seed"] == 5
    assert [b["status"] for b in res["backends"]] == ["REFERENCE", "OK"]
    assert res["backends"][1]["decode"][1]["tokens"] == res["backends"][0]["decode"][1]["tokens"]


# ----------------------------------------------------------------------------------------------
# CLI

def test_cli_unknown_backend_and_model(capsys):
    assert main(["--backend", "torhc", "--model", "tiny-moe"]) == 2
    err = capsys.readouterr().err
    assert "Unknown backend 'torhc'. Did you mean: torch?" in err and "Traceback" not in err
    assert main(["--backend", "torch", "--model", "tiny-mo"]) == 2
    assert "Did you mean: tiny-moe" in capsys.readouterr().err
    assert main(["--backend", "torch", "--model", "tiny-moe", "--repeats", "0"]) == 2
    assert "--repeats must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--backend", "torch", "--model", "tiny-moe", "--dtype", "float8"])
    assert e.value.code == 2
    assert main(["--list-presets"]) == 0
    assert "nemotron-3-nano-30b-a3b" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_16_bit_run_completes_with_its_tie_margin_from_the_table(tmp_path, capsys, dtype):
    """nemoh-bench --dtype bfloat16 used to crash on a missing tolerance row (KeyError, exit 1, no report)."""
    from nemoh.bench.plan import tie_tolerance
    from nemoh.conformance.tolerances import TOLERANCES

    out = tmp_path / "r.json"
    code = main(["--backend", "torch", "--model", "tiny-dense", "--dtype", dtype, "--prompt-lengths", "8",
                 "--context-depths", "6", "--decode-tokens", "3", "--repeats", "1", "--warmup", "0", "--no-progress",
                 "--device", "cpu", "--json", str(out)])
    text = capsys.readouterr()
    assert code == 0, text
    res = json.loads(out.read_text())
    jsonschema.validate(res, schema(), cls=jsonschema.Draft202012Validator)
    assert res["tie_tolerance"] == TOLERANCES[("greedy_tie_margin", dtype)].value == tie_tolerance(dtype)
    assert TOLERANCES[("greedy_tie_margin", dtype)].reason.strip()


def test_every_dtype_has_a_tie_margin_and_a_missing_one_is_named():
    from nemoh import dtypes
    from nemoh.bench.plan import tie_tolerance

    for d in dtypes.NAMES:
        assert tie_tolerance(d) > 0
    with pytest.raises(NemohError, match="greedy_tie_margin row for int8"):
        tie_tolerance("int8")

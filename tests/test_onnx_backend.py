"""The ONNX Runtime executor (backends/onnx_backend.py, lowered by backends/onnx_export.py) on every
preset: against the fp64 oracle and the PyTorch executor, the chunking / decode / padding
equivalences for logits and carried state, the exported file, and its capability answers."""

from __future__ import annotations

import sys

import pytest
import torch

from nemoh.errors import NemohError
from nemoh.ir import OP_KINDS
from nemoh.presets import PRESETS, resolve_model
from nemoh.runtime import greedy_generate, open_model
from nemoh.tolerances import tol, top1_agreement

from model_checks import T, assert_close, assert_states_close, open_cached, oracle_logits, prompt, run_chunks

NAMES = sorted(PRESETS)


def model(name: str, dtype: str, backend: str = "onnx"):
    return open_cached(name, dtype, backend)


# -- against the references -----------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_fp32_vs_oracle_and_torch_executor(name):
    out = model(name, "float32").session(2).forward(prompt())
    assert out.dtype == torch.float32 and out.shape == (2, T, 512)
    assert_close(out, oracle_logits(name), "logits_rel_max_abs", "float32", f"{name} vs oracle")
    assert top1_agreement(out, oracle_logits(name)) >= tol("logits_top1", "float32")
    ref = model(name, "float32", "torch").session(2).forward(prompt())
    assert_close(out, ref, "logits_rel_max_abs", "float32", f"{name} vs torch executor")


@pytest.mark.parametrize("name", NAMES)
def test_fp64_graph_equals_oracle(name):
    """float64 is supported on purpose: run in fp64, the lowering itself is checked to 1e-12, so a
    lowering bug cannot hide under fp32 rounding."""
    out = model(name, "float64").session(2).prefill(prompt(), chunks=[100, T - 100])
    assert out.dtype == torch.float64
    assert_close(out, oracle_logits(name), "logits_rel_max_abs", "float64", name)


def test_fp16_runs_within_tolerance_or_says_why():
    be = model("tiny-moe", "float32").backend
    answers = {k: be.supports(k, "float16") for k in OP_KINDS}
    if all(s.ok for s in answers.values()):  # true with onnxruntime 1.32 on the CPU provider
        for name in NAMES:
            m = model(name, "float16")
            out = m.session(2).forward(prompt())
            assert out.dtype == torch.float32 and torch.isfinite(out).all()
            assert top1_agreement(out, oracle_logits(name)) >= tol("logits_top1", "float16"), name
            st = m.backend.export_state(m.session(1).state)
            assert st["layers.0.ssm"].dtype == torch.float32 and st["layers.0.conv"].dtype == torch.float16
    else:
        for s in answers.values():
            assert s.ok or "float16" in s.reason
        with pytest.raises(NemohError, match="float16"):
            open_model(resolve_model("tiny-moe"), "onnx", "float16", "cpu")


def test_bf16_is_not_supported_on_the_cpu_provider_and_says_why():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("the CUDA provider has bf16 kernels; this checks the CPU provider")
    be = model("tiny-moe", "float32").backend
    for kind in ("linear", "add", "moe_experts"):
        s = be.supports(kind, "bfloat16")
        assert not s.ok and "bfloat16" in s.reason and "Could not find an implementation" in s.reason, s
    assert be.supports("split", "bfloat16").ok  # answered per op kind, not per dtype
    with pytest.raises(NemohError, match=r"cannot run this model at bfloat16.*linear"):
        open_model(resolve_model("tiny-moe"), "onnx", "bfloat16", "cpu")


def test_supports_unknown_op_and_dtype():
    be = model("tiny-dense", "float32").backend
    assert be.supports("ssd_scan", "float32").ok
    assert not be.supports("rope", "float32").ok and "rope" in be.supports("rope", "float32").reason
    assert not be.supports("linear", "int8").ok


# -- equivalences --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_prefill_chunk_edge_and_random_splits(name):
    m = model(name, "float32")
    ids = prompt()
    whole, st_whole = run_chunks(m, ids, None)
    c, K = m.config.chunk_size, m.config.conv_kernel
    g = torch.Generator().manual_seed(len(name))
    random_splits = []
    for _ in range(2):
        cuts = sorted(set(torch.randint(1, T, (4,), generator=g).tolist()))
        random_splits.append([b - a for a, b in zip([0, *cuts], [*cuts, T])])
    for chunks in ([1, T - 1], [K - 2, 1, T - K + 1], [c - 1, T - c + 1], [c + 1, T - c - 1],
                   [c, c, T - 2 * c], *random_splits):
        logits, st_ = run_chunks(m, ids, chunks)
        assert_close(logits, whole, "equiv_rel_max_abs", "float32", f"{name} chunks {chunks}")
        assert_states_close(st_, st_whole, "float32", f"{name} chunks {chunks}")


@pytest.mark.parametrize("name", NAMES)
def test_decode_equals_prefill(name):
    m = model(name, "float32")
    ids = prompt()
    whole, st_whole = run_chunks(m, ids, None)
    s = m.session(2)
    s.prefill(ids[:, :T - 24])
    steps = torch.cat([s.forward(ids[:, t:t + 1]) for t in range(T - 24, T)], dim=1)
    assert_close(steps, whole[:, T - 24:], "equiv_rel_max_abs", "float32", f"{name} decode")
    assert_states_close(m.backend.export_state(s.state), st_whole, "float32", f"{name} decode")


def test_decode_from_the_first_token():
    """Every token a decode step from an empty state: conv state shorter than K-1, S = 0 at first."""
    m = model("tiny-moe", "float32")
    ids = prompt(2, 12, seed=4)
    whole, st_whole = run_chunks(m, ids, None)
    steps, st_steps = run_chunks(m, ids, [1] * 12)
    assert_close(steps, whole, "equiv_rel_max_abs", "float32", "decode from token 0")
    assert_states_close(st_steps, st_whole, "float32", "decode from token 0")


@pytest.mark.parametrize("name", NAMES)
def test_left_padded_batch_equals_each_sequence_alone(name):
    m = model(name, "float32")
    lengths = [T, 190, 37, 5]
    ids = torch.zeros(len(lengths), T, dtype=torch.int64)
    mask = torch.zeros(len(lengths), T, dtype=torch.int64)
    for b, n in enumerate(lengths):
        ids[b, T - n:] = prompt(1, n, seed=10 + b)[0]
        mask[b, T - n:] = 1
    s = m.session(len(lengths))
    batch = s.prefill(ids, mask, chunks=[100, T - 100])  # padding spanning a whole chunk, too
    nxt = prompt(len(lengths), 3, seed=99)
    steps = torch.cat([s.forward(nxt[:, t:t + 1]) for t in range(3)], 1)
    assert torch.isfinite(batch).all()  # padded rows have no visible key: zeros, not NaN
    for b, n in enumerate(lengths):
        alone = m.session(1)
        one = alone.prefill(ids[b:b + 1, T - n:])
        one_steps = torch.cat([alone.forward(nxt[b:b + 1, t:t + 1]) for t in range(3)], 1)
        assert_close(batch[b, T - n:], one[0], "equiv_rel_max_abs", "float32", f"{name} row {b}")
        assert_close(steps[b], one_steps[0], "equiv_rel_max_abs", "float32", f"{name} row {b} decode")


def test_repeated_runs_are_bit_identical_and_state_snapshots_are_independent():
    m = model("tiny-latent-moe", "float32")
    a = m.session(2).prefill(prompt(), chunks=[100, 160])
    b = m.session(2).prefill(prompt(), chunks=[100, 160])
    assert torch.equal(a, b)
    s = m.session(1)
    s.prefill(prompt(1, 50))
    snap = s.snapshot()
    first = s.forward(prompt(1, 3, seed=5))
    s.forward(prompt(1, 2, seed=6))  # moves on; the snapshot must not
    s.restore(snap)
    assert torch.equal(s.forward(prompt(1, 3, seed=5)), first)
    s.restore(snap)
    exported = m.backend.export_state(s.state)
    exported["layers.0.conv"].add_(1.0)  # an exported copy is the caller's: changing it changes nothing here
    s.restore(snap)
    exported = m.backend.export_state(s.state)
    s.state = m.backend.import_state(exported)
    assert torch.equal(s.forward(prompt(1, 3, seed=5)), first)


def test_last_only_runs_the_head_on_the_last_position():
    m = model("tiny-list", "float32")
    ids = prompt(2, 40, seed=9)
    full, last = m.session(2).forward(ids), m.session(2).forward(ids, last_only=True)
    assert last.shape == (2, 1, 512)
    assert_close(last, full[:, -1:], "equiv_rel_max_abs", "float32", "last_only")


def test_greedy_generation_matches_torch_executor():
    ids = prompt(1, 24, seed=3)
    toks, _ = greedy_generate(model("tiny-moe", "float32"), ids, 12)
    ref, _ = greedy_generate(model("tiny-moe", "float32", "torch"), ids, 12)
    assert toks.tolist() == ref.tolist()


def test_trace_gives_per_layer_and_per_op_outputs():
    m, t = model("tiny-latent-moe", "float32"), model("tiny-latent-moe", "float32", "torch")
    ids = prompt(2, 40, seed=8)
    tr_onnx, tr_torch = {}, {}
    out = m.session(2).forward(ids, trace=tr_onnx)
    t.session(2).forward(ids, trace=tr_torch)
    assert torch.equal(out, m.session(2).forward(ids))  # tracing does not change the result
    for i in range(m.config.num_layers):
        assert_close(tr_onnx[f"layers.{i}"], tr_torch[f"layers.{i}"], "logits_rel_max_abs", "float32", f"layer {i}")
    for name in ("layers.0.mixer.ssd", "layers.2.mixer.attention", "layers.1.mixer.experts", "norm_f"):
        assert_close(tr_onnx[name].reshape(tr_torch[name].shape), tr_torch[name], "logits_rel_max_abs", "float32",
                     name)


# -- weights, the file, the registry ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_initializers_are_bit_equal_to_the_file(dtype):
    m = model("tiny-latent-moe", dtype)
    loaded = {t.name: m.backend.read_param(t.name) for t in m.graph.params}
    assert m.checkpoint.mismatches(loaded) == []
    assert loaded["layers.1.mixer.gate.e_score_correction_bias"].dtype == torch.float32  # never rounded
    name = "layers.0.mixer.dt_bias"
    loaded[name] = loaded[name].clone()
    loaded[name].view(torch.int16 if dtype == "float16" else torch.int32)[0] ^= 1  # one bit
    assert m.checkpoint.mismatches(loaded) == [name]


@pytest.mark.parametrize("name", NAMES)
def test_lowered_graph_passes_checker_and_uses_standard_ops_only(name):
    import onnx

    from nemoh.backends.onnx_export import OPSET, check, io_names, lower_graph

    m = model(name, "float32")
    g = lower_graph(m.graph, m.checkpoint.load(m.graph))
    check(g)  # onnx.checker full_check + strict shape inference; raises on any problem
    assert [(o.domain, o.version) for o in g.opset_import] == [("", OPSET)]
    assert {n.domain for n in g.graph.node} <= {""}, "custom-domain node"
    schemas = {n.op_type for n in g.graph.node}
    assert all(onnx.defs.has(op, "") for op in schemas)
    ins, outs = io_names(m.graph)
    assert [i.name for i in g.graph.input] == ins and [o.name for o in g.graph.output] == outs
    inferred = onnx.shape_inference.infer_shapes(g, strict_mode=True)
    logits = next(o for o in inferred.graph.output if o.name == "logits")
    assert logits.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in logits.type.tensor_type.shape.dim] == ["batch", "kept_tokens", 512]
    # the graph is walked from the IR: every IR op left named nodes behind (except 1-input adds)
    scopes = {n.name.split("/")[0] for n in g.graph.node}
    assert all(op.name in scopes for b in m.graph.blocks for op in b.ops if op.kind != "add" or len(op.inputs) == 2)


def test_export_onnx_cli_writes_a_loadable_model_with_external_data(tmp_path, capsys):
    import numpy as np
    import onnx
    import onnxruntime as ort

    from nemoh.cli import main

    out = tmp_path / "exported"
    assert main(["export-onnx", "tiny-moe", "--out", str(out)]) == 0
    assert "model.onnx" in capsys.readouterr().out
    path, data = out / "model.onnx", out / "model.onnx.data"
    assert path.is_file() and data.is_file() and data.stat().st_size > path.stat().st_size
    light = onnx.load(str(path), load_external_data=False)
    ext = {t.name for t in light.graph.initializer if onnx.external_data_helper.uses_external_data(t)}
    assert "lm_head.weight" in ext and "layers.4.mixer.experts.up_proj" in ext
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    m = model("tiny-moe", "float32")
    ids = prompt(2, 20, seed=2)
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((2, 20), np.int64),
             "logits_to_keep": np.array(0, np.int64)}
    for s in m.graph.states:
        feeds[f"past.{s.name}"] = np.zeros((2, 0, *s.shape) if s.per_token else (2, *s.shape), np.float32)
    logits = torch.from_numpy(sess.run(["logits"], feeds)[0])
    assert_close(logits, m.session(2).forward(ids), "equiv_rel_max_abs", "float32", "exported file vs backend")
    # bad input: one line on stderr, exit 2
    assert main(["export-onnx", "tiny-moee", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tiny-moe" in err
    (tmp_path / "afile").write_text("")
    assert main(["export-onnx", "tiny-moe", "--out", str(tmp_path / "afile")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_the_session_runs_a_checked_file_whose_initializers_read_param_reads():
    import onnx

    from nemoh.backends.onnx_export import check

    m = model("tiny-dense", "float32")
    path = m.backend.describe()["model_file"]
    check(path)
    light = onnx.load(path, load_external_data=False)
    ext = {t.name for t in light.graph.initializer if onnx.external_data_helper.uses_external_data(t)}
    assert "lm_head.weight" in ext  # so read_param (bit-equal, tested above) reads the data file back
    assert {t.name for t in light.graph.initializer} == {t.name for t in m.graph.params}


def test_describe_reports_the_provider_that_ran():
    m = model("tiny-dense", "float32")
    d = m.backend.describe()
    assert d["backend"] == "onnx" and d["provider"] == m.backend.session.get_providers()[0] == "CPUExecutionProvider"
    assert d["device"] == "cpu" and d["dtype"] == "float32" and d["opset"] == 18 and "trace" in d


def test_unavailable_onnxruntime_is_a_support_answer_not_a_crash(monkeypatch):
    from nemoh.backends.onnx_backend import OnnxBackend
    from nemoh.registry import get_backend

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    be = get_backend("onnx")
    assert isinstance(be, OnnxBackend)
    s = be.available()
    assert not s.ok and "onnxruntime" in s.reason and "pip install" in s.reason
    assert not be.supports("linear", "float32").ok
    assert "unavailable" in be.describe()
    with pytest.raises(NemohError, match="backend 'onnx' is not available here"):
        open_model(resolve_model("tiny-dense"), "onnx", "float32", "cpu")


def test_cli_generate_with_the_onnx_backend(capsys):
    from nemoh.cli import main

    assert main(["generate", "tiny-moe", "--ids", "5,6,7,8", "-n", "4", "--backend", "onnx", "--device", "cpu"]) == 0
    got = capsys.readouterr().out.strip()
    assert main(["generate", "tiny-moe", "--ids", "5,6,7,8", "-n", "4", "--backend", "torch", "--device", "cpu"]) == 0
    assert got == capsys.readouterr().out.strip() and len(got.split(",")) == 4

"""What is particular to the ONNX Runtime executor (backends/onnx_backend.py, lowered by
backends/onnx_export.py): the exported file, its capability answers per provider and dtype, and
its command (the oracle checks and equivalences every backend holds are in test_equivalences.py)."""

from __future__ import annotations

import sys

import pytest
import torch
from model_checks import assert_close, open_cached, oracle_logits, prompt

from nemoh.conformance.tolerances import tol, top1_agreement
from nemoh.errors import NemohError
from nemoh.model.ir import OP_KINDS
from nemoh.model.presets import PRESETS, resolve_model
from nemoh.runtime.session import greedy_generate, open_model

NAMES = sorted(PRESETS)


def model(name: str, dtype: str, backend: str = "onnx"):
    return open_cached(name, dtype, backend)


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


def test_greedy_generation_matches_torch_executor():
    ids = prompt(1, 24, seed=3)
    toks, _ = greedy_generate(model("tiny-moe", "float32"), ids, 12)
    ref, _ = greedy_generate(model("tiny-moe", "float32", "torch"), ids, 12)
    assert toks.tolist() == ref.tolist()


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
    from nemoh.runtime.registry import get_backend

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

"""Quantized checkpoints (issue 20): ModelOpt's FP8 and NVFP4 read strictly, given an exact meaning, and
written the ModelOpt way. The oracle's decoders are checked bit-exactly against independent ones (the torch
executor's byte table, compressed-tensors' unpacker where installed, torch's own e4m3 cast), the loader's
refusals name the tensor and file, and the CLI says what a checkpoint is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nemoh.backends.torch_backend import TorchBackend, _byte_table
from nemoh.cli import main as cli_main
from nemoh.errors import WeightsError
from nemoh.model import presets as P
from nemoh.model.config import load_config
from nemoh.model.ir import build_graph
from nemoh.model.quant import QuantConfig, act_key, kv_key, parse_quant_config, quant_config_of, read_quant_config
from nemoh.model.quant_writer import e2m1_codes, pack_e2m1, quantize_fp8, quantize_nvfp4, write_quantized
from nemoh.model.weights import Checkpoint
from nemoh.oracle.ops import (
    QuantOptions,
    dequant_fp8,
    dequant_nvfp4,
    quant_act_fp8,
    quant_act_nvfp4,
    round_e2m1,
    round_e4m3,
)

GEN = torch.Generator().manual_seed(7)


@pytest.fixture(scope="module")
def fp8() -> Path:
    return P.cached_checkpoint("tiny-moe-fp8")


@pytest.fixture(scope="module")
def nvfp4() -> Path:
    return P.cached_checkpoint("tiny-wide-nvfp4")


def clone(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ck"
    shutil.copytree(src, dst)
    return dst


def edit(path: Path, fn) -> None:
    tensors = dict(load_file(path))
    fn(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})


def load_error(path: Path) -> str:
    with pytest.raises(WeightsError) as ei:
        Checkpoint(path).load(build_graph(load_config(path), "float32"))
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------------------------- config


def test_quant_config_nested_flat_and_wildcards():
    nested = {"producer": {"name": "modelopt", "version": "0.29.0"},
              "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8", "group_size": 16,
                               "exclude_modules": ["lm_head", "backbone.layers.4.mixer.in_proj",
                                                   "backbone.layers.5.mixer*"]}}
    qc = parse_quant_config(nested, "hf_quant_config.json")
    assert (qc.algo, qc.group_size, qc.kv_cache_algo, qc.producer) == ("NVFP4", 16, "FP8", "modelopt 0.29.0")
    assert qc.format_of("lm_head.weight") is None and qc.format_of("layers.4.mixer.in_proj.weight") is None
    assert qc.format_of("layers.5.mixer.q_proj.weight") is None  # wildcard
    assert qc.format_of("layers.4.mixer.out_proj.weight") == "nvfp4"
    assert qc.format_of("layers.14.mixer.in_proj.weight") == "nvfp4"  # fnmatch is exact, not a prefix
    assert qc.format_of("layers.1.mixer.experts.up_proj", 4) == "nvfp4"
    for never in ("embeddings.weight", "layers.0.mixer.conv1d.weight", "layers.1.mixer.gate.weight",
                  "layers.0.norm.weight", "layers.0.mixer.A_log"):
        assert qc.format_of(never) is None
    flat = {"quant_method": "modelopt", "quant_algo": "FP8", "exclude_modules": ["model.layers.0.mixer.*"]}
    qc = quant_config_of({"quantization_config": flat}, "config.json")
    assert qc is not None and qc.fmt == "fp8"
    assert qc.format_of("layers.0.mixer.in_proj.weight") is None  # the transformers spelling matches too
    partial = parse_quant_config({"quant_algo": "FP8", "exclude_modules": ["backbone.layers.1.mixer.experts.0.*"]},
                                 "x")
    with pytest.raises(WeightsError, match="some experts"):
        partial.format_of("layers.1.mixer.experts.up_proj", 4)


@pytest.mark.parametrize("raw, needle", [
    ({"quant_algo": "INT4_AWQ"}, "not supported"),
    ({"quant_algo": "NVFP4", "group_size": 32}, "blocks of 16"),
    ({"quant_algo": "FP8", "exclude_modules": "lm_head"}, "list of strings"),
    ({"quant_algo": "FP8", "kv_cache_quant_algo": "INT8"}, "kv_cache_quant_algo"),
    ({"group_size": 16}, "quant_algo"),
])
def test_quant_config_errors_name_the_file(raw, needle):
    with pytest.raises(WeightsError, match=needle) as ei:
        parse_quant_config(raw, "/m/hf_quant_config.json")
    assert str(ei.value).startswith("/m/hf_quant_config.json")
    with pytest.raises(WeightsError, match="modelopt"):
        quant_config_of({"quantization_config": {"quant_method": "gptq"}}, "config.json")


# ---------------------------------------------------------------------------------- exact meaning


def test_e4m3_rounding_matches_torch_cast():
    x = torch.randn(50_000, generator=GEN) * torch.exp2(torch.randint(-14, 10, (50_000,), generator=GEN).float())
    x = torch.cat([x, torch.tensor([448.0, 464.0, 470.0, 2.0 ** -9, 2.0 ** -10, 3 * 2.0 ** -11, 0.0, -0.0])])
    assert torch.equal(round_e4m3(x.double()), x.to(torch.float8_e4m3fn).double())
    assert round_e4m3(torch.tensor([1e6])).item() == 448.0  # saturating
    assert round_e4m3(torch.tensor([1.01]), mode="up").item() == 1.125


def test_e2m1_rounding_is_modelopts_cast_fp4():
    """ModelOpt's _cast_fp4: searchsorted over the midpoints, ties at 0.75, 1.75, 3.5 go up (to even)."""
    bounds = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    values = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6.0])
    a = torch.cat([torch.rand(20_000, generator=GEN) * 7, bounds, torch.tensor([6.0, 9.0])])
    ref = values[torch.searchsorted(bounds, a) + torch.isin(a, bounds[[1, 3, 5]])]
    assert torch.equal(round_e2m1(a.double()), ref.double())
    assert torch.equal(round_e2m1(-a.double()), -ref.double())
    assert round_e2m1(torch.tensor([2.5]), ties="away").item() == 3.0


def random_nvfp4(out=8, inp=64):
    packed = torch.randint(0, 256, (out, inp // 2), generator=GEN).to(torch.uint8)
    packed[0, :16] = torch.arange(16, dtype=torch.uint8) * 17  # every code in both nibbles
    packed[1, :16] = torch.arange(16, dtype=torch.uint8)
    bs = (torch.rand(out, inp // 16, generator=GEN) * 400 + 2.0 ** -9).to(torch.float8_e4m3fn)
    return packed, bs, torch.tensor(0.00123, dtype=torch.float32)


def test_nvfp4_dequant_matches_a_byte_table_decoder():
    """The oracle's nibble unpacker against the torch executor's independent [256, 2] byte table."""
    packed, bs, g = random_nvfp4()
    values = _byte_table()[packed.long()].flatten(-2)  # [out, in]
    ref = values * bs.double().repeat_interleave(16, -1) * g.double()
    assert torch.equal(dequant_nvfp4(packed, bs, g), ref)
    assert dequant_nvfp4(packed, bs, g)[0, :2].tolist() == [0.0 * 1, 0.0]  # byte 0x00
    assert _byte_table()[0x21].tolist() == [0.5, 1.0]  # low nibble first


def test_nvfp4_dequant_matches_compressed_tensors():
    try:
        from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    except ImportError:
        pytest.skip("compressed-tensors is not installed (pip install 'compressed-tensors>=0.20'): the second "
                    "independent NVFP4 decoder")
    packed, bs, g = random_nvfp4()
    v = unpack_fp4_from_uint8(packed, packed.shape[0], packed.shape[1] * 2, dtype=torch.float64)
    ref = v * bs.double().repeat_interleave(16, -1) * g.double()
    assert torch.equal(dequant_nvfp4(packed, bs, g), ref)


def test_writer_quantizes_as_modelopt_and_round_trips():
    w = torch.randn(24, 256, generator=GEN)
    w[3, 16:32] = 0.0  # a zero block: scale 1, codes 0
    packed, bs, g = quantize_nvfp4(w)
    assert packed.dtype == torch.uint8 and packed.shape == (24, 128) and bs.shape == (24, 16)
    assert g.item() == pytest.approx(w.abs().max().item() / (6 * 448), rel=1e-7)
    assert bs[3, 1].float().item() == 1.0 and (packed[3, 8:16] == 0).all()
    deq = dequant_nvfp4(packed, bs, g)
    # each element is within half an e2m1 step (<= 1/3 relative for |q| >= 1.5, 0.25 units near zero) of w
    unit = (bs.double() * g.double()).repeat_interleave(16, -1)
    assert ((deq - w.double()).abs() <= unit * 1.0 + 1e-12).all()
    assert torch.equal(pack_e2m1(e2m1_codes(torch.tensor([[0.5, -6.0]]))), torch.tensor([[0xF1]], dtype=torch.uint8))
    q, s = quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == () and torch.equal(dequant_fp8(q, s), q.double() * s.double())


def test_activation_quantizers_oracle_vs_executor_and_by_hand():
    x = torch.randn(3, 5, 64, generator=GEN, dtype=torch.float64) * 3
    x[0, 0, :16] = 0.0  # a zero block
    x[0, 1, 16:32] *= 1000  # a block beyond the calibration amax: the block scale saturates at 448
    s = torch.tensor(2.0 / (6 * 448), dtype=torch.float32)
    be = TorchBackend()
    be.acc = torch.float64
    assert torch.equal(quant_act_nvfp4(x, s), be._act_nvfp4(x, s))
    assert torch.equal(quant_act_fp8(x, s), be._act_fp8(x, s))
    # by hand: amax 6 and input_scale 1 give the block scale 1, so each value just rounds to e2m1
    blk = torch.tensor([0.3, -0.8, 1.3, 2.6, 5.2, -6.0] + [0.0] * 10, dtype=torch.float64)
    want = torch.tensor([0.5, -1.0, 1.5, 3.0, 6.0, -6.0] + [0.0] * 10, dtype=torch.float64)
    assert torch.equal(quant_act_nvfp4(blk, torch.tensor(1.0)), want)
    assert torch.allclose(quant_act_nvfp4(blk / 3, torch.tensor(1.0 / 3)), want / 3)  # block scale e4m3(1) again
    assert torch.equal(quant_act_nvfp4(x, s, opts=QuantOptions(scale_overflow="inf"))[0, 1, 16:32],
                       round_e2m1(x[0, 1, 16:32] / (round_e4m3(x[0, 1, 16:32].abs().max() / s.double() / 6,
                                                               saturate=False) * s.double()))
                       * round_e4m3(x[0, 1, 16:32].abs().max() / s.double() / 6, saturate=False) * s.double())


# ---------------------------------------------------------------------------------- loading


def test_quantized_checkpoints_load_single_and_sharded(fp8, nvfp4):
    nano = P.cached_checkpoint("tiny-nano-30b-nvfp4")  # sharded (2 files), MoE experts per-expert scales
    assert len(list(nano.glob("model-*.safetensors"))) == 2
    for path, fmt, n in ((fp8, "fp8", 22), (nvfp4, "nvfp4", 12), (nano, "nvfp4", 16)):
        ck = Checkpoint(path)
        g = build_graph(load_config(path), "float64")
        formats = ck.formats(g)
        assert set(formats.values()) == {fmt} and len(formats) == n, (path, formats)
        assert "lm_head.weight" not in formats
        if path == nano:  # 128 experts: validated only (dequantizing them all costs seconds)
            ck.validate(g)
            continue
        params = ck.load(g)
        for w in formats:
            assert act_key(w, fmt) in params
        assert not any(k.startswith("lm_head.weight:") for k in params)
    ck = Checkpoint(nano)
    up = ck.read_aux("layers.1.mixer.experts.up_proj", "weight_scale_2")
    assert up is not None and up.shape == (128,)  # one global scale per expert, stacked
    assert ck.read_aux("layers.1.mixer.experts.up_proj", "weight_scale").shape[:2] == (128, 64)
    hub = json.loads((nano / "hf_quant_config.json").read_text())
    assert hub["quantization"]["quant_algo"] == "NVFP4" and hub["quantization"]["group_size"] == 16
    assert json.loads((nano / "config.json").read_text())["quantization_config"]["quant_method"] == "modelopt"


STRICT = {  # name -> (checkpoint fixture, edit of the file's tensors, words the one-line error must hold)
    "scale of the wrong shape": ("nvfp4", lambda t: t.__setitem__(
        "backbone.layers.0.mixer.in_proj.weight_scale", t["backbone.layers.0.mixer.in_proj.weight_scale"][:, :-1]),
        ["backbone.layers.0.mixer.in_proj.weight_scale", "shape"]),
    "packed weight of the wrong size": ("nvfp4", lambda t: t.__setitem__(
        "backbone.layers.0.mixer.out_proj.weight", t["backbone.layers.0.mixer.out_proj.weight"][:, :-1]),
        ["backbone.layers.0.mixer.out_proj.weight", "shape"]),
    "packed weight of the wrong dtype": ("nvfp4", lambda t: t.__setitem__(
        "backbone.layers.0.mixer.out_proj.weight", t["backbone.layers.0.mixer.out_proj.weight"].to(torch.int8)),
        ["backbone.layers.0.mixer.out_proj.weight", "I8", "U8"]),
    "fp8 weight stored as e5m2": ("fp8", lambda t: t.__setitem__(
        "backbone.layers.0.mixer.in_proj.weight", t["backbone.layers.0.mixer.in_proj.weight"].to(torch.float8_e5m2)),
        ["backbone.layers.0.mixer.in_proj.weight", "F8_E5M2", "F8_E4M3"]),
    "missing global scale": ("nvfp4", lambda t: t.pop("backbone.layers.2.mixer.in_proj.weight_scale_2"),
                             ["backbone.layers.2.mixer.in_proj.weight", "weight_scale_2", "missing"]),
    "missing expert scale": ("fp8", lambda t: t.pop("backbone.layers.1.mixer.experts.3.up_proj.weight_scale"),
                             ["layers.1.mixer.experts.up_proj", "experts [3]"]),
    "scale of an unquantized module": ("nvfp4", lambda t: t.__setitem__(
        "lm_head.weight_scale_2", torch.tensor(1.0)), ["lm_head.weight_scale_2", "not quantized"]),
    "excluded module stored quantized": ("nvfp4", lambda t: t.__setitem__(
        "backbone.layers.3.mixer.q_proj.weight", t["backbone.layers.3.mixer.q_proj.weight"].to(torch.float8_e4m3fn)),
        ["backbone.layers.3.mixer.q_proj.weight", "F8_E4M3", "unquantized"]),
}


@pytest.mark.parametrize("case", sorted(STRICT))
def test_strict_checks_name_the_tensor_and_file(case, request, tmp_path):
    which, fn, needles = STRICT[case]
    path = clone(request.getfixturevalue(which), tmp_path)
    files = sorted(path.glob("*.safetensors"))
    edit(files[0], fn)
    msg = load_error(path)
    assert str(files[0]) in msg, msg
    for n in needles:
        assert n in msg, (n, msg)


def test_scales_without_a_quant_config_are_refused_and_the_cli_exits_2(fp8, tmp_path, capsys):
    path = clone(fp8, tmp_path)
    (path / "hf_quant_config.json").unlink()
    cfg = json.loads((path / "config.json").read_text())
    del cfg["quantization_config"]
    (path / "config.json").write_text(json.dumps(cfg))
    assert "quantization scale" in load_error(path)
    assert cli_main(["verify", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "quantization scale" in err and "Traceback" not in err


def test_inspect_names_the_quantization(nvfp4, capsys):
    assert cli_main(["inspect", str(nvfp4), "--json"]) == 0
    q = json.loads(capsys.readouterr().out)["quantization"]
    assert q["algo"] == "NVFP4" and q["group_size"] == 16 and q["kv_cache"] == "unquantized"
    assert q["exclude_modules"] == ["lm_head", "backbone.layers.3.mixer.*"]
    assert set(q["unquantized_linears"]) == {"lm_head.weight", *(f"layers.3.mixer.{p}_proj.weight" for p in "qkvo")}
    assert 0.5 < q["quantized_bytes_per_param"] < 0.57 and q["bytes_per_param"] < 4
    assert cli_main(["inspect", "tiny-moe-fp8"]) == 0
    out = capsys.readouterr().out
    assert "quantization: FP8" in out and "exclude_modules: lm_head" in out


def test_verify_compares_dequantized_weights_and_stored_codes(nvfp4, capsys):
    assert cli_main(["verify", str(nvfp4)]) == 0
    out = capsys.readouterr().out
    assert "stored NVFP4 codes and scales bit-equal" in out and "MISMATCH" not in out


@pytest.mark.slow  # importing modelopt takes ~13 s; `nox -s quant` installs it and runs this
def test_writer_is_bit_exact_with_modelopt():
    """nemoh's writer against ModelOpt's own quantizers (NVFP4QTensor, FP8QTensor) on the CPU: the same packed
    bytes, block scales and global scale. ModelOpt's own NVFP4 dequantize rounds in fp32 (its e2m1 table and the
    block x global product are fp32): within 1 fp32 ulp of the exact fp64 dequant_nvfp4."""
    try:
        from modelopt.torch.quantization.qtensor.fp8_tensor import FP8QTensor
        from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor
    except ImportError:
        pytest.skip("nvidia-modelopt is not installed (pip install nvidia-modelopt; CPU is enough)")
    w = torch.randn(64, 256, generator=GEN)
    w[5, :16] = 0.0
    q, bs, g = NVFP4QTensor.quantize(w.clone(), 16)
    p2, bs2, g2 = quantize_nvfp4(w)
    assert torch.equal(q._quantized_data, p2) and torch.equal(bs.view(torch.uint8), bs2.view(torch.uint8))
    assert torch.equal(g.reshape(()), g2)
    deq = q.dequantize(dtype=torch.float64, scale=bs, double_scale=g, block_sizes={-1: 16})
    exact = dequant_nvfp4(p2, bs2, g2)
    assert ((deq - exact).abs() <= exact.abs() * 2.0 ** -23).all()
    qf, sf = FP8QTensor.quantize(w.clone())[:2]
    q8, s8 = quantize_fp8(w)
    assert torch.equal(qf._quantized_data.view(torch.uint8), q8.view(torch.uint8))
    assert sf.reshape(()).item() == s8.item()


def test_modelopt_sentinel_residue_is_stripped_from_exclude_modules(nvfp4, tmp_path):
    """nvidia-modelopt 0.47.0 (transformers 5.14 and 5.25) writes a Nemotron-H export's exclude_modules as
    'lm_head.\\x00backbone.pt_name_sentinel' (its rename sentinel mangled): nemoh reads the module names."""
    s = ".\x00backbone.pt_name_sentinel"
    qc = parse_quant_config({"quantization": {"quant_algo": "NVFP4", "group_size": 16, "exclude_modules": [
        "lm_head" + s, "backbone.layers.1.mixer.gate" + s, "backbone.layers.3.mixer" + s + ".*"]}}, "x")
    assert qc.exclude_modules == ("lm_head", "backbone.layers.1.mixer.gate", "backbone.layers.3.mixer.*")
    assert qc.format_of("lm_head.weight") is None and qc.format_of("layers.3.mixer.q_proj.weight") is None
    assert qc.repaired == ("lm_head" + s, "backbone.layers.1.mixer.gate" + s, "backbone.layers.3.mixer" + s + ".*")
    path, hq = clone(nvfp4, tmp_path), json.loads((nvfp4 / "hf_quant_config.json").read_text())
    hq["quantization"]["exclude_modules"] = [p + s for p in hq["quantization"]["exclude_modules"]]
    (path / "hf_quant_config.json").write_text(json.dumps(hq))  # read, and the repair said out loud
    assert any("residue of ModelOpt's name sentinel" in n for n in Checkpoint(path).notices)


@pytest.mark.slow  # ModelOpt's own PTQ + export_hf_checkpoint on the CPU (docs/quantized-formats.md); nox -s quant
@pytest.mark.parametrize("algo", ["NVFP4", "FP8"])
def test_modelopt_export_is_read_and_the_torch_executor_matches_the_oracle(algo, tmp_path):
    try:
        import modelopt.torch.quantization as mtq
        from modelopt.torch.export import export_hf_checkpoint
    except ImportError:
        pytest.skip("nvidia-modelopt is not installed (pip install nvidia-modelopt; CPU is enough)")
    from transformers import AutoModelForCausalLM

    from nemoh.conformance.runner import run_conformance

    model = AutoModelForCausalLM.from_pretrained(P.cached_checkpoint(P.original_of("tiny-nvfp4-64")),
                                                 dtype=torch.float32).eval()
    ids = torch.randint(4, 512, (2, 96), generator=torch.Generator().manual_seed(20))
    with torch.no_grad():
        model = mtq.quantize(model, getattr(mtq, f"{algo}_DEFAULT_CFG"), lambda m: m(input_ids=ids))
        export_hf_checkpoint(model, export_dir=tmp_path)
    qc = read_quant_config(tmp_path)
    assert qc is not None and qc.algo == algo and qc.producer.startswith("modelopt")
    assert "lm_head" in qc.exclude_modules  # ModelOpt's defaults: lm_head, embeddings, conv1d, router (gate)
    assert qc.format_of("layers.3.mixer.q_proj.weight") == algo.lower()  # attention quantized by default
    for dtype in ("float64", "float32"):
        report = run_conformance(str(tmp_path), ["torch"], [dtype], ["logits", "weights"], progress=False,
                                 deviations=False)
        assert report["summary"]["exit_code"] == 0, (dtype, report["summary"])


def test_fp32_logits_pass_and_the_quant_suite_scores_against_the_unquantized_original():
    """At fp32 the float32+actq rows judge (the rounding cascade; docs/quantized-formats.md) and the run passes;
    the quant suite compares with the original."""
    from nemoh.conformance.runner import run_conformance
    from nemoh.conformance.tolerances import tol

    report = run_conformance("tiny-wide-nvfp4", ["torch"], ["float32"], ["logits", "quant"], progress=False,
                             deviations=False)
    assert report["summary"]["exit_code"] == 0
    assert tol("logits_rel_max_abs", "float32") == 2e-5  # the variant ended with the run
    results = report["runs"][0]["results"]
    oracle_cases = [r for r in results if r["suite"] == "logits" and r["status"] == "OK"]
    assert oracle_cases and all(r["status"] in ("OK", "NOT_SUPPORTED") for r in results if r["suite"] == "logits")
    (res,) = [r for r in results if r["suite"] == "quant"]
    assert res["status"] == "OK" and res["name"].startswith("NVFP4-vs-original"), res
    d = res["details"]
    assert d["vs_quantized_oracle"]["kl"] < 1e-6  # the executor runs the quantized meaning
    assert d["quantized_oracle_vs_original_oracle"]["kl"] > 1e-3  # and the format costs something measurable
    assert 0 < d["vs_f32"]["kl_se"] < d["vs_f32"]["kl"] and d["vs_f32"]["n"] == 2 * (128 + 37 - 1)


def test_fp8_kv_cache_scales_are_read_validated_and_flagged(nvfp4, tmp_path):
    path = clone(nvfp4, tmp_path)
    hq = json.loads((path / "hf_quant_config.json").read_text())
    hq["quantization"]["kv_cache_quant_algo"] = "FP8"
    (path / "hf_quant_config.json").write_text(json.dumps(hq))
    f = path / "model.safetensors"
    edit(f, lambda t: t.update({"backbone.layers.3.mixer.k_proj.k_scale": torch.tensor(0.01),
                                "backbone.layers.3.mixer.v_proj.v_scale": torch.tensor(0.02)}))
    ck = Checkpoint(path)
    params = ck.load(build_graph(load_config(path), "float32"))
    assert any("kv_cache_quant_algo FP8: K and V are cached" in n and "1.0" not in n for n in ck.notices)
    assert params[kv_key(3, "k")].item() == pytest.approx(0.01) and params[kv_key(3, "v")].item() == pytest.approx(0.02)
    edit(f, lambda t: t.pop("backbone.layers.3.mixer.v_proj.v_scale"))
    ck = Checkpoint(path)
    assert ck.load(build_graph(load_config(path), "float32"))[kv_key(3, "v")].item() == 1.0  # vLLM's default
    assert any("layers.3 carry no k_scale/v_scale, so 1.0" in n for n in ck.notices), ck.notices
    edit(f, lambda t: t.update({"backbone.layers.3.mixer.k_proj.k_scale": torch.ones(2)}))
    assert "backbone.layers.3.mixer.k_proj.k_scale" in load_error(path)


def test_a_backend_that_cannot_quantize_activations_is_not_supported_not_failed():
    """An executor that only dequantizes the weights computes another model: the runner asks its `quant_<fmt>`
    capability before loading, and every case is NOT_SUPPORTED with the reason (a backend that does not list the
    capability is assumed to run the format, and is judged)."""
    from nemoh.conformance.runner import run_conformance
    from nemoh.runtime.backend import BackendBase, Support, unsupported_reason

    class DequantOnly(BackendBase):
        name = "dequant-only"
        optional_capabilities = ("quant_nvfp4",)

        def supports(self, op_kind, dtype):
            return Support.no("weights only") if op_kind == "quant_nvfp4" else super().supports(op_kind, dtype)

    class Unaware(BackendBase):
        name = "unaware"

    g = build_graph(load_config(P.cached_checkpoint("tiny-wide-nvfp4")), "float32")
    assert unsupported_reason(DequantOnly(), g, quant="nvfp4") == (
        "backend 'dequant-only' cannot run a ModelOpt NVFP4 checkpoint as it means: weights only")
    assert unsupported_reason(DequantOnly(), g, quant="fp8") == ""
    assert unsupported_reason(DequantOnly(), g) == ""
    assert unsupported_reason(Unaware(), g, quant="nvfp4") == ""

    pytest.importorskip("onnxruntime", reason="the onnx extra: pip install 'nemoh[onnx]'")
    report = run_conformance("tiny-moe-fp8", ["onnx"], ["float32"], ["logits"], progress=False, deviations=False)
    results = report["runs"][0]["results"]
    assert results and all(r["status"] == "NOT_SUPPORTED" for r in results), results
    assert all("cannot run a ModelOpt FP8 checkpoint as it means" in r["message"] for r in results)
    assert report["summary"]["exit_code"] != 0  # nothing was judged


def test_bf16_logits_on_a_quantized_checkpoint_are_undecidable_with_both_distances_reported():
    """At bf16 the fp64 oracle moves beyond the bf16 rows when only its quantizers' inputs are rounded to bf16 (the
    tiny presets' logits are chaotic in the quantizers' step boundaries): the logits-vs-oracle cases say so, with
    the executor's distance and that floor, instead of a FAIL no executor could avoid; fp32 is still judged."""
    from nemoh.conformance.runner import run_conformance

    report = run_conformance("tiny-moe-fp8", ["torch"], ["float32", "bfloat16"], ["logits"], progress=False,
                             deviations=False)
    by_dtype = {run["dtype"]: [r for r in run["results"] if "ref=oracle" in r["id"]] for run in report["runs"]}
    assert by_dtype["float32"] and all(r["status"] == "OK" for r in by_dtype["float32"])
    for r in by_dtype["bfloat16"]:
        assert r["status"] == "NOT_SUPPORTED" and r["message"].startswith("undecidable at bfloat16"), r
        floor = r["details"]["rounding_floor"]
        assert floor["logits_kl"] > 0.05 and floor["logits_top1"] < 0.9  # the floor itself is out of tolerance
        assert all(m["tolerance"] is None for m in r["metrics"])  # reported, not judged


@pytest.fixture(scope="module")
def kv_fp8(tmp_path_factory) -> Path:
    """tiny-wide-nvfp4 written again with kv_cache_quant_algo FP8 (as NVIDIA's Nano NVFP4 release): k_scale and
    v_scale calibrated next to the excluded attention layer's k_proj / v_proj."""
    qc = read_quant_config(P.cached_checkpoint("tiny-wide-nvfp4"))
    assert qc is not None
    out = tmp_path_factory.mktemp("kv") / "tiny-wide-nvfp4-kv"
    orig = P.original_of("tiny-wide-nvfp4")
    assert orig is not None
    return write_quantized(P.cached_checkpoint(orig), out, QuantConfig(qc.algo, qc.group_size, qc.exclude_modules,
                                                                       "FP8", "test"))


def test_fp8_kv_cache_is_applied_by_the_oracle_the_stream_and_the_torch_executor(kv_fp8):
    """The oracle caches K and V as e4m3(x / scale) * scale (QuantOptions.kv_cache='checkpoint'), which moves the
    logits; the streamed oracle serves the same scales (bit-equal); the torch executor matches at fp64, and one
    that ignores the directive FAILs, localised to the attention layer; onnx answers NOT_SUPPORTED."""
    from dataclasses import replace

    from nemoh import oracle
    from nemoh.conformance.runner import run_conformance
    from nemoh.oracle.ops import DEFAULT_QUANT
    from nemoh.oracle.stream import StreamedParams
    from nemoh.runtime.backend import unsupported_reason
    from nemoh.runtime.registry import get_backend

    g = build_graph(load_config(kv_fp8), "float64")
    ck = Checkpoint(kv_fp8)
    params = ck.load(g)
    assert 0 < params[kv_key(3, "k")].item() < 1 and "backbone.layers.3.mixer.k_proj.k_scale" in load_file(
        kv_fp8 / "model.safetensors")
    ids = torch.randint(4, 512, (2, 40), generator=GEN)
    ref = oracle.run(g, params, ids)
    plain = oracle.run(g, params, ids, qopts=replace(DEFAULT_QUANT, kv_cache="compute"))
    assert (ref - plain).abs().max() > 1e-3 * ref.abs().max()  # the FP8 cache is applied and matters
    assert torch.equal(oracle.run(g, StreamedParams(ck, g), ids), ref)

    report = run_conformance(str(kv_fp8), ["torch", "broken_backends:KvCacheNotQuantized"], ["float64"], ["logits"],
                             progress=False, deviations=False)
    good, bad = ([r for r in run["results"] if "ref=oracle" in r["id"]] for run in report["runs"])
    assert good and all(r["status"] == "OK" for r in good), good
    assert bad and all(r["status"] == "FAIL" for r in bad), bad
    assert any((r["localisation"] or {}).get("op") == "layers.3.mixer.attention" for r in bad), \
        [r["localisation"] for r in bad]
    onnx = get_backend("onnx")
    if onnx.available().ok:
        assert "cannot keep the FP8 KV cache" in unsupported_reason(onnx, g, None, None, "fp8")

"""The CuPy executor on ModelOpt checkpoints (backends/cupy_quant.py, cupy_kernels/quant.cu), on the CPU emulator
(`cupy-emulated`): NVFP4 linears packed and decoded in the GEMV, every quantized linear's input quantized, against
the torch executor (which passes the quantized oracle) through every path: prefill of > 8 rows (cuBLAS on the
dequantized scratch, expert-sorted MoE), prefill of <= 8 rows (the GEMVs, the gathered MoE) and decode steps
(eager warm-up, graph capture, replays). The quantizer kernels themselves: tests/backends/quant_kernel_checks.py.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from nemoh.backends import cuda_emu
from nemoh.backends import cupy_backend as cb
from nemoh.conformance.tolerances import rel_max_abs, top1_agreement
from nemoh.runtime.session import open_model

if shutil.which(cuda_emu.CXX) is None:
    pytest.fail(f"the CUDA emulator needs {cuda_emu.CXX} (apt-get install g++)", pytrace=False)


def _pair(name: str, dtype: str):
    return (open_model(name, cb.CupyEmulatedBackend(schedules=1), dtype),
            open_model(name, "torch", dtype, device="cpu"))


def _close(a: torch.Tensor, b: torch.Tensor, dtype: str) -> None:
    if dtype == "float32":
        assert rel_max_abs(a.double(), b.double()) < 1e-5
    else:
        assert top1_agreement(a, b) >= 0.9


@pytest.mark.parametrize("name,dtype", [("tiny-nano-30b-nvfp4", "float32"), ("tiny-moe-fp8", "float32"),
                                        pytest.param("tiny-wide-nvfp4", "bfloat16", marks=pytest.mark.slow)])
def test_quantized_checkpoint_matches_torch(name, dtype):
    cu, th = _pair(name, dtype)
    ids = torch.randint(4, cu.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(5))
    _close(cu.session(2).prefill(ids), th.session(2).prefill(ids), dtype)  # 24 rows: GEMMs, sorted experts
    a, b = cu.session(2), th.session(2)
    _close(a.prefill(ids[:, :3]), b.prefill(ids[:, :3]), dtype)  # 6 rows: the GEMVs, gathered experts
    for j in range(3, 7):  # decode: warm-up, capture, replays
        _close(a.prefill(ids[:, j:j + 1]), b.prefill(ids[:, j:j + 1]), dtype)
    assert cu.backend._dec(a.state)["aq"].size == 2 * cu.backend._act_elems > 0


def test_packed_weights_and_what_describe_says():
    cu, th = _pair("tiny-nano-30b-nvfp4", "float32")
    be = cu.backend
    q = be.describe()["quantized"]
    assert q["formats"] == {"nvfp4": 16} and q["activations_quantized"] == 16
    assert "layers.0.mixer.in_proj.weight" in q["packed_nvfp4"] and "layers.0.mixer.in_proj.weight" not in be.p
    assert all(n.endswith(("experts.up_proj", "experts.down_proj")) for n in q["held_dequantized"])
    # what a decode token streams: 4.5 bits a packed weight (+ its fp32 global scale), the rest at fp32
    c, g = cu.config, be.graph
    want = 0
    for t in g.params:
        if t.name in be.packed:
            want += t.shape[0] * t.shape[1] * 9 // 16 + 4
        elif t.name.endswith(("experts.up_proj", "experts.down_proj")):
            want += c.num_experts_per_tok * t.shape[1] * t.shape[2] * 4
        elif t.name.endswith("proj.weight") or t.name == "lm_head.weight":
            want += t.shape[0] * t.shape[1] * 4
    assert q["decode_linear_bytes_per_token"] == want < q["decode_linear_bytes_per_token_unpacked"]
    # the device's own decoder (nvfp4_dequant) gives the exact dequantization cast to fp32, bit for bit
    for name in ("layers.0.mixer.in_proj.weight", "layers.1.mixer.shared_experts.up_proj.weight"):
        assert torch.equal(be.read_param(name).view(torch.int32), th.backend.read_param(name).view(torch.int32))
    assert "quantized" not in cb.CupyEmulatedBackend().describe()
    assert be.supports("quant_nvfp4", "bfloat16").ok and be.supports("quant_fp8", "float32").ok
    assert not be.supports("quant_fp8", "float64").ok


def test_fp8_kv_cache_matches_torch(tmp_path):
    """kv_cache_quant_algo FP8 (the Nano NVFP4 release's): K and V quantized in place by act_fp8 before they are
    cached, in prefill and in captured decode steps; bit-close to the torch executor, and different from a cache
    kept at fp32 (the scales are really applied)."""
    from nemoh.model import presets as P
    from nemoh.model.quant import QuantConfig, read_quant_config
    from nemoh.model.quant_writer import write_quantized

    qc = read_quant_config(P.cached_checkpoint("tiny-nano-30b-nvfp4"))
    assert qc is not None
    path = write_quantized(P.cached_checkpoint(P.original_of("tiny-nano-30b-nvfp4") or ""), tmp_path / "kv",
                           QuantConfig(qc.algo, qc.group_size, qc.exclude_modules, "FP8", "test"))
    cu, th = _pair(str(path), "float32")
    assert cu.backend.kvq and cu.backend.supports("quant_kv_fp8", "float32").ok
    ids = torch.randint(4, cu.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(6))
    a, b = cu.session(2), th.session(2)
    _close(a.prefill(ids[:, :9]), b.prefill(ids[:, :9]), "float32")
    for j in range(9, 12):
        _close(a.prefill(ids[:, j:j + 1]), b.prefill(ids[:, j:j + 1]), "float32")
    kq = cu.backend.kvq
    cu.backend.kvq = {}
    plain = cu.session(2).prefill(ids[:, :9])
    cu.backend.kvq = kq
    assert rel_max_abs(plain.double(), cu.session(2).prefill(ids[:, :9]).double()) > 1e-4

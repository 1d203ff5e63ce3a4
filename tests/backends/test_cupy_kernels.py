"""The CuPy backend without a GPU: every kernel compiles, and the host-side logic is right.

Compiling needs NVRTC, which the `test` extra installs (nvidia-cuda-nvrtc-cu12 and
nvidia-cuda-runtime-cu12). If it is missing these tests FAIL: a kernel that does not compile must
never land because the compiler happened to be absent.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from nemoh import dtypes
from nemoh.backends import cupy_backend as cb
from nemoh.backends import cupy_compile as cc
from nemoh.errors import NemohError
from nemoh.model.config import load_config, parse_config
from nemoh.model.ir import OP_KINDS, build_graph
from nemoh.model.presets import PRESETS, RELEASES_DIR, all_presets
from nemoh.runtime.backend import Support
from nemoh.runtime.registry import get_backend

RELEASED = RELEASES_DIR
NANO9B = cc.KERNEL_DIR / "nano-9b-v2.config.json"


def _graphs():
    """(name, graph) for every tiny preset and released config, in both kernel dtypes."""
    cfgs = [(n, parse_config(p.config, n)) for n, p in all_presets().items()]
    cfgs += [(p.stem, load_config(p)) for p in sorted(RELEASED.glob("*.json"))]
    cfgs.append(("nano-9b-v2", load_config(NANO9B)))
    return [(f"{n}-{dt}", build_graph(c, dt)) for n, c in cfgs for dt in cb.DTYPES]


# ----------------------------------------------------------------------------------------------
# Compilation (NVRTC through ctypes, no driver)
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toolchain():
    try:
        return cc.find_toolchain()
    except cc.CompileError as e:
        pytest.fail(f"NVRTC is required to check the CUDA kernels and was not found: {e}")


@pytest.fixture(scope="module")
def ptx(toolchain):
    return {arch: cc.compile_all(arch, toolchain) for arch in cc.CI_ARCHS}


def test_nvrtc_is_installed(toolchain):
    major, minor = toolchain.version
    assert major >= 12, f"NVRTC {major}.{minor} is too old for sm_90 PTX"
    assert (Path(toolchain.include) / "cuda_bf16.h").is_file()


def test_every_kernel_file_is_in_the_table():
    assert cc.kernel_files() == sorted(cc.KERNELS), "a .cu file on disk is not compiled by CI, or vice versa"


def test_table_matches_the_sources():
    # the instantiation macros and plain entries, as written in each file
    for file in cc.KERNELS:
        src = re.sub(r"\\\n", " ", cc.source(file))  # join macro continuation lines
        templated = set(re.findall(r"(\w+)_##S\(", src))
        plain = set(re.findall(r'extern "C" __global__ void\s+(?:__launch_bounds__\(\d+\)\s+)?'
                               r'(?!__launch_bounds__)(\w+)\(', src))
        assert templated == set(cc.KERNELS[file][0]), file
        assert plain == set(cc.KERNELS[file][1]), file


@pytest.mark.parametrize("arch", cc.CI_ARCHS)
def test_every_kernel_compiles_with_every_entry_point(ptx, arch):
    for file, code in ptx[arch].items():
        target = re.search(rb"^\.target\s+(\w+)", code, re.M)
        assert target and target.group(1).decode() == arch.replace("compute_", "sm_"), file
        assert cc.ptx_entries(code) == set(cc.entry_points(file)), file
    assert set(ptx[arch]) == set(cc.KERNELS)


def test_ptx_has_no_local_memory_arrays(ptx):
    # register arrays indexed at run time spill to local memory (.local): keep every kernel free of it
    for file, code in ptx["compute_90"].items():
        assert b".local" not in code, f"{file} puts an array in local memory"


def test_compile_error_carries_the_log(toolchain):
    with pytest.raises(cc.CompileError, match=r"broken\.cu.*undefined_thing"):
        cc.compile_source('extern "C" __global__ void k() { undefined_thing(); }', "broken.cu", "compute_80",
                          toolchain)


def test_missing_entry_point_is_an_error(toolchain, monkeypatch):
    monkeypatch.setitem(cc.KERNELS, "embedding.cu", (("embedding", "not_there"), ()))
    with pytest.raises(cc.CompileError, match="not_there"):
        cc.compile_all("compute_80", toolchain)


def test_cubin_for_the_device_arch(toolchain):
    code = cc.compile_source(cc.source("embedding.cu"), "embedding.cu", "sm_90", toolchain)
    assert code[:4] == b"\x7fELF"


def test_no_nvrtc_says_what_to_install(monkeypatch):
    monkeypatch.setattr(cc, "toolchain_candidates", lambda: [])
    with pytest.raises(cc.CompileError, match="nvidia-cuda-nvrtc-cu12"):
        cc.find_toolchain()


def test_ptx_entries_parser():
    ptx = b".version 8.8\n.target sm_90\n.visible .entry add_f32(\n\t.param .u64 p\n)\n.entry local_k (\n"
    assert cc.ptx_entries(ptx) == {"add_f32", "local_k"}


# ----------------------------------------------------------------------------------------------
# Host-side logic
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,graph", _graphs(), ids=lambda x: x if isinstance(x, str) else "")
def test_released_and_preset_models_fit_the_kernels(name, graph):
    assert cb.check_graph(graph) == Support.yes(), name


def test_check_graph_names_the_field():
    base = dict(PRESETS["tiny-dense"].config)
    assert not cb.check_graph(build_graph(parse_config(base), "float64")).ok
    for key, value, field in (("mamba_head_dim", 256, "mamba_head_dim"), ("ssm_state_size", 256, "ssm_state_size"),
                              ("head_dim", 160, "head_dim"), ("conv_kernel", 5, "conv_kernel")):
        s = cb.check_graph(build_graph(parse_config({**base, key: value}), "bfloat16"))
        assert not s.ok and field in s.reason
    s = cb.check_graph(build_graph(parse_config({**base, "use_bias": True}), "float32"))
    assert not s.ok and "use_bias" in s.reason
    moe = dict(PRESETS["tiny-moe"].config)
    s = cb.check_graph(build_graph(parse_config({**moe, "n_routed_experts": 2048}), "float32"))
    assert not s.ok and "n_routed_experts" in s.reason


@pytest.mark.parametrize("T,chunk", [(1, 128), (127, 128), (128, 128), (129, 128), (4096, 128), (300, 32), (5, 256)])
def test_ssd_launches_cover_every_position(T, chunk):
    B, H, P, N = 2, 128, 80, 128
    L = cb.ssd_launches(B, T, H, P, N, chunk)
    nc = math.ceil(T / chunk)
    assert L["ssd_dt_cumsum"].grid[0] * L["ssd_dt_cumsum"].block[0] >= B * nc * H
    assert L["ssd_chunk_state"].grid[:2] == (H, B * nc)
    assert L["ssd_state_passing"].grid[0] * 256 >= B * H * P * N
    gx, gy, gz = L["ssd_chunk_scan"].grid
    assert gx * 32 >= min(chunk, T) and (gy, gz) == (H, B * nc)  # 32 query rows per block
    assert all(la.block[0] * la.block[1] * la.block[2] <= 1024 for la in L.values())


def test_launch_limits_are_enforced():
    with pytest.raises(NemohError, match="grid"):
        cb.ssd_launches(B=1024, T=128 * 128, H=8, P=16, N=16, chunk=128)  # B * nc > 65535 on grid.z
    assert cb.launch_attn_prefill(3, 33, 40).grid == (3, 40, 3)
    assert cb.launch_conv_prefill(2, 129, 12288).grid == (96, 3, 2)
    assert cb.launch_gemv(131072).grid == (16384, 1, 1)
    assert cb.launch_rows(4, 4480).block == (256, 1, 1) and cb.launch_rows(4, 8192).block == (1024, 1, 1)


def test_decode_splits():
    assert cb.decode_splits(4096, B=1, KV=8, n_sm=132) == 33  # about two blocks per SM
    assert cb.decode_splits(40, B=1, KV=8, n_sm=132) == 2  # never more splits than key tiles
    assert cb.decode_splits(1 << 20, B=64, KV=8, n_sm=132) == 1
    assert cb.decode_splits(1 << 20, B=1, KV=1, n_sm=132) == 64  # capped


def test_row_chunks_vec_ok_grow_len():
    assert cb.row_chunks(19) == [(0, 8), (8, 8), (16, 3)] and cb.row_chunks(1) == [(0, 1)]
    assert cb.vec_ok(4480, 2, 0x7f0000000000, 4480, 0x7f0000001000, 4480)
    assert not cb.vec_ok(4481, 2, 0x7f0000000000, 4481, 0x7f0000001000, 4481)  # row length
    assert not cb.vec_ok(4480, 2, 0x7f0000000008, 4480, 0x7f0000001000, 4480)  # base address
    assert not cb.vec_ok(96, 4, 0x7f0000000000, 96, 0x7f0000001000, 98)  # activation row stride
    assert cb.grow_len(4096, 4097) == 8192 and cb.grow_len(100, 1000) == 1024 and cb.grow_len(256, 300) == 512


@pytest.mark.parametrize("name,graph", _graphs(), ids=lambda x: x if isinstance(x, str) else "")
def test_state_buffers_match_the_ir(name, graph):
    B, S = 3, 200
    plan = cb.state_buffers(graph, B, S)
    fixed = sum(math.prod(sh) * dtypes.ITEMSIZE[dt] for n, (sh, dt) in plan.items() if n.endswith((".conv", ".ssm")))
    per_tok = sum(math.prod(sh) * dtypes.ITEMSIZE[dt] for n, (sh, dt) in plan.items() if n.endswith((".k", ".v")))
    assert fixed == B * graph.state_bytes_per_sequence
    assert per_tok == B * S * graph.state_bytes_per_token
    assert plan["kmask"] == ((B, S), "int32") and plan["ctrl"] == ((2 * B + 1,), "int32")
    for layer in graph.layers:  # export layout: conv [B, C, K-1], ssm [B, H, P, N] fp32, k/v [B, S, KV, Dh]
        for s in layer.states:
            shape, dt = plan[s.name]
            assert shape[0] == B and dt == ("float32" if s.kind == "ssm" else graph.dtype)
            assert shape[1:] == ((S, *s.shape) if s.per_token else s.shape)


def test_decode_buffers_nano9b():
    g = build_graph(load_config(NANO9B), "bfloat16")
    c = g.config
    plan = cb.decode_buffers(g, batch=2, splits=33)
    assert plan["logits"] == ((2, 131072), "bfloat16")
    assert plan["zxbcdt"] == ((2, 2 * 10240 + 2 * 8 * 128 + 128), "bfloat16")
    assert plan["part"] == ((2, 40, 33, 130), "float32")
    assert plan["y"] == ((2, c.d_inner), "float32") and plan["up"] == ((2, 15680), "bfloat16")
    assert "topk_w" not in plan  # no MoE layer
    assert cb.buffer_bytes(plan) == sum(math.prod(s) * (4 if d in ("float32", "int32") else 2)
                                        for s, d in plan.values())
    moe = build_graph(parse_config(PRESETS["tiny-latent-moe"].config), "float32")
    p = cb.decode_buffers(moe, batch=1, splits=1)
    assert p["eup"][0] == (4, 40) and p["lat"][0] == (1, 32) and p["sup"][0] == (1, 64)


def test_decode_graph_state_machine():
    book = cb.DecodeGraph()
    assert book.plan(0, enabled=False, trace=False) == "eager"
    assert book.plan(0, enabled=True, trace=True) == "eager"
    assert book.plan(0, enabled=True, trace=False) == "warmup"
    assert book.plan(0, enabled=True, trace=False) == "warmup"  # until a warm-up step has run
    book.warmed(0)
    assert book.plan(0, enabled=True, trace=False) == "capture"
    with pytest.raises(NemohError, match="replay"):
        book.replayed()
    book.captured(0, "graph-0")
    assert book.plan(0, enabled=True, trace=False) == "replay"
    book.replayed()
    book.replayed()
    assert (book.captures, book.replays) == (1, 2)
    assert book.plan(1, enabled=True, trace=False) == "warmup"  # buffers reallocated: new epoch
    book.invalidate("KV cache grown")
    assert book.status == "invalid" and book.graph is None and "grown" in book.reason
    assert book.plan(0, enabled=True, trace=False) == "capture"  # epoch 0 was warmed already
    book.warmed(1)
    assert book.plan(1, enabled=True, trace=False) == "capture"
    book.captured(1, "graph-1")
    assert book.plan(1, enabled=True, trace=False) == "replay" and book.captures == 2


def test_decode_roofline_nano9b():
    g = build_graph(load_config(NANO9B), "bfloat16")
    rows = cb.decode_roofline(g, batch=1, context=1)
    total = sum(r[0] for r in rows.values())
    # one decode step reads every weight once except the embedding table (one row of it)
    weights = 2 * (g.params_total - g.param("embeddings.weight").numel)
    assert weights < total < weights * 1.03
    assert rows["add_rmsnorm"][2] == 57 and rows["ssd_step"][2] == 27 and rows["attn_decode"][2] == 4
    # SSM state: 27 layers x 128 heads x 80 x 128 fp32, read and written
    assert rows["ssd_step"][0] >= 27 * 2 * 128 * 80 * 128 * 4
    longer = cb.decode_roofline(g, batch=1, context=4096)
    assert longer["attn_decode"][0] - rows["attn_decode"][0] >= 4 * 2 * 4096 * 8 * 128 * 2


# ----------------------------------------------------------------------------------------------
# The backend on a machine without CUDA
# ----------------------------------------------------------------------------------------------

def test_import_does_not_import_cupy():
    code = ("import sys, nemoh.backends.cupy_backend, nemoh.backends.cupy_compile; "
            "from nemoh.runtime.registry import get_backend; get_backend('cupy'); "
            "assert 'cupy' not in sys.modules, 'cupy imported at module import time'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_protocol_surface_through_the_registry():
    be = get_backend("cupy")
    assert be.name == "cupy" and isinstance(be, cb.CupyBackend)
    for op in OP_KINDS:
        assert be.supports(op, "bfloat16").ok and be.supports(op, "float32").ok
    assert not be.supports("ssd_scan", "float16").ok
    assert not be.supports("conv2d", "float32").ok
    d = be.describe()
    assert d["backend"] == "cupy" and d["cuda_graphs"] is True
    with pytest.raises(NemohError, match="compiler"):
        cb.CupyBackend(compiler="nvcc")


def _fake_cupy(count=None, error=None, cap="90"):
    def get_count():
        if error:
            raise error
        return count

    runtime = types.SimpleNamespace(getDeviceCount=get_count)
    cuda = types.SimpleNamespace(runtime=runtime, Device=lambda i=0: types.SimpleNamespace(compute_capability=cap),
                                 nvrtc=types.SimpleNamespace(getVersion=lambda: (12, 9)))
    return types.SimpleNamespace(cuda=cuda)


def test_available_without_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` raises ImportError
    s = get_backend("cupy").available()
    assert not s.ok and "cupy is not importable" in s.reason and "nemoh[gpu]" in s.reason


def test_available_without_driver_or_device(monkeypatch):
    class CUDARuntimeError(RuntimeError):
        pass

    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(error=CUDARuntimeError(
        "cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version")))
    s = get_backend("cupy").available()
    assert not s.ok and "no usable CUDA device" in s.reason and "InsufficientDriver" in s.reason
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(count=0))
    assert get_backend("cupy").available() == Support.no("no CUDA device")
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(count=1, cap="75"))
    s = get_backend("cupy").available()
    assert not s.ok and "7.5" in s.reason


def test_available_with_a_gpu_needs_a_compiler(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(count=1, cap="90"))
    assert get_backend("cupy").available().ok  # NVRTC wheels are installed here
    monkeypatch.setattr(cc, "toolchain_candidates", lambda: [])
    s = cb.CupyBackend(compiler="nemoh").available()
    assert not s.ok and "no NVRTC" in s.reason


def test_open_model_refuses_cleanly_without_cuda(tmp_path):
    # a checkpoint-free path: the registry resolves, availability is asked before anything loads
    from nemoh.runtime.session import open_model

    cfg = tmp_path / "m"
    cfg.mkdir()
    (cfg / "config.json").write_text(json.dumps(PRESETS["tiny-dense"].config))
    with pytest.raises(NemohError, match="backend 'cupy' is not available here"):
        open_model(cfg, "cupy", "bfloat16")

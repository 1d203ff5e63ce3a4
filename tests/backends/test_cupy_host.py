"""The CuPy executor's host code that no model run reaches: its refusals and error messages, a traced decode step,
the roofline command, the NVRTC toolchain search and command line, and the kernel-argument conversion. With
test_cupy_standin.py and test_cupy_emulated.py, every line of cupy_backend.py, cupy_device.py and cupy_compile.py
runs on the CPU (.ci/run checks it with coverage)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from nemoh.backends import cupy_backend as cb
from nemoh.backends import cupy_compile as cc
from nemoh.backends import cupy_device as cd
from nemoh.errors import NemohError
from nemoh.model.config import load_config
from nemoh.model.ir import build_graph
from nemoh.model.presets import resolve_model

needs_emulator = pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler for the CUDA emulator")


def graph(name: str = "tiny-moe", dtype: str = "float32"):
    return build_graph(load_config(resolve_model(name)), dtype)


def test_launch_arguments_take_the_c_parameter_types():
    assert type(cd.launch_arg(True)) is np.int32 and cd.launch_arg(True) == 1
    assert type(cd.launch_arg(7)) is np.int32 and type(cd.launch_arg(0.5)) is np.float32
    assert cd.launch_arg(None) == np.uint64(0) and cd.launch_arg(cd.Ptr(4096)) == np.uint64(4096)
    assert type(cd.launch_arg(np.int64(3))) is np.int64  # i64 parameters pass through

    class Array:  # anything with .data.ptr, as a cupy array
        data = type("P", (), {"ptr": 8192})()

    assert cd.launch_arg(Array()) == np.uint64(8192)


def test_refusals_and_misuse_are_named():
    cfg = dataclasses.replace(load_config(resolve_model("tiny-dense")), mlp_bias=True)
    assert "mlp_bias" in cb.check_graph(build_graph(cfg, "float32")).reason
    with pytest.raises(NemohError, match="more than 1024 threads"):
        cb.Launch((1, 1, 1), (64, 32, 1)).validate("k")
    with pytest.raises(NemohError, match="max_len must be positive"):
        cb.CupyBackend(max_len=0)
    be = cb.CupyEmulatedBackend(schedules=1)
    with pytest.raises(NemohError, match="no device yet"):
        be.dev.synchronize()
    with pytest.raises(NemohError, match="no model loaded"):
        be.read_param("embeddings.weight")
    with pytest.raises(NemohError, match="dtype float16 is not one of"):
        be.init_device("float16")
    with pytest.raises(NemohError, match="cannot run this model: field 'mlp_bias'"):
        be.load(build_graph(cfg, "float32"), None)
    with pytest.raises(NemohError, match="end_capture without begin_capture"):
        _device().end_capture()
    dev = _device()
    with pytest.raises(NemohError, match="non-contiguous"):
        dev.ptr(np.zeros((4, 4), np.float32)[:, :2])
    dev.begin_capture()
    with pytest.raises(NemohError, match="GEMM inside a graph capture"):
        x = np.zeros(4, np.float32)
        dev.gemm("float32", x, 2, x, x, 2, 1, 1, 1)
    assert cb.CupyBackend._dec(cb.CupyState(batch=1, max_len=4, dec={"x": 1}))["x"] == 1
    with pytest.raises(NemohError, match="before its buffers were made"):
        cb.CupyBackend._dec(cb.CupyState(batch=1, max_len=4))


def _device():
    d = cb.EmulatedDevice.__new__(cb.EmulatedDevice)  # no kernels needed for these
    d._rec = None
    return d


@needs_emulator
def test_a_traced_decode_step_and_the_remaining_guards():
    from nemoh.runtime.session import open_model

    m = open_model("tiny-moe", cb.CupyEmulatedBackend(schedules=1), "float32")
    be = m.backend
    st = be.new_state(1)
    ids = torch.randint(4, m.config.vocab_size, (1, 3), generator=torch.Generator().manual_seed(1))
    be.forward(st, ids)
    trace: dict[str, torch.Tensor] = {}
    out = be.forward(st, ids[:, :1], trace=trace)  # a decode step with a trace runs eagerly and records every op
    assert out.shape == (1, 1, m.config.vocab_size) and "lm_head" in trace and "norm_f" in trace
    assert {"layers.0.mixer.in_proj", "layers.0.mixer.conv1d", "layers.0.mixer.ssd"} <= set(trace)
    assert any(k.endswith("mixer.attention") for k in trace) and any(k.endswith("mixer.o_proj") for k in trace)
    with pytest.raises(NemohError, match="ids have batch 2"):
        be.forward(st, torch.zeros(2, 1, dtype=torch.int64))
    be._gemm(None, 1, None, None, 1, 0, 1, 1)  # no rows: nothing to do
    with pytest.raises(NemohError, match="needs a dense output"):
        name = next(n[:-len(".weight")] for n in be.p if n.endswith("up_proj.weight"))
        R, C = be.p[name + ".weight"].shape
        x, y = be._zeros((16, C), "float32"), be._zeros((16, R + 1), "float32")
        be._linear(name, be._ptr(x), C, be._ptr(y), R + 1, 16, act=True)


def test_the_emulator_needs_a_compiler(monkeypatch):
    from nemoh.backends import cuda_emu

    monkeypatch.setattr(cuda_emu, "CXX", "no-such-c++-compiler")
    assert "C++17 compiler" in cb.CupyEmulatedBackend().available().reason


def test_roofline_covers_every_layer_kind_and_prints_a_table(capsys, tmp_path):
    rows = cb.decode_roofline(graph("tiny-moe", "bfloat16"))
    assert {"moe_router", "moe_gemv", "moe_combine", "gemv (shared)"} <= set(rows)
    assert all(b > 0 and n >= 1 for b, _, n in rows.values())
    cfg = resolve_model("tiny-moe") / "config.json"
    assert cb._roofline_main([str(cfg), "--batch", "2", "--context", "64"]) == 0
    out = capsys.readouterr().out
    assert "| **total** |" in out and "moe_gemv" in out


def test_toolchain_search_order_and_errors(monkeypatch, tmp_path):
    home = tmp_path / "cuda"
    (home / "lib64").mkdir(parents=True)
    (home / "include").mkdir()
    (home / "lib64" / "libnvrtc.so.13").write_bytes(b"")
    (home / "include" / "cuda_bf16.h").write_text("")
    monkeypatch.setenv("NEMOH_NVRTC", "/opt/x/libnvrtc.so")
    monkeypatch.delenv("NEMOH_CUDA_INCLUDE", raising=False)
    monkeypatch.setenv("CUDA_HOME", str(home))
    nvidia_roots = cc._nvidia_roots
    monkeypatch.setattr(cc, "_nvidia_roots", lambda: [])
    origins = [t.origin for t in cc.toolchain_candidates()]
    assert origins[0] == "env" and "toolkit" in origins
    assert cc.toolchain_candidates()[0].include == ""

    class Lib:
        @staticmethod
        def nvrtcGetErrorString(rc):
            return b"NVRTC_ERROR_COMPILATION"

    with pytest.raises(cc.CompileError, match="nvrtcCompileProgram failed: NVRTC_ERROR_COMPILATION"):
        cc._check(Lib(), 6, "nvrtcCompileProgram")
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert nvidia_roots() == []  # no `nvidia` package: no wheel toolchain


def test_compile_command_line(capsys):
    if not cc.toolchain_candidates():
        pytest.skip("no NVRTC here (pip install nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12)")
    assert cc.main(["sm_90"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("NVRTC ") and out.count("cubin") == len(cc.KERNELS)


def test_the_cupy_route_finds_cuda_headers_through_cupy(standin, monkeypatch, tmp_path):
    """With no NVRTC of nemoh's own, RawModule(code=) compiles with CuPy's, and the headers come from CuPy's
    CUDA path when it has cuda_bf16.h."""
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda_bf16.h").write_text("")
    monkeypatch.setattr(cc, "toolchain_candidates", lambda: [])
    monkeypatch.setattr(standin.cuda, "get_cuda_path", lambda: str(tmp_path))
    be = cb.CupyBackend()
    be.init_device("float32")
    assert str(tmp_path / "include") in be.dev.route
    assert json.dumps(be.describe())  # plain data

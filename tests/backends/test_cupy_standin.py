"""The cupy backend itself (CupyDevice, the CuPy side of its seam) on the CPU, through the CuPy stand-in
(tests/standin/cupy: CuPy's API, run by the CUDA emulator, checking streams, graph capture, kernel arguments
and cuBLAS calls as a GPU would take them).

A GPU visit once found that no CPU test had executed `CupyDevice`: two lines called a method on an attribute
that does not exist, and every GPU test failed on them. Here every line of backends/cupy_device.py runs in
the default test run, the bugs the stand-in exists for are planted and caught, and the stand-in's signatures
are compared with CuPy's where CuPy is importable. Only a GPU confirms the stand-in's assumptions:
tests/backends/test_cupy_gpu.py there is the judge (`nox -s gpu`).
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from test_cupy_gpu import (
    check_backend_matches_torch,
    check_copy_state_is_independent_and_cache_grows,
    check_graph_replay_is_bit_identical_to_eager,
    check_left_padded_batch_equals_alone,
    check_prefill_chunks_and_decode_agree,
    check_state_layout_matches_torch_and_round_trips,
    check_trace_and_params,
)

from nemoh.backends import cupy_backend as cb
from nemoh.backends import cupy_compile as cc
from nemoh.backends import cupy_device as cd
from nemoh.errors import NemohError

MAKE = cb.CupyBackend

#: the stand-in runs kernels in the CUDA emulator, which needs g++ (the signature comparison does not)
needs_emulator = pytest.mark.skipif(not cb.CupyEmulatedBackend().available().ok,
                                    reason="no C++ compiler for the CUDA emulator")


# ----------------------------------------------------------------------------------------------
# The whole backend, as on a GPU
# ----------------------------------------------------------------------------------------------

@needs_emulator
def test_one_pass_through_every_device_path(standin):
    """Every CupyDevice method, in one short run: load, a cuBLAS prefill (24 rows), last-position logits, decode
    steps (warm-up, capture, replays), KV-cache growth with recapture, state export / import / copy, read_param,
    describe; the logits against the torch executor."""
    from nemoh.runtime.session import open_model

    cu = open_model("tiny-list", MAKE(max_len=14), "float32")
    th = open_model("tiny-list", "torch", "float32", device="cpu")
    ids = torch.randint(4, cu.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    eq = 2e-5
    a, b = cu.session(2), th.session(2)
    assert (a.prefill(ids[:, :12]) - b.prefill(ids[:, :12])).abs().max() < eq * 50  # logits of O(10)
    steps = [(a.forward(ids[:, t:t + 1]), b.forward(ids[:, t:t + 1])) for t in range(12, 16)]  # grows past 14
    assert all((x - y).abs().max() < eq * 50 for x, y in steps)
    st = a.state
    assert st.max_len > 14 and st.graph.captures >= 1 and st.graph.replays >= 1
    last = cu.backend.forward(cu.backend.copy_state(st), ids[:, :3], last_only=True)
    assert last.shape == (2, 1, cu.config.vocab_size)
    exported = cu.backend.export_state(st)
    again = cu.backend.export_state(cu.backend.import_state(exported))
    assert all(torch.equal(again[k], exported[k]) for k in exported)
    assert torch.equal(cu.backend.read_param("embeddings.weight"), th.backend.read_param("embeddings.weight"))
    d = cu.backend.describe()
    assert d["device"] == "cuda:0" and d["cupy"].endswith("standin") and d["cuda_graphs"] is True


@needs_emulator
@pytest.mark.slow  # nox -s cupy-emulated; test_one_pass_through_every_device_path is the default run's
def test_backend_matches_torch_and_the_oracle(standin):
    check_backend_matches_torch(MAKE, "tiny-moe", "float32", T=24)  # 48 rows: cuBLAS GEMMs, sorted MoE


@needs_emulator
@pytest.mark.slow  # nox -s cupy-emulated; test_one_pass_through_every_device_path is the default run's
def test_prefill_chunks_and_decode_agree_with_graphs(standin):
    check_prefill_chunks_and_decode_agree(MAKE, "tiny-list", True, T=14, chunks=(1, 5, 8))


@needs_emulator
@pytest.mark.slow  # nox -s cupy-emulated; test_one_pass_through_every_device_path is the default run's
def test_graph_replay_is_bit_identical_to_eager(standin):
    check_graph_replay_is_bit_identical_to_eager(MAKE, P=8, T=11)


@needs_emulator
@pytest.mark.slow  # nox -s cupy-emulated; test_one_pass_through_every_device_path is the default run's
def test_state_layout_round_trips(standin):
    check_state_layout_matches_torch_and_round_trips(MAKE)


@needs_emulator
@pytest.mark.slow  # nox -s cupy-emulated; test_one_pass_through_every_device_path is the default run's
def test_kv_cache_growth_recaptures(standin):
    check_copy_state_is_independent_and_cache_grows(MAKE, max_len=8, P=6, T=12)


@needs_emulator
@pytest.mark.slow  # nox -s cupy-emulated; test_one_pass_through_every_device_path is the default run's
def test_left_padded_batch(standin):
    check_left_padded_batch_equals_alone(MAKE, "tiny-dense", T=16, pad=5)


@needs_emulator
@pytest.mark.slow  # nox -s cupy-emulated; test_one_pass_through_every_device_path is the default run's
def test_trace_params_and_describe(standin):
    check_trace_and_params(MAKE)
    d = MAKE().describe()
    assert d["compiler"] == "auto" and "device" not in d  # before load: no device yet


@needs_emulator
def test_both_kernel_routes_load_every_entry_point(standin):
    """compiler='nemoh': NVRTC cubins in the cache, RawModule(path=); 'cupy': RawModule(code=) and CuPy's NVRTC."""
    for route in ("nemoh", "cupy"):
        be = MAKE(compiler=route)
        be.init_device("bfloat16", "cuda:0")
        assert be.dev is not None and be.dev.route.startswith(route)
        assert set(be.kernels) == {e for f in cc.KERNELS for e in cc.entry_points(f)}
    again = MAKE(compiler="nemoh")
    again.init_device("float32", "cuda")  # the cubins come from the cache this time
    assert again.dev is not None and again.dev.id == 0


@needs_emulator
def test_device_names_and_availability(standin, monkeypatch):
    with pytest.raises(NemohError, match="CUDA devices only"):
        MAKE().init_device("float32", "cpu")
    with pytest.raises(NemohError, match="not cuda or cuda:N"):
        MAKE().init_device("float32", "cuda:x")
    assert MAKE().available().ok
    rt = standin.cuda.runtime

    def fails():
        raise rt.CUDARuntimeError("cudaErrorNoDevice")

    with monkeypatch.context() as mp:
        mp.setattr(rt, "getDeviceCount", lambda: 0)
        assert MAKE().available().reason == "no CUDA device"
        mp.setattr(rt, "getDeviceCount", fails)
        assert "no usable CUDA device" in MAKE().available().reason
    with monkeypatch.context() as mp:
        mp.setattr(standin.cuda.Device, "compute_capability", property(lambda self: "75"))
        assert "sm_80" in MAKE().available().reason
    with monkeypatch.context() as mp:
        mp.setattr(standin.cuda.Device, "compute_capability", property(lambda self: fails()))
        assert "cannot query the CUDA device" in MAKE().available().reason
    with monkeypatch.context() as mp:
        mp.setattr(cc, "toolchain_candidates", lambda: [])
        assert "compiler 'nemoh' asked for" in MAKE(compiler="nemoh").available().reason
        assert MAKE().available().ok  # CuPy's own NVRTC answers
        mp.setattr(standin.cuda.nvrtc, "getVersion", fails)
        assert "no NVRTC" in MAKE().available().reason
    with monkeypatch.context() as mp:
        mp.setattr(cc, "source", lambda file: "/* a kernel file without its kernels */")
        with pytest.raises(NemohError, match="missing from"):
            MAKE(compiler="cupy").init_device("float32")


def test_without_cupy_it_says_which_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cupy", None)
    r = MAKE().available()
    assert not r.ok and "pip install 'nemoh[gpu]'" in r.reason


# ----------------------------------------------------------------------------------------------
# The bugs the stand-in is for, planted one at a time and caught without a GPU
# ----------------------------------------------------------------------------------------------

def _loaded(dtype="float32"):
    from nemoh.runtime.session import open_model

    return open_model("tiny-moe", MAKE(), dtype)


@needs_emulator
def test_the_attribute_typo_of_the_first_gpu_run_fails_here(standin, monkeypatch):
    monkeypatch.setattr(cd.CupyDevice, "synchronize", lambda self: self.dev.synchronize())  # the shipped typo
    with pytest.raises(Exception, match="has no attribute 'dev'"):
        _loaded()


@needs_emulator
def test_a_gemm_on_the_handles_own_stream_is_a_race(standin, monkeypatch):
    """CuPy's shared cuBLAS handle stays on the legacy stream unless told otherwise; the kernels run on a
    non-blocking stream, so a GEMM there reads its input before the kernel that writes it has finished."""
    real = standin.cuda.device.get_cublas_handle
    import cupy_backends.cuda.libs.cublas as cublas

    monkeypatch.setattr(cublas, "setStream", lambda handle, stream: None)  # the GEMM forgets to set it
    monkeypatch.setattr(standin.cuda.device, "get_cublas_handle", real)
    m = _loaded()
    ids = torch.randint(4, m.config.vocab_size, (2, 12))
    with pytest.raises(Exception, match="race"):
        m.session(2).prefill(ids)


@needs_emulator
def test_a_fill_outside_the_devices_stream_is_a_race(standin):
    """A buffer filled on the legacy stream (what a plain `a.fill()` does outside the device's scope) and then
    read by a kernel on the backend's non-blocking stream: nothing orders the two on a GPU."""
    be = MAKE()
    be.init_device("float32")
    x, y, out = be._empty((8,), "float32"), be._zeros((8,), "float32"), be._empty((8,), "float32")
    x.fill(1.0)  # outside dev.scope(): the legacy default stream
    with pytest.raises(Exception, match="race"), be.dev.scope():
        be._run(be._k("add"), cb.launch_grid_stride(8, "add"), x, y, out, np.int64(8))
    standin.cuda.Stream.null.synchronize()  # the legacy stream's fill is done: ordered from here on
    with be.dev.scope():  # the same fill on the device's stream: fine
        x.fill(1.0)
        be._run(be._k("add"), cb.launch_grid_stride(8, "add"), x, y, out, np.int64(8))
    assert be._download(out, "float32").tolist() == [1.0] * 8


@needs_emulator
def test_a_python_int_kernel_argument_is_refused(standin, monkeypatch):
    monkeypatch.setattr(cd, "launch_arg", lambda v: v if not isinstance(v, int) or isinstance(v, cd.Ptr) else v)
    with pytest.raises(Exception, match="must be numpy.int32"):
        m = _loaded()
        m.session(2).prefill(torch.randint(4, m.config.vocab_size, (2, 12)))


@needs_emulator
def test_an_allocation_inside_a_decode_capture_is_refused(standin, monkeypatch):
    m = _loaded()
    s = m.session(1)
    s.prefill(torch.randint(4, m.config.vocab_size, (1, 6)))
    real = cb.CupyBackend._decode_kernels

    def allocating(self, st, rec):
        self._empty((4,), "float32")  # a scratch buffer made inside the capture
        real(self, st, rec)

    monkeypatch.setattr(cb.CupyBackend, "_decode_kernels", allocating)
    s.forward(torch.tensor([[5]]))  # warm-up step: eager, allowed
    with pytest.raises(Exception, match="captures a graph"):
        s.forward(torch.tensor([[6]]))


@needs_emulator
def test_a_graph_replayed_after_its_buffers_went_is_caught(standin):
    cp = standin
    s = cp.cuda.Stream(non_blocking=True)
    k = cp.RawModule(code=cc.source("linear.cu")).get_function("add_f32")
    x, y, z = (cp.empty((8,), "float32") for _ in range(3))
    with s:
        x.fill(1)
        y.fill(2)
        s.begin_capture()
        k((1,), (32,), (x, y, z, np.int64(8)))
        g = s.end_capture()
        g.launch(s)
    assert z.get(stream=s).tolist() == [3.0] * 8
    del x
    import gc

    gc.collect()
    with pytest.raises(Exception, match="no live device allocation"):
        g.launch(s)


# ----------------------------------------------------------------------------------------------
# The stand-in's own semantics
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ta,tb", [(0, 0), (1, 0), (0, 1), (1, 1)])
@needs_emulator
def test_gemm_ex_is_column_major_with_leading_dimensions(standin, ta, tb):
    cp = standin
    import cupy_backends.cuda.libs.cublas as cublas

    m, n, k, pad = 5, 3, 4, 2
    rng = np.random.default_rng(0)
    opa, opb = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)
    sa = opa if ta == 0 else opa.T  # the stored matrix, column-major = its transpose row-major
    sb = opb if tb == 0 else opb.T
    lda, ldb, ldc = sa.shape[0] + pad, sb.shape[0] + pad, m + pad

    def colmajor(a, ld):
        buf = np.zeros((a.shape[1], ld), np.float32)
        buf[:, :a.shape[0]] = a.T
        return cp.asarray(buf)

    A, B, C = colmajor(sa, lda), colmajor(sb, ldb), cp.asarray(np.full((n, ldc), 7, np.float32))
    one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)
    cublas.gemmEx(cp.cuda.device.get_cublas_handle(), ta, tb, m, n, k, one.ctypes.data, A.data.ptr, 0, lda,
                  B.data.ptr, 0, ldb, zero.ctypes.data, C.data.ptr, 0, ldc, 68, -1)
    out = C.get()
    np.testing.assert_allclose(out[:, :m].T, opa @ opb, rtol=1e-6)
    assert (out[:, m:] == 7).all()  # nothing past the leading dimension's rows is written
    with pytest.raises(Exception, match="INVALID_VALUE"):
        cublas.gemmEx(cp.cuda.device.get_cublas_handle(), ta, tb, m, n, k, one.ctypes.data, A.data.ptr, 0, 1,
                      B.data.ptr, 0, ldb, zero.ctypes.data, C.data.ptr, 0, ldc, 68, -1)


@needs_emulator
def test_host_and_capture_rules(standin):
    cp = standin
    a = cp.empty((4,), "float32")
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.array(a)
    with pytest.raises(TypeError, match="upload it first"):
        a[...] = np.zeros(4, np.float32)
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        s.begin_capture()
        with pytest.raises(Exception, match="captures a graph"):
            a.get()
        with pytest.raises(Exception, match="captures a graph"):
            s.synchronize()
        with cp.cuda.Stream(non_blocking=True):
            with pytest.raises(Exception, match="would not be part of the graph"):
                a.fill(1)
        s.end_capture()
    with pytest.raises(Exception, match="begin_capture on the legacy default stream"):
        cp.cuda.Stream.null.begin_capture()


# ----------------------------------------------------------------------------------------------
# The stand-in against the real CuPy, where it is installed (a GPU machine)
# ----------------------------------------------------------------------------------------------

#: what nemoh calls, by dotted path from the top-level module
API = ["cupy.empty", "cupy.asarray", "cupy.ascontiguousarray", "cupy.RawModule.__init__", "cupy.RawModule.get_function",
       "cupy.RawKernel.__call__", "cupy.ndarray.get", "cupy.ndarray.set", "cupy.ndarray.fill", "cupy.ndarray.copy",
       "cupy.cuda.Stream.__init__", "cupy.cuda.Stream.synchronize", "cupy.cuda.Stream.begin_capture",
       "cupy.cuda.Stream.end_capture", "cupy.cuda.Device.__init__", "cupy.cuda.Device.use",
       "cupy.cuda.runtime.getDeviceProperties", "cupy.cuda.runtime.getDeviceCount",
       "cupy.cuda.device.get_cublas_handle", "cupy_backends.cuda.libs.cublas.gemmEx",
       "cupy_backends.cuda.libs.cublas.setStream"]


def _lookup(path: str):
    import importlib

    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for p in parts[i:]:
            obj = getattr(obj, p)
        return obj
    raise ImportError(path)


def _params(obj) -> list[str] | None:
    """Parameter names from the signature, or from an embedded signature line of a Cython docstring; None
    where neither says anything (a bare *args, **kwargs, as Cython's generic __init__ shows)."""
    try:
        names = [p for p in inspect.signature(obj).parameters if p not in ("self", "cls")]
        return None if names == ["args", "kwargs"] else names
    except (ValueError, TypeError):
        pass
    doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
    name = getattr(obj, "__name__", "")
    if doc and doc[0].startswith(f"{name}(") and doc[0].rstrip().endswith(")"):
        inner = doc[0][len(name) + 1:doc[0].rindex(")")]
        out = [p.split("=")[0].split(":")[0].strip().lstrip("*").split()[-1] for p in inner.split(",") if p.strip()]
        return [p for p in out if p not in ("self", "cls", "")]
    return None


def test_the_standin_follows_cupys_signatures(request):
    import importlib.util
    import sys

    if importlib.util.find_spec("cupy") is None or "standin" in (importlib.util.find_spec("cupy").origin or ""):
        pytest.skip("the real cupy is not installed here: the signatures are compared on a GPU machine (nox -s gpu)")
    real: dict[str, list[str] | str | None] = {}
    for p in API:
        try:
            real[p] = _params(_lookup(p))
        except (ImportError, AttributeError) as e:  # the stand-in has something CuPy does not: a wrong assumption
            real[p] = f"missing in CuPy ({type(e).__name__}: {e})"
    request.getfixturevalue("standin")
    stand = {p: _params(_lookup(p)) for p in API}
    assert sys.modules["cupy"].STANDIN
    unverifiable = [p for p in API if real[p] is None]
    # every parameter the stand-in takes exists in CuPy, in the same order (CuPy may take more: a newer option)
    mismatched = {p: (real[p], stand[p]) for p in API if real[p] is not None
                  and (isinstance(real[p], str) or [x for x in real[p] if x in (stand[p] or [])] != stand[p])}
    print(f"signatures compared: {len(API) - len(unverifiable)}; not introspectable in CuPy: {unverifiable}")
    assert not mismatched, mismatched
    assert len(unverifiable) < len(API)  # something was compared

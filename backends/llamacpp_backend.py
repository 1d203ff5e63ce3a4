"""llama.cpp as an executor under test, through llama-cpp-python's C API, in a worker process.

    pip install 'nemoh[llamacpp]'      # llama-cpp-python: builds llama.cpp from source (CPU build)
    nemoh conformance --model tiny-moe --backend llamacpp
    nemoh conformance --model tiny-moe --backend llamacpp --suite quant

The checkpoint is converted to GGUF by llama.cpp's own `convert_hf_to_gguf.py` (see llamacpp_convert.py)
and cached by checkpoint hash and type. The run dtype picks the GGUF type (float32 -> F32, bfloat16 ->
BF16, float16 -> F16; llama.cpp computes activations in F32 in every case); a quantized type is picked
with `NEMOH_LLAMACPP_WEIGHTS=Q8_0` or the factories `nemoh.backends.llamacpp_backend:q8_0` / `:q4_k_m`.

llama.cpp runs in a worker process (llamacpp_worker.py): a `GGML_ASSERT` abort or a crash there becomes a
`WorkerCrashed` exception carrying llama.cpp's own stderr message (a FAIL of the case, not the end of the
run), and the next call starts a fresh worker.

Driving: each `forward` is one prefill chunk or decode step, sent as `llama_batch`es of at most n_batch
tokens holding every row's real tokens under the row's own sequence id (left padding is never sent), and
the K/V cache in F32 with flash attention off by default (llama.cpp's own defaults are an F16 K/V cache
and automatic flash attention: set NEMOH_LLAMACPP_KV=f16 / NEMOH_LLAMACPP_FA=1 to test those). Sequences
live in the worker's llama.cpp memory; `copy_state` is `llama_memory_seq_cp`.

What llama.cpp cannot do here, answered through `supports()` so the suites report NOT_SUPPORTED:
`state_export` (the conv/SSM/KV state stays inside llama.cpp's memory modules) and `param_bit_equal` for
quantized weights. `trace` is filled from llama.cpp's eval callback: `embd` -> `embeddings`,
`nemotron_h_block_out-{i}` -> `layers.{i}`, and each mixer's output (`mamba_out-{i}`, `attn_out-{i}`,
`l_out-{i}` = the MLP/MoE `ffn_out`) -> the IR op feeding the residual add (`out_proj`, `o_proj`,
`combine`, `down_proj`), so localisation names the first diverging layer. Not the op inside it:
llama.cpp's node names within a mixer do not map one-to-one onto nemoh's IR ops.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import weakref
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import torch

from nemoh.backends.llamacpp_modelopt import modelopt_hint, modelopt_reading
from nemoh.runtime.backend import BackendBase, ModelNotSupported, Support

if TYPE_CHECKING:
    from nemoh.model.ir import Graph

WEIGHTS_FOR_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
STATE_EXPORT_REASON = ("llama.cpp keeps the carried conv/SSM/KV state inside its memory modules; its public "
                       "API saves it only as an opaque per-sequence blob (llama_state_seq_get_data), so it "
                       "cannot be exported by IR state name")
INSTALL_HINT = "pip install 'nemoh[llamacpp]' (llama-cpp-python; it builds llama.cpp with cmake)"
GGML_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8}
LOG_TAIL = 12


class WorkerCrashed(RuntimeError):
    """The llama.cpp worker process died (abort, GGML_ASSERT, signal) during a request."""


class _Worker:
    """One `python -m nemoh.backends.llamacpp_worker` process and its log."""

    def __init__(self):
        fd, self.log_path = tempfile.mkstemp(prefix="nemoh-llamacpp-", suffix=".log")
        self.log = os.fdopen(fd, "wb")
        # the worker imports only the standard library, numpy and llama_cpp: run its file directly
        worker = str(Path(__file__).with_name("llamacpp_worker.py"))
        env = dict(os.environ)
        env.setdefault("GGML_NO_BACKTRACE", "1")  # an abort is reported from its message; no gdb attach
        self.proc = subprocess.Popen([sys.executable, worker], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, env=env)
        self.lock = threading.Lock()

    def log_tail(self, n: int = LOG_TAIL) -> list[str]:
        try:
            lines = Path(self.log_path).read_text(errors="replace").splitlines()
        except OSError:
            return []
        return [ln for ln in lines if ln.strip()][-n:]

    def request(self, *msg):
        with self.lock:
            try:
                stdin, stdout = self._pipes()
                pickle.dump(msg, stdin, protocol=pickle.HIGHEST_PROTOCOL)
                stdin.flush()
                reply = pickle.load(stdout)
            except (EOFError, BrokenPipeError, OSError, pickle.UnpicklingError):
                raise self._crashed(msg[0]) from None
        if reply[0] == "ok":
            return reply[1]
        said = [ln.strip() for ln in self.log_tail(40) if "error" in ln.lower() or "failed" in ln.lower()][-3:]
        raise RuntimeError(f"llama.cpp worker: {reply[1]}" + (f"; llama.cpp said: {' | '.join(said)}" if said else ""))

    def _pipes(self) -> tuple[IO[bytes], IO[bytes]]:
        stdin, stdout = self.proc.stdin, self.proc.stdout
        if stdin is None or stdout is None:  # Popen was given PIPE for both: never, unless closed
            raise OSError("the llama.cpp worker's pipes are closed")
        return stdin, stdout

    def _crashed(self, op: str) -> WorkerCrashed:
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        try:
            import signal

            if code < 0:
                how = f"killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
        everything = self.log_tail(10_000)
        at = next((i for i in range(len(everything) - 1, -1, -1) if "GGML_ASSERT" in everything[i]
                   or "GGML_ABORT" in everything[i]), None)
        if at is None:
            at = next((i for i in range(len(everything) - 1, -1, -1) if "error" in everything[i].lower()
                       or "nemoh test hook" in everything[i]), None)
        key = everything[at] if at is not None else (everything[-1] if everything else "")
        # the lines leading to it (llama.cpp's log), not a debugger's backtrace after it
        tail = everything[max(0, at - LOG_TAIL + 1):at + 1] if at is not None else everything[-LOG_TAIL:]
        return WorkerCrashed(f"llama.cpp worker died during '{op}' ({how}): {key.strip()}"
                             + ("\n  llama.cpp stderr (last lines):\n    " + "\n    ".join(tail) if tail else ""))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.proc.poll() is None:
                stdin, _ = self._pipes()
                pickle.dump(("exit",), stdin)
                stdin.close()
                self.proc.wait(timeout=5)
        with contextlib.suppress(Exception):
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(Exception):
            self.log.close()
            os.unlink(self.log_path)


class _State:
    """Handle on B sequences living in the worker's llama.cpp memory."""

    def __init__(self, seqs: list[int], gen: int, pos: list[int] | None = None):
        self.seqs, self.gen = seqs, gen
        self.pos = list(pos) if pos is not None else [0] * len(seqs)


class LlamaCppBackend(BackendBase):
    name = "llamacpp"
    dtypes = ("float32", "bfloat16", "float16")
    #: capabilities beyond op kinds this backend answers in `supports` (the suites ask only a backend that
    #: declares them; every other backend is assumed to have them)
    optional_capabilities = ("state_export", "param_bit_equal")

    def __init__(self, weights: str | None = None, *, n_ctx: int | None = None, n_seq_max: int | None = None,
                 n_batch: int | None = None, n_ubatch: int | None = None, threads: int | None = None,
                 kv_type: str | None = None, flash_attn: int | None = None, repack: bool | None = None):
        env = os.environ.get
        self.weights = (weights or env("NEMOH_LLAMACPP_WEIGHTS") or "").upper() or None
        self.opts: dict[str, Any] = {
            "n_ctx": n_ctx or int(env("NEMOH_LLAMACPP_N_CTX", "8192")),
            "n_seq_max": n_seq_max or int(env("NEMOH_LLAMACPP_N_SEQ", "64")),
            "n_batch": n_batch or int(env("NEMOH_LLAMACPP_N_BATCH", "2048")),
            "n_ubatch": n_ubatch or int(env("NEMOH_LLAMACPP_N_UBATCH", "2048")),
            "threads": threads or int(env("NEMOH_LLAMACPP_THREADS", str(os.cpu_count() or 1))),
            "kv": (kv_type or env("NEMOH_LLAMACPP_KV", "f32")).lower(),
            "flash_attn": int(flash_attn if flash_attn is not None else env("NEMOH_LLAMACPP_FA", "0")),
            # llama.cpp's default: weights repacked into the CPU backend's extra buffer types (REPACK)
            "repack": repack if repack is not None else env("NEMOH_LLAMACPP_REPACK", "1") != "0",
        }
        self._w: _Worker | None = None
        self._gen = 0
        self._restarts = 0
        self._crashes: list[str] = []
        self._free: list[int] = []
        self._pending: list[int] = []
        self.gguf: Path | None = None
        self.info: dict[str, Any] = {}
        self.graph: Graph | None = None
        self._reader: Any = None  # llamacpp_gguf.GgufTensors, made on first read_param

    # -- capabilities ----------------------------------------------------------------------------
    def available(self) -> Support:
        if importlib.util.find_spec("llama_cpp") is None:
            return Support.no(f"llama-cpp-python is not installed: {INSTALL_HINT}")
        return Support.yes()

    def weight_type(self, dtype: str) -> str:
        return self.weights or WEIGHTS_FOR_DTYPE.get(dtype, "F32")

    def supports(self, op_kind: str, dtype: str) -> Support:
        if op_kind == "state_export":
            return Support.no(STATE_EXPORT_REASON)
        if op_kind == "param_bit_equal":
            wt = self.weight_type(dtype)
            if wt not in ("F32", "F16", "BF16"):
                return Support.no(f"weights are quantized to {wt}: bit-equality with the checkpoint does not apply "
                                  "(the quant suite judges their effect on the logits)")
            return Support.yes()
        if dtype == "float64":
            return Support.no("llama.cpp computes in float32 at most")
        return super().supports(op_kind, dtype)

    def weight_variant(self, wtype: str) -> LlamaCppBackend:
        """A new, unloaded backend with the same options reading the GGUF at `wtype` (the quant suite)."""
        kw = {k: v for k, v in self.opts.items() if k not in ("kv",)}
        return LlamaCppBackend(wtype, n_ctx=kw["n_ctx"], n_seq_max=kw["n_seq_max"], n_batch=kw["n_batch"],
                               n_ubatch=kw["n_ubatch"], threads=kw["threads"], kv_type=self.opts["kv"],
                               flash_attn=kw["flash_attn"], repack=kw["repack"])

    # -- worker ----------------------------------------------------------------------------------
    def _worker(self) -> _Worker:
        if self._w is None or self._w.proc.poll() is not None:
            if self._w is not None:
                self._w.close()
            self._w = w = _Worker()
            self.info = w.request("info")
            if self.gguf is not None:
                self._load_worker(w)
        return self._w

    def _call(self, *msg):
        w = self._worker()
        try:
            return w.request(*msg)
        except WorkerCrashed as e:
            # every sequence lived in the dead process: states made before are invalid from now on
            self._crashes.append(str(e).splitlines()[0])
            self._restarts += 1
            self._gen += 1
            self._w = None
            w.close()
            self._free, self._pending = list(range(self.opts["n_seq_max"])), []
            raise

    def _load_worker(self, w: _Worker) -> None:
        o = self.opts
        self.model_info = w.request("load", str(self.gguf), {
            "n_ctx": o["n_ctx"], "n_batch": o["n_batch"], "n_ubatch": o["n_ubatch"], "n_seq_max": o["n_seq_max"],
            "threads": o["threads"], "type_kv": GGML_TYPES[o["kv"]], "flash_attn": o["flash_attn"],
            "repack": o["repack"]})

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
            self._w = None

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    def crash_for_test(self) -> None:
        """Test hook: make the worker abort() the way a GGML_ASSERT does."""
        self._call("abort")

    # -- protocol --------------------------------------------------------------------------------
    def load(self, graph, checkpoint, *, device: str | None = None) -> None:
        from nemoh.backends import llamacpp_convert as conv

        if device not in (None, "cpu") and not str(device).startswith("cpu"):
            raise ValueError(f"this llamacpp backend is a CPU build; device {device!r} is not supported")
        directory = getattr(checkpoint, "dir", None)
        if directory is None:
            raise TypeError("llama.cpp reads GGUF files converted from a checkpoint directory; "
                            f"{type(checkpoint).__name__} has none (in-memory weights are not supported)")
        self.graph, self.checkpoint = graph, checkpoint
        wt = self.weight_type(graph.dtype)
        self.gguf = None
        self._reader = None
        quant = getattr(checkpoint, "quant", None)
        with self.at("convert_hf_to_gguf"):
            try:
                self.gguf = conv.ensure_gguf(Path(directory), wt,
                                             quantize=lambda s, d, f: self._call("quantize", s, d, f))
            except conv.ConversionError as e:
                if quant is None:
                    raise
                # llama.cpp's own converter refuses this ModelOpt checkpoint: llama.cpp cannot run it at all
                raise ModelNotSupported(f"llama.cpp's convert_hf_to_gguf.py does not convert this ModelOpt "
                                        f"{quant.algo} checkpoint: {e.last_line}{modelopt_hint(checkpoint, graph)}"
                                        ) from None
        self._gen += 1
        self._free, self._pending = list(range(self.opts["n_seq_max"])), []
        with self.at("llama_model_load_from_file"):
            if self._w is not None and self._w.proc.poll() is None:
                self._load_worker_fresh()
            else:
                self._worker()
        if self.model_info["n_vocab"] < graph.config.vocab_size:
            raise ValueError(f"the GGUF has {self.model_info['n_vocab']} tokens, the model {graph.config.vocab_size}")

    def _graph(self) -> Graph:
        """The loaded graph; a method that needs it before `load` says so."""
        if self.graph is None:
            raise RuntimeError(f"backend '{self.name}' has no model loaded (call load first)")
        return self.graph

    def _gguf_path(self) -> Path:
        """The loaded model's GGUF file; a method that needs it before `load` says so."""
        if self.gguf is None:
            raise RuntimeError(f"backend '{self.name}' has no GGUF loaded (call load first)")
        return self.gguf

    def _load_worker_fresh(self) -> None:
        # a worker that already holds a model (or only quantized): start clean, one model per process
        if self._w is not None:
            self._w.close()
        self._w = None
        self._worker()

    def new_state(self, batch: int) -> _State:
        seqs = self._take(batch)
        st = _State(seqs, self._gen)
        weakref.finalize(st, self._release, seqs, st.gen)
        return st

    def _take(self, n: int) -> list[int]:
        if len(self._free) < n:
            import gc

            gc.collect()
            self._flush()
        if len(self._free) < n:
            raise RuntimeError(f"all {self.opts['n_seq_max']} llama.cpp sequences are in use "
                               "(NEMOH_LLAMACPP_N_SEQ raises the limit)")
        seqs, self._free = self._free[:n], self._free[n:]
        return seqs

    def _release(self, seqs: list[int], gen: int) -> None:
        if gen == self._gen:
            self._pending.extend(seqs)

    def _flush(self) -> None:
        if self._pending:
            seqs, self._pending = self._pending, []
            self._call("free", seqs)
            self._free.extend(seqs)

    def _check(self, state: _State) -> None:
        if state.gen != self._gen:
            raise RuntimeError("this state's sequences were lost: the llama.cpp worker was restarted (after a "
                               "crash) or the model reloaded since the state was made")

    def copy_state(self, state: _State) -> _State:
        self._check(state)
        self._flush()
        seqs = self._take(len(state.seqs))
        self._call("copy", list(zip(state.seqs, seqs)))
        st = _State(seqs, self._gen, state.pos)
        weakref.finalize(st, self._release, seqs, st.gen)
        return st

    def forward(self, state: _State, ids: torch.Tensor, mask: torch.Tensor | None = None, *,
                last_only: bool = False, trace: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        self._check(state)
        self._flush()
        B, T = ids.shape
        V = self._graph().config.vocab_size
        m = torch.ones(B, T, dtype=torch.bool) if mask is None else mask.bool()
        rows, where = [], []
        for b in range(B):
            real = m[b].nonzero().flatten()
            if real.numel():
                rows.append((state.seqs[b], ids[b, real].tolist(), state.pos[b]))
                where.append((b, real))
        out = torch.zeros(B, 1 if last_only else T, V, dtype=torch.float32)
        if not rows:
            return out
        if trace is None:
            with self.at("llama_decode"):
                logits, _ = self._call("decode", rows, last_only, False)
            parts = [(r, lg, None) for r, lg in zip(where, logits)]
        else:  # one sequence per call, so llama.cpp's ubatch holds exactly that row's tokens in order
            parts = []
            for r, row in zip(where, rows):
                with self.at("llama_decode (traced)"):
                    lg, tr = self._call("decode", [row], last_only, True)
                parts.append((r, lg[0], tr))
        D = self._graph().config.hidden_size
        for (b, real), lg, tr in parts:
            t = torch.from_numpy(np.ascontiguousarray(lg[:, :V]))
            if last_only:
                out[b, 0] = t[-1]
            else:
                out[b, real] = t
            state.pos[b] += real.numel()
            if tr is not None:
                if "__error__" in tr:
                    raise RuntimeError(f"llama.cpp eval callback failed: {tr['__error__']}")
                for name, arr in tr.items():
                    kind, _, il = name.rpartition("-")
                    if name in ("embd", "inp_embd"):
                        key = "embeddings"
                    elif kind == "nemotron_h_block_out":
                        key = f"layers.{il}"
                    else:  # the mixer's output, feeding the residual add: the IR op before `residual`
                        key = self._graph().layers[int(il)].ops[-2].name
                    if arr.shape[0] != real.numel() or arr.shape[1] != D:
                        continue
                    buf = trace.setdefault(key, torch.zeros(B, T, D))
                    buf[b, real] = torch.from_numpy(arr)
        return out

    def export_state(self, state: _State) -> dict[str, torch.Tensor]:
        raise NotImplementedError(STATE_EXPORT_REASON)

    def import_state(self, tensors: dict[str, torch.Tensor]) -> _State:
        raise NotImplementedError(STATE_EXPORT_REASON)

    def read_param(self, name: str) -> torch.Tensor:
        """The GGUF's tensor (dequantized to F32 for quantized types) in nemoh's name and shape, in the form
        llama.cpp holds it: `A_log` comes back as llama.cpp's `ssm_a` = -exp(A_log); see param_transform."""
        from nemoh.backends import llamacpp_gguf as gg

        if self._reader is None:
            self._reader = gg.GgufTensors(self._gguf_path())
        return self._reader.read_param(name, self._graph())

    def param_transform(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """What the conversion does to the checkpoint's tensor `name` (so the weights suite compares the same
        thing): A_log -> -exp(A_log), in fp32 as the converter computes it; q_proj / k_proj rows permuted
        per head the way llama.cpp's converter prepares Llama-style RoPE (GraniteHybridModel.undo_permute;
        NemotronH has no RoPE, and the same per-head permutation of q and k leaves q.k unchanged)."""
        if name.endswith("mixer.A_log"):
            return -torch.exp(t.float())
        if name.endswith(("mixer.q_proj.weight", "mixer.k_proj.weight")):
            c = self._graph().config
            n = c.num_attention_heads if name.endswith("q_proj.weight") else c.num_key_value_heads
            return t.reshape(n, 2, t.shape[0] // n // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
        return t

    def describe(self) -> dict[str, Any]:
        from nemoh.backends import llamacpp_convert as conv

        d = super().describe()
        with contextlib.suppress(Exception):
            d["llama_cpp_python"] = conv.package_version()
            d["llama_cpp_commit"] = conv.llama_commit()
        d.update({
            "weights": self.weight_type(self.graph.dtype) if self.graph is not None else self.weights,
            "gguf": str(self.gguf) if self.gguf else None,
            "kv_cache_type": self.opts["kv"], "flash_attn": self.opts["flash_attn"], "repack": self.opts["repack"],
            "n_batch": self.opts["n_batch"], "n_ubatch": self.opts["n_ubatch"], "threads": self.opts["threads"],
            "worker": "subprocess (python -m nemoh.backends.llamacpp_worker)", "worker_restarts": self._restarts,
            "trace": "llama.cpp eval callback (cb_eval): embd -> embeddings, nemotron_h_block_out-{i} -> "
                     "layers.{i}, mamba_out/attn_out/l_out-{i} -> the mixer's output op; no tensors inside a "
                     "mixer (localisation names the layer, not the op)",
            "state_export": "no: " + STATE_EXPORT_REASON,
        })
        if self.gguf is not None:
            with contextlib.suppress(Exception):  # what llama_model_quantize chose per tensor (K-quants fall
                from collections import Counter  # back to other types for rows not divisible by 256)

                from nemoh.backends.llamacpp_gguf import GgufTensors

                types = GgufTensors(self.gguf).types()
                d["tensor_types"] = dict(Counter(types.values()))
                q = getattr(getattr(self, "checkpoint", None), "quant", None)
                if q is not None:
                    d["modelopt"] = modelopt_reading(q.algo, types)
        if self.info:
            d["system_info"] = self.info.get("system_info", "")
        if getattr(self, "model_info", None):
            d["model_desc"] = self.model_info.get("desc")
        if self._crashes:
            d["crashes"] = self._crashes[-5:]
        return d


def q8_0() -> LlamaCppBackend:
    return LlamaCppBackend("Q8_0")


def q4_k_m() -> LlamaCppBackend:
    return LlamaCppBackend("Q4_K_M")


def f16() -> LlamaCppBackend:
    return LlamaCppBackend("F16")


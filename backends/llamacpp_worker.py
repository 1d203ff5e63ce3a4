"""The llama.cpp worker process: llama-cpp-python's C API on token ids, behind a pickle pipe protocol.

Started by nemoh.backends.llamacpp_backend as `python -m nemoh.backends.llamacpp_worker`. Its stdin carries
requests, the protocol replies go to a duplicate of its original stdout, and both its stdout and stderr go
to a log file the parent reads: when llama.cpp aborts (`GGML_ASSERT`, a SIGSEGV) the process dies and the
parent raises an exception carrying the end of that log, then starts a fresh worker.

Requests are `(op, *args)` tuples; replies `("ok", value)` or `("err", message)`:

- `("info",)`: llama-cpp-python version and llama.cpp's system info
- `("load", gguf_path, opts)`: model + one context (n_ctx, n_batch, n_ubatch, n_seq_max, threads, K/V cache
  type, flash attention), kv_unified so that the sequences share the attention cells
- `("decode", rows, last_only, trace)`: rows = [(seq_id, tokens, pos0)]; one `llama_batch` per n_batch tokens
  with every row's tokens (sequence ids keep them apart), logits of every token (or each row's last) via
  `llama_get_logits_ith`; with `trace` the residual stream after each layer (`nemotron_h_block_out-{il}`),
  each mixer's output before the residual add (`mamba_out-{il}`, `attn_out-{il}`, and `l_out-{il}` for
  MLP/MoE layers: their `ffn_out` node is renamed `l_out` by build_cvec)
  and the input embeddings (the graph node `embd`) from llama.cpp's eval callback (`cb_eval`)
- `("free", seq_ids)`: `llama_memory_seq_rm`; `("copy", [(src, dst)])`: `llama_memory_seq_cp`
- `("quantize", src, dst, ftype)`: `llama_model_quantize`
- `("abort",)`: a test hook, `os.abort()` (what a GGML_ASSERT does)
"""

from __future__ import annotations

import ctypes
import os
import pickle
import re
import sys
import traceback
from typing import Any

import numpy as np

GGML_TYPE_F32 = 0


class _GgmlTensor(ctypes.Structure):  # struct ggml_tensor of ggml/include/ggml.h
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
                ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


TRACE_RE = re.compile(rb"^(embd|inp_embd|(nemotron_h_block_out|mamba_out|attn_out|ffn_out|l_out)-\d+)$")


class Worker:
    def __init__(self):
        import llama_cpp as L

        self.L = L
        L.llama_backend_init()
        self.model = self.ctx = self.mem = None
        self.n_vocab = 0
        self.tracing = False
        self.trace: dict[str, np.ndarray] = {}
        self.trace_error = ""
        self._cb = L.ggml_backend_sched_eval_callback(self._eval_cb)

    # -- eval callback: llama.cpp asks (ask=True) whether we want a tensor, then hands it over computed
    def _eval_cb(self, t, ask, _user):
        try:
            if not self.tracing:
                return not ask  # ask: "no"; handed a tensor anyway: "continue"
            ten = _GgmlTensor.from_address(t)
            name = ten.name
            if ask:
                return bool(TRACE_RE.match(name))
            if TRACE_RE.match(name) and ten.type == GGML_TYPE_F32 and ten.data:
                ne = [int(v) for v in ten.ne]
                nb = [int(v) for v in ten.nb]
                if nb[0] == 4 and nb[1] == 4 * ne[0]:
                    n = ne[0] * ne[1]
                    buf = (ctypes.c_float * n).from_address(ten.data)
                    self.trace[name.decode()] = np.ctypeslib.as_array(buf).reshape(ne[1], ne[0]).copy()  # float32
            return True
        except Exception as e:  # never let an exception cross the C boundary
            self.trace_error = f"{type(e).__name__}: {e}"
            return True

    def info(self):
        L = self.L
        return {"llama_cpp_python": L.__version__, "system_info": L.llama_print_system_info().decode(errors="replace"),
                "pid": os.getpid()}

    def load(self, path: str, opts: dict):
        L = self.L
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.use_extra_bufts = opts.get("repack", True)  # False: no weight repacking (NEMOH_LLAMACPP_REPACK=0)
        model = L.llama_model_load_from_file(path.encode(), mp)
        if not model:
            raise RuntimeError(f"llama_model_load_from_file failed on {path} (see the log)")
        cp = L.llama_context_default_params()
        cp.n_ctx = opts["n_ctx"]
        cp.n_batch = opts["n_batch"]
        cp.n_ubatch = opts["n_ubatch"]
        cp.n_seq_max = opts["n_seq_max"]
        cp.n_threads = cp.n_threads_batch = opts["threads"]
        cp.type_k = cp.type_v = opts["type_kv"]
        cp.flash_attn_type = opts["flash_attn"]
        cp.kv_unified = True
        cp.no_perf = True
        cp.cb_eval = self._cb
        cp.cb_eval_user_data = None
        ctx = L.llama_init_from_model(model, cp)
        if not ctx:
            raise RuntimeError("llama_init_from_model failed (see the log)")
        self.model, self.ctx = model, ctx
        self.mem = L.llama_get_memory(ctx)
        vocab = L.llama_model_get_vocab(model)
        self.n_vocab = L.llama_vocab_n_tokens(vocab)
        self.n_batch = opts["n_batch"]
        desc = ctypes.create_string_buffer(256)
        L.llama_model_desc(model, desc, 256)
        return {"n_vocab": self.n_vocab, "n_layer": L.llama_model_n_layer(model), "desc": desc.value.decode(),
                "n_ctx": L.llama_n_ctx(ctx), "n_seq_max": L.llama_n_seq_max(ctx)}

    def decode(self, rows, last_only: bool, trace: bool):
        """rows: [(seq_id, tokens, pos0)] -> per row an array [n, V] (or [1, V]); plus the trace."""
        L = self.L
        flat = [(r, i, seq, tok, pos0 + i) for r, (seq, toks, pos0) in enumerate(rows) for i, tok in enumerate(toks)]
        outs: list[list[np.ndarray]] = [[] for _ in rows]
        self.trace, self.trace_error, self.tracing = {}, "", bool(trace)
        traces: dict[str, list[np.ndarray]] = {}
        try:
            for a in range(0, len(flat), self.n_batch):
                part = flat[a:a + self.n_batch]
                batch = L.llama_batch_init(len(part), 0, 1)
                try:
                    want = []
                    for j, (r, i, seq, tok, pos) in enumerate(part):
                        batch.token[j] = tok
                        batch.pos[j] = pos
                        batch.n_seq_id[j] = 1
                        batch.seq_id[j][0] = seq
                        is_out = (not last_only) or i == len(rows[r][1]) - 1
                        batch.logits[j] = is_out
                        if is_out:
                            want.append((j, r))
                    batch.n_tokens = len(part)
                    rc = L.llama_decode(self.ctx, batch)
                    if rc != 0:
                        raise RuntimeError(f"llama_decode returned {rc}"
                                           + (" (no memory slot for the batch)" if rc == 1 else ""))
                    for j, r in want:
                        ptr = L.llama_get_logits_ith(self.ctx, j)
                        if not ptr:
                            raise RuntimeError(f"llama_get_logits_ith({j}) returned NULL")
                        outs[r].append(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())
                finally:
                    L.llama_batch_free(batch)
                for k, v in self.trace.items():
                    traces.setdefault(k, []).append(v)
                self.trace = {}
        finally:
            self.tracing = False
        logits = [np.stack(o) if o else np.zeros((0, self.n_vocab), np.float32) for o in outs]
        # the trace by tensor name, or {"__error__": message} when the callback failed
        tr: dict[str, Any] | None = {k: np.concatenate(v) for k, v in traces.items()} if trace else None
        if trace and self.trace_error:
            tr = {"__error__": self.trace_error}
        return logits, tr

    def free(self, seqs):
        for s in seqs:
            self.L.llama_memory_seq_rm(self.mem, s, -1, -1)
        return None

    def copy(self, pairs):
        for src, dst in pairs:
            self.L.llama_memory_seq_rm(self.mem, dst, -1, -1)
            self.L.llama_memory_seq_cp(self.mem, src, dst, -1, -1)
        return None

    def quantize(self, src: str, dst: str, ftype: int):
        L = self.L
        qp = L.llama_model_quantize_default_params()
        qp.ftype = ftype
        qp.nthread = os.cpu_count() or 1
        rc = L.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(qp))
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize returned {rc} (see the log)")
        return None

    def abort(self):
        sys.stderr.write("nemoh test hook: calling abort() in the llama.cpp worker\n")
        sys.stderr.flush()
        os.abort()


def main() -> None:
    proto = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed (by llama.cpp or Python) goes to the log, never into the protocol
    sys.stdout = sys.stderr
    inp = os.fdopen(os.dup(0), "rb")
    w = None
    while True:
        try:
            msg = pickle.load(inp)
        except EOFError:
            return
        op, args = msg[0], msg[1:]
        try:
            if w is None:
                w = Worker()
            if op == "exit":
                return
            reply: tuple[Any, ...] = ("ok", getattr(w, op)(*args))
        except Exception as e:
            reply = ("err", f"{type(e).__name__}: {e}", traceback.format_exc(limit=3))
        pickle.dump(reply, proto, protocol=pickle.HIGHEST_PROTOCOL)
        proto.flush()


if __name__ == "__main__":
    main()

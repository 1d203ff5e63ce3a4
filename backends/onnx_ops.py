"""The ONNX op vocabulary of the lowering: proto helpers, a node builder that names every node after
the IR op it comes from, and `Lowering`, with one method per IR op kind (named after the kind)
emitting that op's ONNX nodes. nemoh.backends.onnx_export walks the IR with it and owns the
graph's inputs and outputs, checking and saving; see its docstring for the graph's contract.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch

from nemoh.errors import NemohError
from nemoh.model.ir import Graph, Op


def onnx_module():
    try:
        import onnx
    except ImportError as e:
        raise NemohError(f"the ONNX exporter needs the 'onnx' package ({e}); "
                         "install it with: pip install 'nemoh[onnx]'") from None
    return onnx


def elem_type(dtype: str) -> int:
    """nemoh dtype name -> onnx.TensorProto element type."""
    TP = onnx_module().TensorProto
    return {"float64": TP.DOUBLE, "float32": TP.FLOAT, "float16": TP.FLOAT16, "bfloat16": TP.BFLOAT16,
            "int64": TP.INT64}[dtype]


def tensor_proto(name: str, t: torch.Tensor):
    """A TensorProto holding exactly the bytes of `t` (any float dtype, bf16 included)."""
    onnx = onnx_module()
    t = t.detach().cpu().contiguous()
    dtype = str(t.dtype).removeprefix("torch.")
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return onnx.helper.make_tensor(name, elem_type(dtype), list(t.shape), raw, raw=True)


def tensor_from_proto(tp, base_dir: str | Path | None = None) -> torch.Tensor:
    """The inverse of `tensor_proto`: the initializer's bytes as a torch tensor (bit-exact)."""
    onnx = onnx_module()
    TP = onnx.TensorProto
    dtype = {TP.DOUBLE: torch.float64, TP.FLOAT: torch.float32, TP.FLOAT16: torch.float16,
             TP.BFLOAT16: torch.bfloat16, TP.INT64: torch.int64}[tp.data_type]
    if onnx.external_data_helper.uses_external_data(tp):
        tp = onnx.TensorProto.FromString(tp.SerializeToString())
        onnx.external_data_helper.load_external_data_for_tensor(tp, str(base_dir or "."))
    if tp.HasField("raw_data"):
        raw = bytearray(tp.raw_data)
        return torch.frombuffer(raw, dtype=dtype).reshape(tuple(tp.dims)) if raw else torch.empty(
            tuple(tp.dims), dtype=dtype)
    return torch.from_numpy(onnx.numpy_helper.to_array(tp).copy())  # typed fields (not written by us)


# ----------------------------------------------------------------------------------------------
# A small graph builder
# ----------------------------------------------------------------------------------------------

class Builder:
    """Collects nodes and initializers; names every node and value after the current scope."""

    def __init__(self) -> None:
        self.onnx = onnx_module()
        self.nodes: list = []
        self.initializers: list = []
        self.scope = "graph"
        self._n = 0
        self._consts: dict[tuple, str] = {}

    @contextlib.contextmanager
    def scoped(self, name: str):
        old, self.scope = self.scope, name
        try:
            yield
        finally:
            self.scope = old

    def op(self, op_type: str, *inputs: str | None, n_out: int = 1, out: str | None = None, **attrs: Any):
        """Append one node; returns its output name (or a list of `n_out` names)."""
        self._n += 1
        name = f"{self.scope}/{op_type}_{self._n}"
        outs = [out or name] if n_out == 1 else [f"{name}:{j}" for j in range(n_out)]
        self.nodes.append(self.onnx.helper.make_node(op_type, ["" if i is None else i for i in inputs], outs,
                                                     name=name, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, values, dtype: torch.dtype) -> str:
        """A constant (a Constant node, deduplicated); `values` a number or a nested list."""
        t = torch.tensor(values, dtype=dtype)
        key = (str(dtype), tuple(t.shape), t.view(-1).tolist().__repr__())
        if key not in self._consts:
            self._n += 1
            name = f"const/{self._n}"
            self.nodes.append(self.onnx.helper.make_node("Constant", [], [name], name=name,
                                                         value=tensor_proto(name, t)))
            self._consts[key] = name
        return self._consts[key]

    def i64(self, *values: int) -> str:
        """A 1-D int64 constant (shapes, axes, starts/ends)."""
        return self.const(list(values), torch.int64)


# ----------------------------------------------------------------------------------------------
# The lowering: one method per IR op kind
# ----------------------------------------------------------------------------------------------

BIG = 2 ** 62  # "to the end" for Slice


class Lowering:
    def __init__(self, graph: Graph, b: Builder):
        TP = b.onnx.TensorProto
        self.g, self.b, self.TP = graph, b, TP
        self.dt = elem_type(graph.dtype)
        self.acc_torch = torch.float64 if graph.dtype == "float64" else torch.float32
        self.acc = TP.DOUBLE if graph.dtype == "float64" else TP.FLOAT
        self.state_in: dict[str, str] = {}
        self.state_out: dict[str, str] = {}
        self._memo: dict[str, Any] = {}

    # -- helpers ------------------------------------------------------------------------------
    def cast(self, x: str, to: int) -> str:
        return self.b.op("Cast", x, to=to)

    def cacc(self, value: float) -> str:
        """A scalar constant in the accumulation dtype."""
        return self.b.const(value, self.acc_torch)

    def silu(self, x: str) -> str:
        return self.b.op("Mul", x, self.b.op("Sigmoid", x))

    def rms(self, x: str, eps: float) -> str:
        """x * 1/sqrt(mean(x^2, last axis) + eps), in x's dtype (the caller casts to fp32 first)."""
        b = self.b
        ms = b.op("ReduceMean", b.op("Mul", x, x), b.i64(-1), keepdims=1)
        return b.op("Mul", x, b.op("Reciprocal", b.op("Sqrt", b.op("Add", ms, self.cacc(eps)))))

    def dim(self, x: str, axis: int) -> str:
        """The size of `x` along `axis` as a 1-D int64 [1]."""
        return self.b.op("Shape", x, start=axis, end=axis + 1 if axis != -1 else BIG)

    def scalar(self, x1: str) -> str:
        """[1] -> [] (Range wants scalars)."""
        return self.b.op("Squeeze", x1, self.b.i64(0))

    def once(self, key: str, make):
        """Shared values (masks, chunk geometry) built at their first use and reused by every layer."""
        if key not in self._memo:
            with self.b.scoped(f"shared.{key}"):
                self._memo[key] = make()
        return self._memo[key]

    def new_mask(self) -> str:
        """The new tokens' mask as [B, T, 1] in the model dtype (multiplying by it zeroes padding)."""
        def make():
            b = self.b
            T = self.dim("input_ids", 1)
            m = b.op("Slice", "attention_mask", b.op("Neg", T), b.i64(BIG), b.i64(1))  # [B, T]
            return b.op("Unsqueeze", self.cast(m, self.dt), b.i64(-1))
        return self.once("new_mask", make)

    def weight_t(self, name: str) -> str:
        """A [out, in] weight transposed to [in, out] for MatMul (folded by onnxruntime at load)."""
        return self.b.op("Transpose", name, perm=[1, 0])

    def segsum(self, a: str) -> str:
        """a [..., l] -> [..., l, l] with out[t, s] = a[s+1] + ... + a[t] for s <= t, -inf above.

        A masked cumulative sum rather than cum[t] - cum[s]: no cancellation between two large
        cumulative sums (the same construction as the PyTorch executor's segsum).
        """
        b = self.b
        r = b.op("Range", b.const(0, torch.int64), self.scalar(self.dim(a, -1)), b.const(1, torch.int64))
        t_col, s_row = b.op("Unsqueeze", r, b.i64(1)), b.op("Unsqueeze", r, b.i64(0))  # [l, 1], [1, l]
        strict = b.op("Greater", t_col, s_row)  # t > s
        tril = b.op("GreaterOrEqual", t_col, s_row)  # t >= s
        x = b.op("Where", strict, b.op("Unsqueeze", a, b.i64(-1)), self.cacc(0.0))  # x[t, s] = a[t] if t > s
        x = b.op("CumSum", x, b.const(-2, torch.int64))  # sum over t' <= t
        return b.op("Where", tril, x, self.cacc(-math.inf))

    # -- op kinds -----------------------------------------------------------------------------
    def embedding(self, op: Op, ins: list[str]) -> list[str]:
        (ids,), (w,) = ins, op.params
        return [self.b.op("Gather", w, ids, axis=0)]  # [B, T, D]

    def rmsnorm(self, op: Op, ins: list[str]) -> list[str]:
        (x,), (w,) = ins, op.params
        y = self.rms(self.cast(x, self.acc), op.a["eps"])  # in fp32
        return [self.cast(self.b.op("Mul", y, self.cast(w, self.acc)), self.dt)]

    def linear(self, op: Op, ins: list[str]) -> list[str]:
        (x,) = ins
        if op.a.get("zero_padding"):  # padding: h is zeroed before in_proj (x * 1 is exact)
            x = self.b.op("Mul", x, self.new_mask())
        y = self.b.op("MatMul", x, self.weight_t(op.params[0]))
        return [self.b.op("Add", y, op.params[1]) if len(op.params) > 1 else y]

    def split(self, op: Op, ins: list[str]) -> list[str]:
        sizes = list(op.a["sizes"])
        return self.b.op("Split", ins[0], self.b.i64(*sizes), axis=-1, n_out=len(sizes))

    def causal_conv1d(self, op: Op, ins: list[str]) -> list[str]:
        """Depthwise causal conv as K shifted multiply-adds over [carried K-1 inputs | new inputs].

        Written out rather than as ONNX Conv: onnxruntime's CPU Conv has no float64 kernel, and
        with K = 4 the sum is as cheap. The new state is the last K-1 *inputs* (pre-conv).
        """
        b = self.b
        (x,), (name,) = ins, op.state
        K = op.a["kernel"]
        w, bias = op.params[0], op.params[1] if len(op.params) > 1 else None
        m = self.new_mask()
        x = b.op("Mul", x, m)  # [B, T, C], padding zeroed before the conv
        past = b.op("Transpose", self.state_in[name], perm=[0, 2, 1])  # [B, K-1, C]
        full = b.op("Concat", past, x, axis=1)  # [B, K-1+T, C]
        new = b.op("Slice", full, b.i64(-(K - 1)), b.i64(BIG), b.i64(1))  # [B, K-1, C]
        self.state_out[name] = b.op("Transpose", new, perm=[0, 2, 1], out=f"present.{name}")
        wk = b.op("Transpose", b.op("Squeeze", w, b.i64(1)), perm=[1, 0])  # [K, C]
        y = None
        for k in range(K):  # y[t] = sum_k w[k] * full[t + k]
            xs = b.op("Slice", full, b.i64(k), b.i64(k - (K - 1) if k < K - 1 else BIG), b.i64(1))  # [B, T, C]
            term = b.op("Mul", xs, b.op("Gather", wk, b.const(k, torch.int64), axis=0))
            y = term if y is None else b.op("Add", y, term)
        if y is None:
            raise ValueError(f"conv1d {name}: kernel size must be >= 1, got K={K}")
        if bias is not None:
            y = b.op("Add", y, bias)
        return [b.op("Mul", self.silu(y), m)]  # and zeroed after it

    def chunks(self) -> dict[str, str]:
        """Chunk geometry shared by every mamba layer: Lc = min(T, chunk), nc = ceil(T / Lc), pad."""
        def make():
            b = self.b
            T = self.dim("input_ids", 1)
            chunk = next(o.a["chunk_size"] for l in self.g.layers for o in l.ops if o.kind == "ssd_scan")
            Lc = b.op("Min", T, b.i64(chunk))
            nc = b.op("Div", b.op("Sub", b.op("Add", T, Lc), b.i64(1)), Lc)
            pad = b.op("Sub", b.op("Mul", nc, Lc), T)
            return {"T": T, "Lc": Lc, "nc": nc, "pad": b.op("Concat", b.i64(0), pad, axis=0)}
        return self.once("chunks", make)

    def ssd_scan(self, op: Op, ins: list[str]) -> list[str]:
        """The Mamba2 scan in the chunked (SSD) form, all in fp32: matmuls within each chunk, the
        state carried across chunks by one more decayed product over the chunk index (no loop).

        A decode step is the same graph with T = 1 (one chunk of length 1). Padded tail positions
        get dt = 0 and x = 0: they neither decay nor feed the state.
        """
        b, a = self.b, op.a
        xs, dt, Bm, Cm = ins
        A_log, D, dt_bias = op.params
        (name,) = op.state
        H, P, G, N = a["heads"], a["head_dim"], a["groups"], a["state_size"]
        geo = self.chunks()
        # discretise: dt = clamp(softplus(dt + dt_bias), time_step_limit), A = -exp(A_log) once
        d = b.op("Softplus", b.op("Add", self.cast(dt, self.acc), self.cast(dt_bias, self.acc)))  # [B, T, H]
        hi = None if a["dt_max"] is None else self.cacc(a["dt_max"])
        d = b.op("Clip", d, self.cacc(a["dt_min"]), hi)
        A = b.op("Neg", b.op("Exp", self.cast(A_log, self.acc)))  # [H]

        def heads(t: str) -> str:  # [B, T, G*N] -> [B, T, H, N]: contiguous heads share a group
            t = b.op("Reshape", self.cast(t, self.acc), b.i64(0, 0, G, 1, N))
            return b.op("Reshape", b.op("Expand", t, b.i64(1, 1, 1, H // G, 1)), b.i64(0, 0, H, N))

        def chunked(t: str, tail: list[int], perm: list[int]) -> str:  # pad T to nc*Lc, [B, nc, Lc, ...] permuted
            t = b.op("Pad", t, geo["pad"], None, b.i64(1))
            t = b.op("Reshape", t, b.op("Concat", b.i64(0, -1), geo["Lc"], b.i64(*tail), axis=0))
            return b.op("Transpose", t, perm=perm)

        x = b.op("Reshape", self.cast(xs, self.acc), b.i64(0, 0, H, P))  # [B, T, H, P]
        x = chunked(x, [H, P], [0, 1, 3, 2, 4])  # [B, nc, H, Lc, P]
        Bt = chunked(heads(Bm), [H, N], [0, 1, 3, 2, 4])  # [B, nc, H, Lc, N]
        Ct = chunked(heads(Cm), [H, N], [0, 1, 3, 2, 4])
        dtc = chunked(d, [H], [0, 1, 3, 2])  # [B, nc, H, Lc]
        dA = b.op("Mul", dtc, b.op("Unsqueeze", A, b.i64(1)))  # [B, nc, H, Lc]
        cum = b.op("CumSum", dA, b.const(-1, torch.int64))  # decay from the chunk start
        xdt = b.op("Mul", x, b.op("Unsqueeze", dtc, b.i64(-1)))  # [B, nc, H, Lc, P]
        # within each chunk: a decayed, causally masked C.B "attention" over x*dt
        Lmat = b.op("Exp", self.segsum(dA))  # [B, nc, H, Lc, Lc]
        scores = b.op("Mul", b.op("MatMul", Ct, b.op("Transpose", Bt, perm=[0, 1, 2, 4, 3])), Lmat)
        y = b.op("MatMul", scores, xdt)  # [B, nc, H, Lc, P]
        # each chunk's own contribution to the state at its end
        last = b.op("Slice", cum, b.i64(-1), b.i64(BIG), b.i64(-1))  # [B, nc, H, 1]
        to_end = b.op("Exp", b.op("Sub", last, cum))  # [B, nc, H, Lc]
        xw = b.op("Mul", xdt, b.op("Unsqueeze", to_end, b.i64(-1)))
        states = b.op("MatMul", b.op("Transpose", xw, perm=[0, 1, 2, 4, 3]), Bt)  # [B, nc, H, P, N]
        # across chunks: state at the start of chunk z = sum_{c <= z} exp(decay c..z) * contribution c,
        # with the carried state as contribution 0 (the SSD paper's inter-chunk step)
        a_c = b.op("Transpose", b.op("Squeeze", last, b.i64(-1)), perm=[0, 2, 1])  # [B, H, nc]
        a_c = b.op("Pad", a_c, b.i64(1, 0), None, b.i64(2))  # [B, H, nc+1]
        Dc = b.op("Exp", self.segsum(a_c))  # [B, H, nc+1, nc+1]
        s0 = b.op("Unsqueeze", self.cast(self.state_in[name], self.acc), b.i64(1))  # [B, 1, H, P, N]
        allst = b.op("Concat", s0, states, axis=1)  # [B, nc+1, H, P, N]
        allst = b.op("Transpose", b.op("Reshape", allst, b.i64(0, 0, H, P * N)), perm=[0, 2, 1, 3])  # [B,H,nc+1,PN]
        carried = b.op("MatMul", Dc, allst)  # [B, H, nc+1, P*N]
        final = b.op("Slice", carried, b.i64(-1), b.i64(BIG), b.i64(2))  # [B, H, 1, P*N]
        ssm_type = elem_type(next(s.dtype for s in self.g.states if s.name == name))
        self.state_out[name] = b.op("Cast", b.op("Reshape", final, b.i64(0, H, P, N)), to=ssm_type,
                                    out=f"present.{name}")
        start = b.op("Slice", carried, b.i64(0), b.i64(-1), b.i64(2))  # [B, H, nc, P*N]
        start = b.op("Transpose", b.op("Reshape", start, b.i64(0, 0, -1, P, N)), perm=[0, 2, 1, 4, 3])  # [B,nc,H,N,P]
        y_state = b.op("MatMul", Ct, start)  # [B, nc, H, Lc, P]
        y = b.op("Add", y, b.op("Mul", y_state, b.op("Unsqueeze", b.op("Exp", cum), b.i64(-1))))
        y = b.op("Add", y, b.op("Mul", x, b.op("Reshape", self.cast(D, self.acc), b.i64(H, 1, 1))))
        y = b.op("Reshape", b.op("Transpose", y, perm=[0, 1, 3, 2, 4]), b.i64(0, -1, H * P))  # [B, nc*Lc, H*P]
        return [b.op("Slice", y, b.i64(0), geo["T"], b.i64(1))]  # stays fp32 into the gated norm

    def gated_rmsnorm(self, op: Op, ins: list[str]) -> list[str]:
        """Gate first (y * silu(z)), then RMS-normalise each group of contiguous channels alone."""
        b = self.b
        (y, z), (w,) = ins, op.params
        v = b.op("Mul", self.cast(y, self.acc), self.silu(self.cast(z, self.acc)))  # [B, T, d_inner]
        g = self.rms(b.op("Reshape", v, b.i64(0, 0, -1, op.a["group_size"])), op.a["eps"])  # [B, T, G, gs]
        out = b.op("Mul", b.op("Reshape", g, b.i64(0, 0, -1)), self.cast(w, self.acc))
        return [self.cast(out, self.dt)]

    def attention_masks(self) -> tuple[str, str]:
        """visible [B, 1, 1, T, S+T] (causal and a real key) and has_key [B, 1, 1, T, 1], shared."""
        def make():
            b = self.b
            S_all, T = self.dim("attention_mask", 1), self.dim("input_ids", 1)
            one, zero = b.const(1, torch.int64), b.const(0, torch.int64)
            pos_k = b.op("Range", zero, self.scalar(S_all), one)  # [S+T]
            pos_q = b.op("Range", self.scalar(b.op("Sub", S_all, T)), self.scalar(S_all), one)  # [T]: absolute
            causal = b.op("LessOrEqual", b.op("Unsqueeze", pos_k, b.i64(0)), b.op("Unsqueeze", pos_q, b.i64(1)))
            real = self.cast(b.op("Unsqueeze", "attention_mask", b.i64(1)), self.TP.BOOL)  # [B, 1, S+T]
            vis = b.op("And", causal, real)  # [B, T, S+T]
            has = b.op("ReduceMax", self.cast(vis, self.TP.FLOAT), b.i64(-1), keepdims=1)  # [B, T, 1]
            has = b.op("Greater", has, b.const(0.0, torch.float32))
            return b.op("Unsqueeze", vis, b.i64(1, 2)), b.op("Unsqueeze", has, b.i64(1, 2))
        return self.once("attention_masks", make)

    def attention(self, op: Op, ins: list[str]) -> list[str]:
        """Causal GQA over [cache | new] keys, no positional encoding, softmax in fp32.

        Query heads are viewed as [KV, g] (head j reads KV head j // g) so K and V are never
        repeated: scores [B, KV, g, T, S+T] come from one broadcast MatMul.
        """
        b, a = self.b, op.a
        q, k, v = ins
        Q, KV, Dh = a["heads"], a["kv_heads"], a["head_dim"]
        g = Q // KV
        kname, vname = op.state
        k_all = b.op("Concat", self.state_in[kname], b.op("Reshape", k, b.i64(0, 0, KV, Dh)), axis=1,
                     out=f"present.{kname}")  # [B, S+T, KV, Dh]
        v_all = b.op("Concat", self.state_in[vname], b.op("Reshape", v, b.i64(0, 0, KV, Dh)), axis=1,
                     out=f"present.{vname}")
        self.state_out[kname], self.state_out[vname] = k_all, v_all
        qh = b.op("Transpose", b.op("Reshape", self.cast(q, self.acc), b.i64(0, 0, KV, g, Dh)),
                  perm=[0, 2, 3, 1, 4])  # [B, KV, g, T, Dh]
        kh = b.op("Transpose", self.cast(k_all, self.acc), perm=[0, 2, 3, 1])  # [B, KV, Dh, S+T]
        vh = b.op("Transpose", self.cast(v_all, self.acc), perm=[0, 2, 1, 3])  # [B, KV, S+T, Dh]
        kh, vh = b.op("Unsqueeze", kh, b.i64(2)), b.op("Unsqueeze", vh, b.i64(2))  # broadcast over g
        scores = b.op("Mul", b.op("MatMul", qh, kh), self.cacc(a["scale"]))  # [B, KV, g, T, S+T]
        vis, has = self.attention_masks()
        p = b.op("Softmax", b.op("Where", vis, scores, self.cacc(-math.inf)), axis=-1)
        p = b.op("Where", has, p, self.cacc(0.0))  # a row with no visible key: zeros, not NaN
        o = b.op("Transpose", b.op("MatMul", p, vh), perm=[0, 3, 1, 2, 4])  # [B, T, KV, g, Dh]
        return [self.cast(b.op("Reshape", o, b.i64(0, 0, Q * Dh)), self.dt)]

    def relu2(self, op: Op, ins: list[str]) -> list[str]:
        r = self.b.op("Relu", ins[0])
        return [self.b.op("Mul", r, r)]

    def moe_router(self, op: Op, ins: list[str]) -> list[str]:
        """Sigmoid scores in fp32; choose by score + correction bias (fp32), group-limited; weights
        are the chosen raw scores, normalised if asked, times the scaling factor.

        Outputs topk_w [M, k] (fp32) and topk_idx [M, k] (int64), M = B*T.
        """
        b, a = self.b, op.a
        (h,), (W, bias) = ins, op.params
        E, k, ng, tg = a["experts"], a["top_k"], a["n_group"], a["topk_group"]
        hf = b.op("Reshape", self.cast(h, self.acc), b.i64(-1, self.g.config.hidden_size))  # [M, D]
        s = b.op("Sigmoid", b.op("MatMul", hf, self.weight_t(self.cast(W, self.acc))))  # [M, E]
        choice = b.op("Add", s, self.cast(bias, self.acc))
        if ng > 1:  # keep the topk_group groups with the best sum of their top-2 choice values
            per = E // ng
            grouped = b.op("Reshape", choice, b.i64(0, ng, per))  # [M, ng, per]
            top2 = b.op("TopK", grouped, b.i64(min(2, per)), axis=-1, n_out=2)[0]
            gscore = b.op("ReduceSum", top2, b.i64(-1), keepdims=0)  # [M, ng]
            gidx = b.op("TopK", gscore, b.i64(tg), axis=-1, n_out=2)[1]  # [M, tg]
            keep = b.op("ScatterElements", b.op("ConstantOfShape", b.op("Shape", gscore),
                                                value=tensor_proto("zero", torch.zeros(1))),
                        gidx, b.op("ConstantOfShape", b.op("Shape", gidx), value=tensor_proto("one", torch.ones(1))),
                        axis=1)  # [M, ng] 1.0 for kept groups
            keep = b.op("Reshape", b.op("Expand", b.op("Unsqueeze", keep, b.i64(-1)), b.i64(1, 1, per)), b.i64(0, E))
            choice = b.op("Where", self.cast(keep, self.TP.BOOL), choice, self.cacc(-math.inf))
        idx = b.op("TopK", choice, b.i64(k), axis=-1, n_out=2)[1]  # [M, k]
        w = b.op("GatherElements", s, idx, axis=1)  # raw scores, no bias
        if a["norm_topk_prob"]:
            w = b.op("Div", w, b.op("Add", b.op("ReduceSum", w, b.i64(-1), keepdims=1), self.cacc(1e-20)))
        return [b.op("Mul", w, self.cacc(a["routed_scaling_factor"])), idx]

    def moe_experts(self, op: Op, ins: list[str]) -> list[str]:
        """Routed experts, one gather -> MLP -> scatter-add per expert over the tokens routed to it.

        Unrolled over the E experts (E is fixed by the config): work is proportional to the routed
        tokens, each expert's weights are read once, and the tokens' contributions are summed in
        expert order in fp32 (ScatterND add; one token appears at most once per expert, so no two
        updates of one scatter collide and the result is deterministic).
        """
        b, a = self.b, op.a
        (x, w, idx), (up, down) = ins, op.params
        L = a["latent"]
        xf = b.op("Reshape", x, b.i64(-1, L))  # [M, L]
        zero = tensor_proto("zero", torch.zeros(1, dtype=self.acc_torch))
        out = b.op("ConstantOfShape", b.op("Shape", xf), value=zero)  # [M, L] fp32 accumulator
        for e in range(a["experts"]):
            pos = b.op("Transpose", b.op("NonZero", b.op("Equal", idx, b.i64(e))), perm=[1, 0])  # [n_e, 2] (m, j)
            tok = b.op("Gather", pos, b.i64(0), axis=1)  # [n_e, 1]
            we = b.op("GatherND", w, pos)  # [n_e]
            xe = b.op("Gather", xf, b.op("Squeeze", tok, b.i64(1)), axis=0)  # [n_e, L]
            ue = b.op("Gather", up, b.const(e, torch.int64), axis=0)  # [I, L]
            de = b.op("Gather", down, b.const(e, torch.int64), axis=0)  # [L, I]
            he = b.op("MatMul", xe, self.weight_t(ue))  # [n_e, I]
            r = b.op("Relu", he)
            ye = b.op("MatMul", b.op("Mul", r, r), self.weight_t(de))  # [n_e, L], model dtype
            upd = b.op("Mul", self.cast(ye, self.acc), b.op("Unsqueeze", we, b.i64(-1)))
            out = b.op("ScatterND", out, tok, upd, reduction="add")
        return [self.cast(b.op("Reshape", out, b.op("Shape", x)), self.dt)]

    def add(self, op: Op, ins: list[str]) -> list[str]:
        return [self.b.op("Add", *ins)] if len(ins) == 2 else [ins[0]]

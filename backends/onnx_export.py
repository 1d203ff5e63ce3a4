"""Lowering the nemoh IR to one ONNX graph (standard opset 18 only, no custom ops).

The IR is the source: `lower_graph` walks `graph.blocks` and emits, for every IR op, the ONNX
nodes of that op kind (one method per kind on `Lowering`, named after the kind). Nothing here
traces or exports the PyTorch executor.

The graph (one per model and compute dtype) runs prefill chunks and decode steps alike:

  inputs   input_ids                [batch, tokens]                       int64
           attention_mask           [batch, past_tokens + tokens]         int64, the key mask of
                                    every cached token followed by the new tokens (0 = left padding)
           logits_to_keep           []                     int64: 0 = logits of all positions,
                                    k > 0 = of the last k (the head then runs on k positions)
           past.layers.{i}.conv     [batch, C, K-1]        model dtype    (mamba layers)
           past.layers.{i}.ssm      [batch, H, P, N]       fp32 (fp64 in an fp64 graph)
           past.layers.{i}.k / .v   [batch, past_tokens, KV, Dh]          (attention layers; S may be 0)
  outputs  logits                   [batch, tokens (or k), V]  fp32 (fp64 in an fp64 graph)
           present.layers.{i}.*     the updated states, same layouts (k/v grown by `tokens`)

Precision follows nemoh.oracle and the PyTorch executor: hidden states and matmuls at the model
dtype; RMSNorm, the gated norm, the SSM (state kept in fp32), the router (its correction bias
stays fp32) and the attention softmax in fp32 (fp64 in an fp64 graph). Padding as the oracle:
the new tokens' mask zeroes h before in_proj and xBC before and after the conv; attention masks
padded keys; a query row with no visible key outputs zeros.

Parameters become initializers under their canonical IR names, stored exactly as the checkpoint
holds them at the graph's storage dtype (bit-equal to the file; [out, in] weights are transposed
by a Transpose node that ONNX Runtime folds at load). Node and value names start with the IR op
that produced them (`layers.3.mixer.ssd/MatMul_812`), so a profile or an error points back to it.

Dimension letters as in nemoh.oracle; in this file also c = chunk index, l = position in a chunk,
nc = number of chunks, Lc = chunk length (min(tokens, chunk_size)), M = batch * tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nemoh.backends.onnx_ops import BIG, Builder, Lowering, onnx_module, elem_type, tensor_proto
from nemoh.errors import NemohError
from nemoh.model.ir import Graph

OPSET = 18  # everything used here exists in opset 18 (Pad/Reduce* with axes inputs, ScatterND add)
IR_VERSION = 8  # the IR version that goes with opset 18, so older tools open the file too
TRACE_PREFIX = "trace/"



# ----------------------------------------------------------------------------------------------
# The whole graph
# ----------------------------------------------------------------------------------------------

def io_names(graph: Graph) -> tuple[list[str], list[str]]:
    """(input names, output names) of the lowered graph, in order."""
    states = [s.name for s in graph.states]
    return (["input_ids", "attention_mask", "logits_to_keep", *(f"past.{n}" for n in states)],
            ["logits", *(f"present.{n}" for n in states)])


def lower_graph(graph: Graph, params: dict[str, torch.Tensor], *, trace: bool = False):
    """The ONNX ModelProto of `graph` with `params` (canonical name -> tensor at its storage dtype).

    With `trace`, every IR op's first output is also a graph output `trace/{op name}` and the
    residual stream after layer i is `trace/layers.{i}` (for nemoh's per-op comparisons).
    """
    onnx = onnx_module()
    helper, TP = onnx.helper, onnx.TensorProto
    missing = [t.name for t in graph.params if t.name not in params]
    if missing:
        raise NemohError(f"lower_graph: no tensor for parameter '{missing[0]}' ({len(missing)} missing)")
    b = Builder()
    lw = Lowering(graph, b)
    for t in graph.params:
        p = params[t.name]
        if tuple(p.shape) != t.shape or str(p.dtype).removeprefix("torch.") != t.dtype:
            raise NemohError(f"lower_graph: parameter '{t.name}' is {list(p.shape)} {p.dtype}, "
                             f"expected {list(t.shape)} {t.dtype}")
        b.initializers.append(tensor_proto(t.name, p))

    inputs = [helper.make_tensor_value_info("input_ids", TP.INT64, ["batch", "tokens"]),
              helper.make_tensor_value_info("attention_mask", TP.INT64, ["batch", "total_tokens"]),
              # 0 = logits of every position; k > 0 runs the head on the last k positions only (a
              # prefill that needs one token's logits skips T-1 rows of the biggest matmul). A required
              # input: onnxruntime cannot IO-bind an input that has a default initializer.
              helper.make_tensor_value_info("logits_to_keep", TP.INT64, [])]
    outputs = []
    c = graph.config
    out_type = lw.acc  # logits in fp32 (fp64 for an fp64 graph), as the backend protocol returns them
    outputs.append(helper.make_tensor_value_info("logits", out_type, ["batch", "kept_tokens", c.vocab_size]))
    for s in graph.states:
        lw.state_in[s.name] = f"past.{s.name}"
        et = elem_type(s.dtype)
        if s.per_token:
            inputs.append(helper.make_tensor_value_info(f"past.{s.name}", et, ["batch", "past_tokens", *s.shape]))
            outputs.append(helper.make_tensor_value_info(f"present.{s.name}", et, ["batch", "total_tokens", *s.shape]))
        else:
            inputs.append(helper.make_tensor_value_info(f"past.{s.name}", et, ["batch", *s.shape]))
            outputs.append(helper.make_tensor_value_info(f"present.{s.name}", et, ["batch", *s.shape]))

    vals: dict[str, str] = {"ids": "input_ids"}
    traced: list[tuple[str, str]] = []
    for block in graph.blocks:
        if block is graph.head:  # x[:, -k:] (k = 0: all; -0 is 0) before norm_f and lm_head
            with b.scoped("head"):
                start = b.op("Neg", b.op("Unsqueeze", "logits_to_keep", b.i64(0)))
                vals["x"] = b.op("Slice", vals["x"], start, b.i64(BIG), b.i64(1))
        for op in block.ops:
            with b.scoped(op.name):
                outs = getattr(lw, op.kind)(op, [vals[n] for n in op.inputs])
            vals.update(zip(op.outputs, outs))
            traced.append((op.name, outs[0]))
        if block.index >= 0:
            traced.append((f"layers.{block.index}", vals["x"]))
    if lw.dt == out_type:  # name lm_head's output `logits` (a Cast to the same type would still copy)
        node = next(n for n in b.nodes if vals["logits"] in n.output)
        node.output[list(node.output).index(vals["logits"])] = "logits"
        traced = [(n, "logits" if v == vals["logits"] else v) for n, v in traced]
    else:
        with b.scoped("head"):
            b.op("Cast", vals["logits"], to=out_type, out="logits")
    missing_states = [s.name for s in graph.states if s.name not in lw.state_out]
    if missing_states:  # an op kind forgot to produce its state: a bug here, not bad input
        raise AssertionError(f"no present value for states {missing_states}")

    if trace:
        with b.scoped("trace"):
            for name, v in traced:
                b.op("Identity", v, out=f"{TRACE_PREFIX}{name}")
    g = helper.make_graph(b.nodes, f"nemotron_h_{graph.dtype}", inputs, outputs, b.initializers)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="nemoh",
                              doc_string=f"Nemotron-H ({c.pattern}) lowered from the nemoh IR, dtype {graph.dtype}")
    model.ir_version = IR_VERSION
    helper.set_model_props(model, {"nemoh.dtype": graph.dtype, "nemoh.pattern": c.pattern,
                                   "nemoh.graph": graph.dumps()})
    if trace:  # trace outputs need their element types: take them from shape inference
        inferred = onnx.shape_inference.infer_shapes(model)
        types = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info}
        for name, _ in traced:
            out = f"{TRACE_PREFIX}{name}"
            model.graph.output.append(helper.make_tensor_value_info(out, types[out], None))
    return model


def check(model_or_path) -> None:
    """onnx.checker (full check: strict type and shape inference) and shape inference must pass.

    Give the path of a saved model.onnx for models over the 2 GiB protobuf limit."""
    onnx = onnx_module()
    if isinstance(model_or_path, (str, Path)):
        path = str(model_or_path)
        onnx.checker.check_model(path, full_check=True)
        onnx.shape_inference.infer_shapes_path(path, path + ".inferred", check_type=True, strict_mode=True)
        Path(path + ".inferred").unlink()
    else:
        onnx.checker.check_model(model_or_path, full_check=True)
        onnx.shape_inference.infer_shapes(model_or_path, check_type=True, strict_mode=True)


def save(model, out_dir: str | Path, size_threshold: int = 1024) -> Path:
    """Write `model.onnx` with every initializer over `size_threshold` bytes in `model.onnx.data`."""
    onnx = onnx_module()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NemohError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    data = out / "model.onnx.data"
    if data.exists():
        data.unlink()  # onnx appends to an existing data file
    m = onnx.ModelProto()
    m.CopyFrom(model)  # save_model moves tensors out of the proto it is given
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=size_threshold)
    return path


def export_onnx(model_dir_or_preset: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Lower a checkpoint (directory or preset name) to `out_dir/model.onnx` (+ `model.onnx.data`).

    The result passes onnx.checker (full check) and shape inference; it is what the onnx backend
    runs. Returns the path of model.onnx.
    """
    from nemoh.model.config import load_config
    from nemoh.model.ir import build_graph
    from nemoh.model.presets import resolve_model
    from nemoh.model.weights import Checkpoint

    path = resolve_model(str(model_dir_or_preset))
    graph = build_graph(load_config(path), dtype)
    out = save(lower_graph(graph, Checkpoint(path).load(graph)), out_dir)
    check(out)  # from the file: also proves the external data is complete and loadable
    return out


def register(sub) -> None:
    """`nemoh export-onnx`: registered under the `nemoh.commands` entry points (the core never imports backends)."""
    from nemoh import dtypes

    p = sub.add_parser("export-onnx", help="lower a model to an ONNX graph (model.onnx + external weights)")
    p.add_argument("model", help="checkpoint directory or preset name")
    p.add_argument("--out", required=True, type=Path, help="directory to write model.onnx into")
    p.add_argument("--dtype", choices=list(dtypes.NAMES), default="float32", help="compute dtype (default float32)")
    p.set_defaults(func=_cmd_export_onnx)


def _cmd_export_onnx(args) -> int:
    """Lower a model's IR to ONNX: model.onnx plus model.onnx.data (the weights), checked."""
    from nemoh.output import check_output_dir

    check_output_dir(args.out, "--out")  # before the export: a writable directory, not a file or device
    path = export_onnx(args.model, args.out, args.dtype)
    print(f"wrote {path} (+ {path.name}.data, dtype {args.dtype}); passes onnx.checker and shape inference")
    return 0

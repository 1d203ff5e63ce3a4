"""weights: every tensor the backend loaded is bit-equal to the checkpoint file (cast to the dtype
the backend computes in; the router's correction bias stays fp32). A quantized checkpoint's linears are
compared dequantized (exactly, then cast), and the codes and scales a backend holds (`read_stored`) bit for
bit with the file."""

from __future__ import annotations

import torch

from nemoh.conformance.case import Case, Metric, Result, Status, Suite, judge
from nemoh.model.weights import bit_pattern, stored_mismatches, unsigned_zero
from nemoh.runtime.backend import capability


def cases(ctx) -> list[Case]:
    return [Case("weights", f"bit-equal(n={len(ctx.graph.params)})", (("n", len(ctx.graph.params)),))]


def run(case: Case, ctx) -> Result:
    be, ck = ctx.model.backend, ctx.model.checkpoint
    loaded = {t.name: be.read_param(t.name) for t in ctx.graph.params}
    # a backend that stores a tensor transformed (llama.cpp's GGUF holds -exp(A_log)) says how
    transform = getattr(be, "param_transform", None)
    formats = ck.formats(ctx.graph) if ck.quant is not None else {}

    def file_tensor(name: str) -> torch.Tensor:  # a quantized linear dequantized exactly (fp64), else as stored
        return ck.dequantized(name, formats[name]) if name in formats else ck.read(name)

    exact = capability(ctx.model.backend, "param_bit_equal", ctx.dtype)
    if not exact.ok:  # quantized weights: measure how far each tensor moved, judge nothing here
        errs = {}
        for name, t in loaded.items():
            ref = file_tensor(name).double()
            ref = transform(name, ref).double() if transform else ref
            den = ref.pow(2).mean().sqrt().item() or 1.0
            errs[name] = (t.double().reshape(ref.shape) - ref).pow(2).mean().sqrt().item() / den
        worst = sorted(errs.items(), key=lambda kv: -kv[1])[:10]
        return Result(case, Status.NOT_SUPPORTED, message=exact.reason,
                      details={"rel_rms_error_worst": dict(worst)})
    if transform is None:
        bad = ck.mismatches(loaded)
    else:
        bad = []
        for name, t in loaded.items():
            ref, t = transform(name, file_tensor(name)).to(t.dtype), t.detach().cpu()
            if name in formats:  # a dequantized weight is a value: -0 and +0 are the same one
                ref, t = unsigned_zero(ref), unsigned_zero(t)
            if ref.shape != t.shape or not torch.equal(bit_pattern(ref), bit_pattern(t)):
                bad.append(name)
    n = len(loaded)
    read_stored = getattr(be, "read_stored", None)
    if ck.quant is not None and read_stored is not None:  # the packed codes and scales too, bit for bit
        n_stored, bad_stored = stored_mismatches(ck, ctx.graph, read_stored)
        n, bad = n + n_stored, bad + bad_stored
    res = judge(case, [Metric("mismatched_tensors", float(len(bad)), 0.0, label=f"of {n}")],
                details={"mismatched": bad[:50]})
    if bad:  # the names, where the user looks first (the console and the report's failure list)
        res.message += ": " + ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    return res


SUITE = Suite("weights", __doc__, cases, run, order=50)

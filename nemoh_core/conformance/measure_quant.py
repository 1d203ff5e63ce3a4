"""How much each choice the quantized formats leave open moves the logits (docs/quantized-formats.md).

`python -m nemoh.conformance.measure_quant [PRESET...]` runs the fp64 oracle on each quantized preset (default:
all of nemoh.model.presets.QUANT_SPECS) with nemoh's default QuantOptions and with each alternative, on one
seeded prompt (B=2, T=chunk_size+37), and prints a Markdown table: mean KL(default || alternative) per
position with its standard error, top-1 agreement, and max |Δlogit| / max |logit|. Two rows change the
checkpoint rather than the options: every linear quantized (exclude_modules ignored), and the unquantized
original (what the format costs in all). One more writes the preset again with kv_cache_quant_algo FP8 (k_scale /
v_scale calibrated) and compares its FP8 KV cache with the cache kept at the compute dtype.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import replace

import torch

from nemoh import oracle
from nemoh.model import presets as P
from nemoh.model.config import load_config
from nemoh.model.ir import build_graph
from nemoh.model.quant import QuantConfig, read_quant_config
from nemoh.model.quant_writer import write_quantized
from nemoh.model.weights import Checkpoint
from nemoh.oracle.ops import DEFAULT_QUANT, QuantOptions

ALTERNATIVES: dict[str, QuantOptions] = {
    "activations not quantized (weight-only reading)": replace(DEFAULT_QUANT, act_quant=False),
    "block scale rounded up, not to nearest": replace(DEFAULT_QUANT, scale_rounding="up"),
    "block scale not saturated at 448 (no clipping)": replace(DEFAULT_QUANT, scale_overflow="inf"),
    "e2m1 ties away from zero, not to even": replace(DEFAULT_QUANT, value_rounding="away"),
    # not choices of the format: what computing at a dtype alone does to the quantizers (suites/logits.py)
    "quantizer inputs rounded to float32 first (any fp32 executor)": replace(DEFAULT_QUANT, input_dtype="float32"),
    "quantizer inputs rounded to bfloat16 first (any bf16 executor)": replace(DEFAULT_QUANT, input_dtype="bfloat16"),
}


def stats(ref: torch.Tensor, out: torch.Tensor) -> str:
    lr, lo = torch.log_softmax(ref.double(), -1), torch.log_softmax(out.double(), -1)
    kl = (lr.exp() * (lr - lo)).sum(-1).flatten()
    se = (kl.std() / kl.numel() ** 0.5).item() if kl.numel() > 1 else 0.0
    top1 = (ref.argmax(-1) == out.argmax(-1)).double().mean().item()
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    return f"{kl.mean().item():.3g} ± {se:.2g} | {top1:.3f} | {rel:.3g}"


def measure(name: str) -> list[str]:
    path = P.cached_checkpoint(name)
    cfg = load_config(path)
    g = build_graph(cfg, "float64")
    params = Checkpoint(path).load(g)
    T = cfg.chunk_size + 37
    ids = torch.randint(4, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(31))
    ref = oracle.run(g, params, ids)
    qc = read_quant_config(path)
    assert qc is not None
    rows = [f"| {name} | {label} | {stats(ref, oracle.run(g, params, ids, qopts=o))} |"
            for label, o in ALTERNATIVES.items()]
    orig = P.cached_checkpoint(P.original_of(name) or name)
    with tempfile.TemporaryDirectory() as tmp:
        every = QuantConfig(qc.algo, qc.group_size, (), qc.kv_cache_algo, "measure_quant")
        write_quantized(orig, tmp, every)
        out = oracle.run(g, Checkpoint(tmp).load(g), ids)
    rows.append(f"| {name} | every linear quantized (exclude_modules {list(qc.exclude_modules)} ignored) | "
                f"{stats(ref, out)} |")
    if qc.kv_cache_algo is None and any(layer.kind == "attention" for layer in g.layers):
        with tempfile.TemporaryDirectory() as tmp:  # the same checkpoint with an FP8 KV cache, as Nano's release
            write_quantized(orig, tmp, QuantConfig(qc.algo, qc.group_size, qc.exclude_modules, "FP8", "measure_quant"))
            kv_params = Checkpoint(tmp).load(g)
            kv = oracle.run(g, kv_params, ids)
            plain = oracle.run(g, kv_params, ids, qopts=replace(DEFAULT_QUANT, kv_cache="compute"))
        rows.append(f"| {name} + FP8 KV cache | KV cache kept at the compute dtype (kv_cache_quant_algo FP8 "
                    f"ignored) | {stats(kv, plain)} |")
    g0 = build_graph(load_config(orig), "float64")
    rows.append(f"| {name} | the unquantized original (the format's whole cost) | "
                f"{stats(ref, oracle.run(g0, Checkpoint(orig).load(g0), ids))} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    names = (sys.argv[1:] if argv is None else argv) or list(P.QUANT_SPECS)
    print("| preset | alternative to nemoh's default | KL(default ‖ alt) nats, mean ± se | top-1 agreement | "
          "max abs Δ / max abs |")
    print("|---|---|---|---|---|")
    for name in names:
        for row in measure(name):
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

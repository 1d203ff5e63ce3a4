"""Measure the figures quoted in nemoh.conformance.tolerances:
`python -m nemoh.conformance.measure_tolerances [PRESET...]`.

For each preset and dtype: the PyTorch executor against the fp64 oracle (rel max abs, top-1), and
against itself chunked, decoded token by token and inside a left-padded batch; in fp32 also against
transformers with its dt clamp removed. Prompts are 300 random tokens, batch 2.
"""

from __future__ import annotations

import sys

import torch

from nemoh import oracle
from nemoh.conformance.tolerances import rel_max_abs, top1_agreement
from nemoh.model.presets import PRESETS, resolve_model
from nemoh.runtime.session import open_model


def measure(name: str) -> list[str]:
    path = resolve_model(name)
    ids = torch.randint(4, 512, (2, 300), generator=torch.Generator().manual_seed(1))
    m64 = open_model(path, "torch", "float64", "cpu")
    ref = oracle.run(m64.graph, m64.checkpoint.load(m64.graph), ids)
    rows = []
    for dtype in ("float64", "float32", "bfloat16", "float16"):
        m = open_model(path, "torch", dtype, "cpu")
        out = m.session(2).forward(ids)
        split = m.session(2).prefill(ids, chunks=[1, 2, 127, 129, 41])
        s = m.session(2)
        s.prefill(ids[:, :250])
        dec = torch.cat([s.forward(ids[:, t:t + 1]) for t in range(250, 300)], 1)
        mask = torch.ones(2, 300, dtype=torch.long)
        mask[1, :60] = 0
        padded = m.session(2).forward(ids, mask)[1, 60:]
        alone = m.session(1).forward(ids[1:, 60:])[0]
        row = (f"{name:<16} {dtype:<9} oracle {rel_max_abs(out, ref):.1e} top1 {top1_agreement(out, ref):.3f} "
               f"split {rel_max_abs(split, out):.1e} decode {rel_max_abs(dec, out[:, 250:]):.1e} "
               f"pad {rel_max_abs(padded, alone):.1e}")
        if dtype == "float32":
            from nemoh.oracle.reference import load_reference, reference_logits

            hf = reference_logits(load_reference(path, "float32", intended=True), ids)
            row += f" transformers {rel_max_abs(out, hf):.1e}"
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or list(PRESETS)
    for name in names:
        print("\n".join(measure(name)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

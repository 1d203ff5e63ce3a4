"""Measure the figures quoted in nemoh.conformance.tolerances:
`python -m nemoh.conformance.measure_tolerances [PRESET...]`.

`PYTHONPATH=tests python -m nemoh.conformance.measure_tolerances --rules [PRESET...]` instead prints,
for every planted bug of tests/broken_backends.py at bf16 and fp16, whether the logits suite catches
it under the fixed floors (the rule before issue 18) and under the dtype-relative rule
(docs/low-precision-verdicts.md).

For each preset and dtype: the PyTorch executor against the fp64 oracle (rel max abs, top-1), and
against itself chunked, decoded token by token and inside a left-padded batch; in fp32 also against
transformers with its dt clamp removed. Prompts are 300 random tokens, batch 2.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch

from nemoh import oracle
from nemoh.conformance.tolerances import rel_max_abs, top1_agreement
from nemoh.model.presets import PRESETS, all_presets, resolve_model
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


def logits_verdicts(name: str, specs: list[str], dtypes: tuple[str, ...] = ("bfloat16", "float16")
                    ) -> list[dict[str, Any]]:
    """Every logits case of `specs` (backends) on preset `name`: the verdict under the fixed floors
    (old rule) and under the dtype-relative rule (new), with the worst NMSE ratio to transformers."""
    from nemoh.conformance.case import Status
    from nemoh.conformance.execute import execute_case
    from nemoh.conformance.references import Ctx, Reference
    from nemoh.conformance.tolerances import tol
    from nemoh.model.config import load_config
    from nemoh.model.ir import build_graph
    from nemoh.runtime.registry import get_backend
    from suites.logits import SUITE

    path = resolve_model(name)
    config = load_config(path)
    ref = Reference(path, config)
    rows = []
    for dtype in dtypes:
        graph = build_graph(config, dtype)
        for spec in specs:
            ctx = Ctx(config, graph, dtype, open_model(path, get_backend(spec), dtype, "cpu"), ref)
            old_ok = new_ok = True
            ratios, worst = [], {}
            for case in SUITE.cases(ctx):
                res = execute_case(SUITE, case, ctx)
                new_ok &= res.status is Status.OK
                for m in res.metrics:
                    t = tol(m.name, dtype) if m.baseline is not None else m.tolerance
                    if t is not None:
                        old_ok &= (m.value >= t) if m.higher_is_better else (m.value <= t)
                    if m.baseline is not None and m.name == "logits_nmse" and case.p["ref"] == "oracle":
                        ratios.append(m.value / m.baseline if m.baseline else math.inf)
                    if m.name in ("logits_nmse", "logits_top1") and case.p["ref"] == "oracle":
                        key = f"{m.name}@T={case.p['T']}"
                        worst[key] = (m.value, m.baseline)
            rows.append({"preset": name, "dtype": dtype, "backend": spec, "old": old_ok, "new": new_ok,
                         "nmse_ratio": max(ratios, default=math.nan), "vs_oracle": worst})
    return rows


#: planted bugs in carried state or padding: the logits suite runs one unpadded forward from a fresh
#: state, so they cannot move its logits under either rule (each measured identical to the unbroken
#: executor on tiny-dense and tiny-latent-moe); they are skipped after those two presets
LOGITS_BLIND = {"ConvStateAfterConv", "ConvStateDropped", "DecayFromChunkStart", "SsmStateDropped",
                "PaddingNotMasked", "InitialStatesDroppedAtBatchOne"}
MOE_BUGS = {"RouterBiasBf16", "RoutingWeightsWithBias", "SharedExpertOnLatent"}  # no-ops without an E layer


def rules_table(names: list[str]) -> list[str]:
    from broken_backends import BUGS  # tests/ on PYTHONPATH

    from nemoh.model.config import load_config

    out = ["| preset | dtype | backend | fixed floors | dtype-relative | NMSE ratio vs oracle (worst T) | "
           "top-1 vs oracle T=short / T=long (transformers) | NMSE vs oracle T=short / T=long (transformers) |",
           "|---|---|---|---|---|---|---|---|"]
    for name in names:
        moe = "E" in load_config(resolve_model(name)).pattern
        bugs = [b for b in sorted(BUGS) if b not in LOGITS_BLIND and (moe or b not in MOE_BUGS)]
        for r in logits_verdicts(name, ["torch", *(f"broken_backends:{b}" for b in bugs)]):
            t = {k: v for k, v in r["vs_oracle"].items() if k.startswith("logits_top1")}
            top = " / ".join(f"{v:.3f} ({b:.3f})" for v, b in t.values())
            n = {k: v for k, v in r["vs_oracle"].items() if k.startswith("logits_nmse")}
            top += " | " + " / ".join(f"{v:.2g} ({b:.2g})" for v, b in n.values())
            verdict = {True: "pass", False: "**FAIL**"}
            out.append(f"| {name} | {r['dtype']} | {r['backend'].removeprefix('broken_backends:')} | "
                       f"{verdict[r['old']]} | {verdict[r['new']]} | {r['nmse_ratio']:.2f} | {top} |")
            print(out[-1], flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if args[:1] == ["--rules"]:
        rules_table(args[1:] or list(all_presets()))
        return 0
    names = args or list(PRESETS)
    for name in names:
        print("\n".join(measure(name)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

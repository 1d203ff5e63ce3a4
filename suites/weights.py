"""weights: every tensor the backend loaded is bit-equal to the checkpoint file (cast to the dtype
the backend computes in; the router's correction bias stays fp32)."""

from __future__ import annotations

from nemoh.harness import Case, Metric, Result, Suite, judge


def cases(ctx) -> list[Case]:
    return [Case("weights", f"bit-equal(n={len(ctx.graph.params)})", (("n", len(ctx.graph.params)),))]


def run(case: Case, ctx) -> Result:
    loaded = {t.name: ctx.model.backend.read_param(t.name) for t in ctx.graph.params}
    bad = ctx.model.checkpoint.mismatches(loaded)
    return judge(case, [Metric("mismatched_tensors", float(len(bad)), 0.0, label=f"of {len(loaded)}")],
                 details={"mismatched": bad[:50]})


SUITE = Suite("weights", __doc__, cases, run)

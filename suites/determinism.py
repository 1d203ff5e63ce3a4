"""determinism: repeated runs are bit-identical; a sequence alone against the same sequence inside a
left-padded batch of others (batch invariance), measured and reported: judged at the dtype's
equivalence tolerance, and whether it is bit-exact is reported alongside."""

from __future__ import annotations

import torch

from nemoh.conformance.case import Case, Metric, Result, Suite, equiv_metrics, judge
from nemoh.runtime.backend import capability


def lengths(ctx) -> list[int]:
    c = ctx.config.chunk_size
    return [c + 40, c - 9, 23, 3]


def cases(ctx) -> list[Case]:
    c = ctx.config.chunk_size
    return [Case("determinism", f"repeat(T={c + 40},chunks=2)", (("kind", "repeat"), ("T", c + 40)), seed=21),
            Case("determinism", f"batch-invariance(lengths={lengths(ctx)},left-padded)",
                 (("kind", "batch"), ("lengths", tuple(lengths(ctx)))), seed=22)]


def padded_batch(ctx, case):
    lens = list(case.p["lengths"])
    T = max(lens)
    ids = torch.zeros(len(lens), T, dtype=torch.int64)
    mask = torch.zeros(len(lens), T, dtype=torch.int64)
    for b, n in enumerate(lens):
        ids[b, T - n:] = ctx.prompt(1, n, case.seed + b)[0]
        mask[b, T - n:] = 1
    nxt = ctx.prompt(len(lens), 3, case.seed + 100)
    return ids, mask, nxt


def run(case: Case, ctx) -> Result:
    if case.p["kind"] == "repeat":
        T = case.p["T"]
        ids = ctx.prompt(2, T, case.seed)
        states = capability(ctx.model.backend, "state_export", ctx.dtype)
        runs = []
        for _ in range(2):
            s = ctx.session(2)
            logits = s.prefill(ids, chunks=[T // 2, T - T // 2])
            runs.append((logits, ctx.export_state(s) if states.ok else {}))
        (a, sa), (b, sb) = runs
        differing = int((a != b).sum()) + sum(int((sa[k] != sb[k]).sum()) for k in sa)
        label = "run 1 vs run 2" if states.ok else "run 1 vs run 2 (logits only)"
        details = {} if states.ok else {"state_comparison": f"NOT_SUPPORTED: {states.reason}"}
        return judge(case, [Metric("differing_elements", float(differing), 0.0, label=label)], details=details)
    ids, mask, nxt = padded_batch(ctx, case)
    T = ids.shape[1]
    s = ctx.session(ids.shape[0])
    batch = s.prefill(ids, mask, chunks=[T // 2, T - T // 2])
    steps = torch.cat([s.forward(nxt[:, t:t + 1]) for t in range(3)], 1)
    ms, exact = [], True
    for b, n in enumerate(case.p["lengths"]):
        one = ctx.session(1)
        alone = one.prefill(ids[b:b + 1, T - n:])
        alone_steps = torch.cat([one.forward(nxt[b:b + 1, t:t + 1]) for t in range(3)], 1)
        got = torch.cat([batch[b, T - n:], steps[b]])
        want = torch.cat([alone[0], alone_steps[0]])
        ms += equiv_metrics(got, want, ctx.dtype, f"row {b} (length {n})")
        exact &= bool(torch.equal(got, want))
    return judge(case, ms, details={"bit_exact": exact})


def scenario(result: Result, ctx):
    if result.case.p["kind"] == "repeat":
        T = result.case.p["T"]
        ids = ctx.prompt(2, T, result.case.seed)
        return [(ids[:, :T // 2], None), (ids[:, T // 2:], None)]
    ids, mask, nxt = padded_batch(ctx, result.case)
    T = ids.shape[1]
    batch = [(ids[:, :T // 2], mask[:, :T // 2]), (ids[:, T // 2:], mask[:, T // 2:])] + \
        [(nxt[:, t:t + 1], None) for t in range(3)]
    b = len(result.case.p["lengths"]) - 1  # the most padded row, alone: the other side of the comparison
    n = result.case.p["lengths"][b]
    alone = [(ids[b:b + 1, T - n:], None)] + [(nxt[b:b + 1, t:t + 1], None) for t in range(3)]
    return {"left-padded batch": batch, f"row {b} alone": alone}


SUITE = Suite("determinism", __doc__, cases, run, scenario, order=40)

"""prefill-chunks: one-shot prefill against the same tokens split into chunks (1-token chunks,
K-1, a short multi-token chunk (< K-1 tokens) after a full conv window, chunk_size - 1,
chunk_size + 1, three or more chunks, and random partitions drawn from a recorded seed, a failing
one shrunk to the simplest split that still fails): the logits and the carried conv, SSM and KV
state must agree. The splits are shared between a batch of one (the most common way a model runs)
and a batch of two, and one left-padded batch mixes sequences of three lengths."""

from __future__ import annotations

import random

import torch

from nemoh.conformance.case import Case, Metric, Result, Suite, badness, equiv_metrics, judge, state_metrics
from nemoh.runtime.backend import capability

#: each split runs at one batch size (chosen, not multiplied: an engine can be wrong at B=1 only, e.g.
#: taking its no-initial-state path for a single sequence, or at B>1 only)
BATCH = {"1+rest": 2, "K-1+rest": 1, "K-2,1,rest": 1, "chunk+1,K-2,rest": 1, "chunk-1+rest": 1,
         "chunk+1+rest": 2, "chunk,chunk,rest": 2, "1x6+rest": 2}
RANDOM_SEEDS = {1: 1, 2: 2}  # seed -> batch size


def length(ctx) -> int:
    return 2 * ctx.config.chunk_size + 4


def fixed_splits(ctx) -> dict[str, list[int]]:
    T, c, K = length(ctx), ctx.config.chunk_size, ctx.config.conv_kernel
    return {
        "1+rest": [1, T - 1],
        "K-1+rest": [K - 1, T - K + 1],
        "K-2,1,rest": [max(K - 2, 1), 1, T - max(K - 2, 1) - 1],
        # a multi-token chunk shorter than the conv window, after more than K-1 earlier tokens: the new
        # conv state mixes the carried state with the chunk (the shift-by-T < K-1 path)
        "chunk+1,K-2,rest": [c + 1, max(K - 2, 1), T - c - 1 - max(K - 2, 1)],
        "chunk-1+rest": [c - 1, T - c + 1],
        "chunk+1+rest": [c + 1, T - c - 1],
        "chunk,chunk,rest": [c, c, T - 2 * c],
        "1x6+rest": [1] * 6 + [T - 6],
    }


def mixed(ctx) -> tuple[tuple[int, ...], list[int]]:
    """Three sequences of different lengths, left-padded, and a split where the middle one starts
    inside the second chunk and the shortest inside the last: (lengths, split)."""
    T, c = length(ctx), ctx.config.chunk_size
    return (T, T - c - 2, 9), [c - 1, 7, T - c - 6]


def cases(ctx) -> list[Case]:
    T = length(ctx)
    out = [Case("prefill-chunks", f"split={name},T={T},B={BATCH[name]}",
                (("split", tuple(s)), ("T", T), ("B", BATCH[name])), seed=7)
           for name, s in fixed_splits(ctx).items()]
    out += [Case("prefill-chunks", f"random,seed={seed},T={T},B={b}", (("split", "random"), ("T", T), ("B", b)),
                 seed=seed) for seed, b in RANDOM_SEEDS.items()]
    lens, split = mixed(ctx)
    out.append(Case("prefill-chunks", f"split={split},lengths={list(lens)},left-padded",
                    (("split", tuple(split)), ("T", T), ("B", len(lens)), ("lengths", lens)), seed=7))
    return out


def inputs(ctx, case: Case) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The case's token ids [B, T] and, for mixed lengths, its left-padding mask."""
    B, T = case.p["B"], case.p["T"]
    if "lengths" not in case.p:
        return ctx.prompt(B, T, 1000 + T), None
    ids = torch.zeros(B, T, dtype=torch.int64)
    mask = torch.zeros(B, T, dtype=torch.int64)
    for b, n in enumerate(case.p["lengths"]):
        ids[b, T - n:] = ctx.prompt(1, n, 1000 + T + b)[0]
        mask[b, T - n:] = 1
    return ids, mask


def run_split(ctx, ids, split, mask=None):
    """(logits, the exported state, or None for a backend that cannot hand its state out)."""
    s = ctx.session(ids.shape[0])
    logits = s.prefill(ids, mask, chunks=split)
    return logits, ctx.export_state(s) if capability(ctx.model.backend, "state_export", ctx.dtype).ok else None


def one_shot(ctx, case, ids, mask):
    """The one-shot side, computed once per input for all the cases that share it."""
    key = ("prefill-chunks one-shot", case.p["B"], case.p["T"], case.p.get("lengths"))
    if key not in ctx.memo:
        ctx.memo[key] = run_split(ctx, ids, None, mask)
    return ctx.memo[key]


def compare(case, ctx, ids, split, whole, st_whole, mask=None) -> list[Metric]:
    logits, st = run_split(ctx, ids, split, mask)
    label = f"split {list(split)}"
    if mask is not None:  # the real tokens only: what a padded position holds is not specified
        real = mask.bool()
        logits, whole = logits[real], whole[real]
    ms = equiv_metrics(logits, whole, ctx.dtype, f"{label} logits")
    return ms if st is None else [*ms, *state_metrics(st, st_whole, ctx.dtype, label)]


def run(case: Case, ctx) -> Result:
    res = _run(case, ctx)
    states = capability(ctx.model.backend, "state_export", ctx.dtype)
    if not states.ok:  # the logits were still judged; say what was not
        res.details["state_comparison"] = f"NOT_SUPPORTED: {states.reason}"
    return res


def _run(case: Case, ctx) -> Result:
    T = case.p["T"]
    ids, mask = inputs(ctx, case)
    whole, st_whole = one_shot(ctx, case, ids, mask)
    if case.p["split"] != "random":
        details = {"split": list(case.p["split"]), "batch": case.p["B"]}
        if mask is not None:
            details["lengths"] = list(case.p["lengths"])
        return judge(case, compare(case, ctx, ids, case.p["split"], whole, st_whole, mask), details=details)
    # random partitions drawn from the case's seed; the first failing one is shrunk (cuts removed while
    # it still fails) to the simplest failing split
    tried: list[list[int]] = []
    results: dict[tuple[int, ...], list[Metric]] = {}

    def check(split: list[int]) -> list[Metric]:
        key = tuple(split)
        if key not in results:
            tried.append(list(split))
            results[key] = compare(case, ctx, ids, split, whole, st_whole)
        return results[key]

    for split in random_partitions(T, case.seed):
        ms = check(split)
        if not all(m.ok for m in ms):
            minimal, ms = shrink(split, check)
            return judge(case, ms, details={"seed": case.seed, "batch": case.p["B"], "first_failing_split": split,
                                            "minimal_failing_split": minimal, "partitions_tried": tried})
    # all passed: report the worst of the partitions' metrics
    worst = max(tried, key=lambda sp: max((badness(m) for m in results[tuple(sp)]), default=0.0))
    return judge(case, results[tuple(worst)], details={"seed": case.seed, "batch": case.p["B"],
                                                       "partitions_tried": tried, "reported_split": worst})


def random_partitions(T: int, seed: int, n: int = 4, min_cuts: int = 2, max_cuts: int = 6) -> list[list[int]]:
    """`n` partitions of T tokens into 3..7 chunks, drawn from `seed` alone (Python's Mersenne
    Twister, stable across versions): different seeds give different partitions from the first."""
    rng = random.Random(f"prefill-chunks:{T}:{seed}")
    out = []
    for _ in range(n):
        cuts = sorted(rng.sample(range(1, T), rng.randint(min_cuts, min(max_cuts, T - 1))))
        out.append(_split(cuts, T))
    return out


def shrink(split: list[int], check, budget: int = 24) -> tuple[list[int], list]:
    """The simplest split that still fails: merge adjacent chunks (drop a cut) while it fails."""
    T = sum(split)
    cuts = _cuts(split)
    ms = check(split)
    changed = True
    while changed and budget > 0:
        changed = False
        for i in range(len(cuts)):
            trial = cuts[:i] + cuts[i + 1:]
            budget -= 1
            tms = check(_split(trial, T))
            if not all(m.ok for m in tms):
                cuts, ms, changed = trial, tms, True
                break
            if budget <= 0:
                break
    return _split(cuts, T), ms


def _cuts(split: list[int]) -> list[int]:
    out, a = [], 0
    for c in split[:-1]:
        a += c
        out.append(a)
    return out


def _split(cuts: list[int], T: int) -> list[int]:
    b = [0, *cuts, T]
    return [y - x for x, y in zip(b, b[1:])]


def scenario(result: Result, ctx):
    split = result.details.get("minimal_failing_split") or result.details.get("split")
    ids, mask = inputs(ctx, result.case)
    if not split:
        return [(ids, mask)]
    # the bug may be on either side
    return {f"split {list(split)}": _chunks(ids, split, mask), "one-shot": [(ids, mask)]}


def _chunks(ids, split, mask=None):
    out, a = [], 0
    for c in split:
        out.append((ids[:, a:a + c], None if mask is None else mask[:, a:a + c]))
        a += c
    return out


SUITE = Suite("prefill-chunks", __doc__, cases, run, scenario, order=20)

"""eval-parity: nemoh's lm-eval fixture tasks on the backend under test (lm-eval model `nemoh`) and on
transformers (lm-eval's own `hf` model around the reference, its dt clamp removed, at the same dtype),
item by item: the same choice picked, every choice's log-likelihood within tolerance (the max at
fp32/fp64; the mean at bf16/fp16, where one expert choice rounded the other way moves a
log-likelihood by O(1)), and the same generated text; where generations part at bf16/fp16, the
backend's token at the parting step must lie within tolerance of the precise (fp32) reference's
top-1 logit on the same tokens (both re-run token by token on that item's prompt)."""

from __future__ import annotations

import torch

from nemoh.conformance.case import Case, Metric, Result, Status, Suite, judge
from nemoh.conformance.tolerances import tol

SUITE_NAME = "eval-parity"
MMLU, GSM8K = "nemoh_mmlu_fixture", "nemoh_gsm8k_fixture"
BATCH = 4
TOPK = 5


def cases(ctx) -> list[Case]:
    return [
        Case(SUITE_NAME, f"task={MMLU},limit=8,fewshot=1", (("task", MMLU), ("limit", 8), ("fewshot", 1)), seed=0),
        Case(SUITE_NAME, f"task={GSM8K},limit=4,fewshot=1,max_gen_toks=24",
             (("task", GSM8K), ("limit", 4), ("fewshot", 1), ("max_gen_toks", 24)), seed=0),
    ]


def _missing(ctx) -> str:
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as e:
        return f"lm-eval (with accelerate) is not installed: pip install 'nemoh[eval]' ({e})"
    return ctx.hf_unavailable


def _evaluate(lm, case: Case) -> list[dict]:
    """lm-eval's per-item records for the case's task, one per document, by doc_id."""
    import lm_eval

    from nemoh.eval.tasks import offline, quiet_lm_eval, task_manager

    p = case.p
    with offline(), quiet_lm_eval():  # lm-eval's notes here (a model passed as an object, ...) are about this setup
        res = lm_eval.simple_evaluate(
            model=lm, tasks=[p["task"]], limit=p["limit"], num_fewshot=p["fewshot"],
            task_manager=task_manager(False), log_samples=True, bootstrap_iters=0, random_seed=case.seed,
            numpy_random_seed=case.seed, torch_random_seed=case.seed, fewshot_random_seed=case.seed,
            gen_kwargs={"max_gen_toks": p["max_gen_toks"]} if "max_gen_toks" in p else None)
    by_doc: dict[int, dict] = {}
    for s in res["samples"][p["task"]]:
        by_doc.setdefault(int(s["doc_id"]), s)  # generation tasks log one record per answer filter
    return [by_doc[k] for k in sorted(by_doc)]


def _lms(ctx):
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    from nemoh.eval.lm_eval_model import NemohLM

    ours = NemohLM(pretrained=ctx.model, batch_size=BATCH)
    softmax = "float64" if ctx.dtype == "float64" else "float32"
    theirs = HFLM(pretrained=ctx.ref.hf(ctx.dtype), batch_size=BATCH, softmax_dtype=softmax,
                  tokenizer=AutoTokenizer.from_pretrained(str(ctx.ref.path), local_files_only=True))
    return ours, theirs


def run(case: Case, ctx) -> Result:
    why = _missing(ctx)
    if why:
        return Result(case, ctx.hf_status if why == ctx.hf_unavailable else Status.SKIPPED, message=why)
    from nemoh.eval.tasks import quiet_lm_eval

    with quiet_lm_eval():  # HFLM's notes about a model passed as an object are about this setup
        ours_lm, hf_lm = _lms(ctx)
    ours, ref = _evaluate(ours_lm, case), _evaluate(hf_lm, case)
    if [s["doc_id"] for s in ours] != [s["doc_id"] for s in ref]:
        return Result(case, Status.FAIL, message="the two runs evaluated different documents")
    # transformers runs its Mamba scan in fp32 even in an fp64 model (known deviation
    # hf-fp64-scan-in-fp32): nothing compared with it can be judged tighter than fp32
    judged_at = "float32" if ctx.dtype == "float64" else ctx.dtype
    if case.p["task"] == MMLU:
        return _choices(case, ours, ref, judged_at)
    return _generations(case, ctx, ours_lm, ours, ref, judged_at)


def _lls(sample: dict) -> list[float]:
    return [float(r[0][0]) for r in sample["resps"]]  # one (loglikelihood, is_greedy) per choice


def _choices(case: Case, ours: list[dict], ref: list[dict], dtype: str) -> Result:
    t_ll = tol("eval_loglik_abs", dtype)
    worst, worst_doc, agree, ties, items, diffs = 0.0, None, 0, 0, [], []
    for a, b in zip(ours, ref):
        la, lb = _lls(a), _lls(b)
        diffs += [abs(x - y) for x, y in zip(la, lb)]
        d = max(abs(x - y) for x, y in zip(la, lb))
        if not d <= worst:  # NaN counts as worst
            worst, worst_doc = d, a["doc_id"]
        pa, pb = max(range(len(la)), key=la.__getitem__), max(range(len(lb)), key=lb.__getitem__)
        top2 = sorted(lb)[-2:]
        margin = top2[1] - top2[0]
        tie = t_ll is not None and margin <= 2 * t_ll  # both sides may be off by the tolerance
        ties += tie and pa != pb
        agree += pa == pb or tie
        items.append({"doc_id": a["doc_id"], "choice": pa, "reference_choice": pb, "max_abs_loglik_diff": d,
                      "reference_margin": margin, "target": a.get("target")})
    n = len(items)
    acc = sum(float(s.get("acc", 0.0)) for s in ours) / n
    acc_ref = sum(float(s.get("acc", 0.0)) for s in ref) / n
    ms = [Metric("eval_loglik_abs", worst, t_ll, label="per-choice log-likelihood vs transformers, max"),
          Metric("eval_loglik_mean_abs", sum(diffs) / len(diffs), tol("eval_loglik_mean_abs", dtype),
                 label="per-choice log-likelihood vs transformers, mean"),
          Metric("eval_choice_agreement", agree / n, tol("eval_choice_agreement", dtype), higher_is_better=True,
                 label=f"same choice picked ({ties} near-tie flips excused)"),
          Metric("eval_acc_delta", abs(acc - acc_ref), None, label="accuracy difference")]
    return judge(case, ms, details={"items": n, "acc": acc, "reference_acc": acc_ref, "near_tie_flips": ties,
                                    "worst_doc_id": worst_doc, "per_item": items,
                                    "worst_prompt": _prompt(ours, worst_doc)})


def _prompt(samples: list[dict], doc_id) -> str | None:
    for s in samples:
        if s["doc_id"] == doc_id:
            args = s["arguments"]
            first = args[0] if isinstance(args, list) else next(iter(args.values()))
            return first[0] if isinstance(first, (list, tuple)) else first.get("arg_0")
    return None


def _generations(case: Case, ctx, ours_lm, ours: list[dict], ref: list[dict], dtype: str) -> Result:
    texts, parted = [], []
    for a, b in zip(ours, ref):
        ta, tb = a["resps"][0][0], b["resps"][0][0]
        texts.append({"doc_id": a["doc_id"], "text": ta, "reference_text": tb, "same": ta == tb,
                      "answers": a.get("filtered_resps"), "reference_answers": b.get("filtered_resps")})
        if ta != tb:
            prompt = _prompt(ours, a["doc_id"])
            if prompt is None:
                raise ValueError(f"eval_parity: no prompt for doc_id {a['doc_id']!r} in the backend's samples")
            parted.append(_parting(ctx, ours_lm, prompt, case.p["max_gen_toks"]) |
                          {"doc_id": a["doc_id"]})
    n = len(texts)
    same = sum(t["same"] for t in texts) / n
    gaps = [p["precise_logit_gap"] for p in parted if p["step"] is not None]
    ms = [Metric("eval_generation_match", same, tol("eval_generation_match", dtype), higher_is_better=True,
                 label="same generated text"),
          Metric("eval_parting_logit_gap", max(gaps, default=0.0), tol("eval_parting_logit_gap", dtype),
                 label="where texts part: our token's logit below the precise reference's top-1 (nats)")]
    first = max(parted, key=lambda p: p.get("precise_logit_gap") or 0.0)["doc_id"] if parted else None
    return judge(case, ms, details={"items": n, "per_item": texts, "partings": parted, "worst_doc_id": first,
                                    "worst_prompt": _prompt(ours, first) if parted else None})


@torch.inference_mode()
def _parting(ctx, ours_lm, prompt: str, n: int) -> dict:
    """Where two greedy generations part, how plausible is the backend's token?

    Both sides decode `prompt` alone, token by token. At the first step where they choose differently,
    the precise reference (transformers at fp32, or fp64 for an fp64 run) scores the shared history in
    one prefill: how far below its top-1 logit is the backend's token (0: the backend picked the
    precise top-1). The reference at the low precision is not the judge: transformers' bf16 decode path
    can pick a token its own fp32 prefill ranks in the hundreds, so it may be the side that left."""
    from nemoh.runtime.session import greedy_generate

    ids = torch.tensor([ours_lm.tok_encode(prompt)])
    ours, logits = greedy_generate(ctx.model, ids, n)  # [1, n], [1, n, V]
    toks = ours[0].tolist()
    out = ctx.ref.hf(ctx.dtype).generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
        eos_token_id=None, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    ref_toks = out.sequences[0, ids.shape[1]:].tolist()
    k = next((i for i, (x, y) in enumerate(zip(toks, ref_toks)) if x != y), None)
    if k is None:  # alone, token by token, they agree: the batched runs parted on padding-level rounding
        return {"step": None, "note": "identical when re-run alone"}
    precise = "float64" if ctx.dtype == "float64" else "float32"
    hist = torch.tensor([ids[0].tolist() + toks[:k]])
    p = ctx.ref.hf(precise)(input_ids=hist).logits[0, -1].double()  # [V]
    rank = lambda t: int((p > p[t]).sum())  # noqa: E731
    ref_step = torch.stack(out.logits, 1)[0, k].float()
    return {"step": k, "token": toks[k], "reference_token": ref_toks[k],
            "rank_in_precise_reference": rank(toks[k]), "reference_rank_in_precise_reference": rank(ref_toks[k]),
            "precise_logit_gap": (p.max() - p[toks[k]]).item(),  # nats below the precise reference's top-1
            "ours_in_reference_topk": toks[k] in ref_step.topk(TOPK).indices.tolist(),
            "reference_in_our_topk": ref_toks[k] in logits[0, k].topk(TOPK).indices.tolist(),
            "precise_logit_gap_random_token": (p.max() - p.mean()).item()}  # what a token at random would get


def scenario(result: Result, ctx):
    """The worst item's prompt, one forward: what localisation replays against the oracle."""
    prompt = result.details.get("worst_prompt")
    if not prompt:
        return [(ctx.prompt(1, 64, result.case.seed), None)]
    from nemoh.eval.lm_eval_model import NemohLM

    return [(torch.tensor([NemohLM(pretrained=ctx.model).tok_encode(prompt)]), None)]


SUITE = Suite(SUITE_NAME, __doc__, cases, run, scenario, order=60)

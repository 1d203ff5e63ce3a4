"""lm-eval's model `nemoh`: any nemoh backend as an EleutherAI lm-evaluation-harness model.

    import nemoh.eval.lm_eval_model              # registers "nemoh" in lm-eval's model registry
    lm_eval.simple_evaluate(model="nemoh", model_args="pretrained=DIR,backend=onnx,dtype=float32", ...)

or from the shell, lm-eval's own command line with the model registered: `nemoh lm-eval --model nemoh
--model_args pretrained=DIR,backend=torch ... --tasks ...`. Registration is this module's import side
effect, and its only one. Nothing else in nemoh imports lm_eval at import time.

model_args: pretrained (checkpoint directory or preset name; from Python also a loaded
nemoh.runtime.Model), backend (default torch), dtype (default the config's), device, batch_size,
max_length (default the config's max_position_embeddings, else 2048), max_gen_toks (256),
share_context (default true).

Scoring uses the hybrid's carried state: the requests of one context (the four choices of an MMLU
question) are scored from a single prefill of that context. The context is prefilled once (a batch
of contexts, left-padded), its last logits score every continuation's first token, and for longer
continuations the state is snapshotted and restored per continuation, which then feeds only its own
tokens. share_context=false scores every request as one full context+continuation sequence (what
lm-eval's `hf` model does); tests/core/test_eval.py shows the two agree within nemoh.conformance.tolerances.

Text in and out goes through the checkpoint's own `tokenizer.json` (tokenizers, offline). Generation
is greedy only (what lm-eval's MMLU and GSM8K ask for); a request to sample is an error.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  lm-eval's built-ins first: it imports them only into an empty registry
import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from nemoh import display
from nemoh.errors import NemohError, did_you_mean
from nemoh.runtime.session import Model, open_model

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048  # lm-eval's own default when a config names none
DEFAULT_BATCH = 8
CONT_CHUNK = 512  # continuation tokens per forward: bounds logits memory at B x 512 x V


def _as_bool(v: Any, name: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false", "1", "0"):
        return v.lower() in ("true", "1")
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise NemohError(f"model_args {name}={v!r}: expected true or false")


def _as_int(v: Any, name: str, minimum: int = 1) -> int:
    try:
        n = int(v)
    except (TypeError, ValueError):
        raise NemohError(f"model_args {name}={v!r}: expected an integer") from None
    if n < minimum:
        raise NemohError(f"model_args {name}={n}: must be >= {minimum}")
    return n


def _first_id(v: Any) -> int | None:
    return v[0] if isinstance(v, (list, tuple)) and v else v


@register_model("nemoh")
class NemohLM(TemplateLM):
    """A nemoh backend behind lm-eval's model interface (loglikelihood, rolling, generate_until)."""

    MODEL_ARGS = ("pretrained", "backend", "dtype", "device", "batch_size", "max_batch_size", "max_length",
                  "max_gen_toks", "share_context")

    def __init__(self, pretrained: str | Path | Model, backend: str = "torch", dtype: str | None = None,
                 device: str | None = None, batch_size: int | str = DEFAULT_BATCH, max_batch_size: int | None = None,
                 max_length: int | None = None, max_gen_toks: int = 256, share_context: bool | str = True) -> None:
        super().__init__()
        if isinstance(pretrained, Model):
            self.model = pretrained
        else:
            self.model = open_model(str(pretrained), backend, dtype, device)
        self.path = Path(self.model.path)
        self.batch_size = self._batch_size(batch_size, max_batch_size)
        self.share_context = _as_bool(share_context, "share_context")
        self._max_gen_toks = _as_int(max_gen_toks, "max_gen_toks")
        raw = json.loads((self.path / "config.json").read_text(encoding="utf-8"))
        self._max_length = _as_int(max_length, "max_length", 2) if max_length is not None else \
            int(raw.get("max_position_embeddings") or DEFAULT_MAX_LENGTH)
        self._tok = self._load_tokenizer(self.path)
        cfg = self.model.config
        eos = _first_id(cfg.eos_token_id)
        self._bos = _first_id(cfg.bos_token_id)
        if eos is None:
            raise NemohError(f"{self.path / 'config.json'}: eos_token_id is not set; lm-eval needs an end token")
        self._eos: int = eos
        self._bos_text = self._tok.id_to_token(self._bos) if self._bos is not None else None

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> NemohLM:
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> NemohLM:
        """model_args plus lm-eval's own --batch_size / --max_batch_size / --device. Unknown model_args
        keys are an error (a typo is not silently ignored)."""
        args = dict(arg_dict)
        for k in args:
            if k not in cls.MODEL_ARGS:
                raise NemohError(did_you_mean("nemoh model_args key", k, cls.MODEL_ARGS))
        if "pretrained" not in args:
            raise NemohError("nemoh model_args need pretrained=DIR (a checkpoint directory or a preset name)")
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k in cls.MODEL_ARGS}
        # lm-eval's command line sends --device cuda:0 unless told otherwise; on a machine without CUDA
        # that default means nothing (lm-eval's hf model falls back to the CPU the same way)
        dev = extra.get("device")
        if isinstance(dev, str) and dev.startswith("cuda") and not torch.cuda.is_available():
            log.info("no CUDA here: ignoring lm-eval's device %s (use model_args device=... to insist)", dev)
            extra.pop("device")
        return cls(**{**extra, **args})

    @staticmethod
    def _batch_size(batch_size: Any, max_batch_size: Any) -> int:
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            n = _as_int(max_batch_size, "max_batch_size") if max_batch_size else DEFAULT_BATCH
            log.warning("nemoh does not probe memory for batch_size=auto; using batch size %d", n)
            return n
        return _as_int(batch_size, "batch_size")

    @staticmethod
    def _load_tokenizer(path: Path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise NemohError("the tokenizers package is needed for lm-eval: pip install 'nemoh[ref]'") from None
        f = path / "tokenizer.json"
        if not f.is_file():
            raise NemohError(f"{f}: no such file; lm-eval needs the checkpoint's tokenizer")
        try:
            return Tokenizer.from_file(str(f))
        except Exception as e:
            raise NemohError(f"{f}: cannot load tokenizer ({str(e).splitlines()[0]})") from None

    # -- what lm-eval asks of a model ---------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self._eos

    @property
    def prefix_token_id(self) -> int:
        return self._bos if self._bos is not None else self._eos  # as lm-eval's hf model

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return str(self.path)

    def get_model_info(self) -> dict[str, Any]:
        return {"nemoh": {"path": str(self.path), "backend": self.model.backend.name, "dtype": self.model.graph.dtype,
                          "share_context": self.share_context, "batch_size": self.batch_size,
                          "max_length": self.max_length, "describe": self.model.backend.describe()}}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """The checkpoint's tokenizer with its own special tokens (e.g. a leading <s>), unless the text
        already starts with the BOS text (as lm-eval's hf model)."""
        if add_special_tokens is None:
            add_special_tokens = not (self._bos_text and string.startswith(self._bos_text))
        return self._tok.encode(string, add_special_tokens=add_special_tokens).ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        pairs = [(list(ctx), list(cont)) for _, ctx, cont in requests]
        out = self.score(pairs, progress=not disable_tqdm)
        for (key, _, _), ans in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, ans)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum of log p(token | BOS, earlier tokens) over the whole text, in lm-eval's disjoint windows of
        max_length tokens (each window after the first conditions on the tokens before it)."""
        out = []
        for req in requests:
            (string,) = req.args
            toks = self.tok_encode(string, add_special_tokens=False)
            windows = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
                token_list=toks, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)]
            total = sum(ll for ll, _ in self.score(windows)) if windows else 0.0
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        out: dict[int, str] = {}  # request index -> text; every index is in exactly one group
        for idx in groups.values():
            kw = dict(requests[idx[0]].args[1] or {})
            until, max_new = self._gen_settings(kw)
            texts = self.generate([requests[i].args[0] for i in idx], until, max_new, progress=not disable_tqdm)
            for i, text in zip(idx, texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return [out[i] for i in range(len(requests))]

    # -- scoring ------------------------------------------------------------------------------------

    def score(self, pairs: Sequence[tuple[list[int], list[int]]], share_context: bool | None = None,
              progress: bool = False) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether every continuation token is the argmax) per
        (context ids, continuation ids) pair, in the order given."""
        share = self.share_context if share_context is None else share_context
        for ctx, cont in pairs:
            if not ctx or not cont:
                raise NemohError("a loglikelihood request needs a non-empty context and continuation "
                                 f"(got {len(ctx)} context and {len(cont)} continuation tokens)")
        res: dict[int, tuple[float, bool]] = {}  # pair index -> score, filled by the two scorers below
        naive: list[int] = []
        shared: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, (ctx, cont) in enumerate(pairs):
            if share and len(ctx) + len(cont) <= self.max_length + 1:
                shared[tuple(ctx)].append(i)
            else:  # needs left truncation (or sharing is off): one full sequence per request
                naive.append(i)
        contexts = sorted(shared, key=len, reverse=True)  # similar lengths together: little padding
        naive.sort(key=lambda i: len(pairs[i][0]) + len(pairs[i][1]), reverse=True)
        with display.progress(len(pairs), "nemoh loglikelihood", enabled=progress) as bar:
            for a in range(0, len(contexts), self.batch_size):
                batch = contexts[a:a + self.batch_size]
                self._score_shared(batch, shared, pairs, res)
                bar.update(sum(len(shared[c]) for c in batch))
            for a in range(0, len(naive), self.batch_size):
                self._score_naive(naive[a:a + self.batch_size], pairs, res)
                bar.update(len(naive[a:a + self.batch_size]))
        return [res[i] for i in range(len(pairs))]

    def _left_padded(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), self._eos, dtype=torch.int64)
        mask = torch.zeros((len(seqs), T), dtype=torch.int64)
        for b, s in enumerate(seqs):
            ids[b, T - len(s):] = torch.as_tensor(s, dtype=torch.int64)
            mask[b, T - len(s):] = 1
        return ids, mask

    def _score_shared(self, contexts, shared, pairs, res: dict[int, tuple[float, bool]]) -> None:
        """One prefill for a batch of distinct contexts; every continuation scored from its state."""
        ids, mask = self._left_padded(contexts)
        s = self.model.session(len(contexts))
        first = torch.log_softmax(s.prefill(ids, mask, last_only=True)[:, -1].double(), -1)  # [B, V]
        slots = max(len(shared[c]) for c in contexts)  # continuation j of every context, side by side
        needs_state = any(len(pairs[i][1]) > 1 for c in contexts for i in shared[c])
        snap = s.snapshot() if needs_state else None
        for j in range(slots):
            rows = [(b, shared[c][j]) for b, c in enumerate(contexts) if j < len(shared[c])]
            tails = {b: pairs[i][1][:-1] for b, i in rows}  # tokens to feed: all but the last
            L = max(len(t) for t in tails.values())
            per_row: dict[int, tuple[float, bool]] = {}
            for b, i in rows:
                t0 = pairs[i][1][0]
                per_row[b] = (first[b, t0].item(), bool(first[b].argmax().item() == t0))
            if L:
                if j:
                    s.restore(snap)
                # right-padded with junk: causal, so no real position sees it, and the state is
                # thrown away before the next continuation
                feed = torch.full((len(contexts), L), self._eos, dtype=torch.int64)
                want = torch.full((len(contexts), L), -1, dtype=torch.int64)
                for b, i in rows:
                    cont = pairs[i][1]
                    feed[b, :len(cont) - 1] = torch.as_tensor(cont[:-1])
                    want[b, :len(cont) - 1] = torch.as_tensor(cont[1:])
                lp, greedy = self._feed_and_gather(s, feed, want)
                for b, _ in rows:
                    ll, g = per_row[b]
                    per_row[b] = (ll + lp[b], g and greedy[b])
            for b, i in rows:
                res[i] = per_row[b]

    def _feed_and_gather(self, s, feed: torch.Tensor, want: torch.Tensor) -> tuple[list[float], list[bool]]:
        """Feed `feed` [B, L] in pieces of CONT_CHUNK tokens; sum log p(want) where want >= 0, and
        whether each wanted token was the argmax."""
        B = feed.shape[0]
        lp = torch.zeros(B, dtype=torch.float64)
        greedy = torch.ones(B, dtype=torch.bool)
        for a in range(0, feed.shape[1], CONT_CHUNK):
            logits = torch.log_softmax(s.forward(feed[:, a:a + CONT_CHUNK]).double(), -1)  # [B, l, V]
            w = want[:, a:a + CONT_CHUNK]
            valid = w >= 0
            got = logits.gather(-1, w.clamp_min(0)[..., None])[..., 0]
            lp += torch.where(valid, got, torch.zeros_like(got)).sum(1)
            greedy &= ((logits.argmax(-1) == w) | ~valid).all(1)
        return lp.tolist(), greedy.tolist()

    def _score_naive(self, idx: list[int], pairs, res: dict[int, tuple[float, bool]]) -> None:
        """Each request as one sequence (context + continuation, left-truncated to max_length + 1 and
        without its last token), as lm-eval's hf model does it."""
        seqs = [(pairs[i][0] + pairs[i][1])[-(self.max_length + 1):][:-1] for i in idx]
        ids, mask = self._left_padded(seqs)
        logits = torch.log_softmax(self.model.session(len(idx)).forward(ids, mask).double(), -1)  # [B, T, V]
        for b, i in enumerate(idx):
            cont = torch.as_tensor(pairs[i][1])
            lg = logits[b, -len(cont):]
            res[i] = (lg.gather(-1, cont[:, None])[:, 0].sum().item(), bool((lg.argmax(-1) == cont).all()))

    # -- generation -------------------------------------------------------------------------------

    def _gen_settings(self, kw: dict[str, Any]) -> tuple[list[str], int]:
        until = kw.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        max_new = self.max_gen_toks
        for key in ("max_gen_toks", "max_new_tokens", "max_tokens"):
            if kw.get(key) is not None:
                max_new = _as_int(kw[key], key)
                break
        do_sample = kw.get("do_sample", False)
        temperature = float(kw.get("temperature", 0.0) or 0.0)
        if do_sample or temperature > 0:
            raise NemohError(f"nemoh's lm-eval model generates greedily only; this task asks to sample "
                             f"(do_sample={do_sample}, temperature={temperature})")
        return until, max_new

    def generate(self, contexts: Sequence[str], until: Sequence[str], max_new: int, progress: bool = False
                 ) -> list[str]:
        """Greedy continuations of `contexts`, each stopped at the first `until` string or the end token
        and cut before it (lm-eval's convention)."""
        max_ctx = self.max_length - max_new
        if max_ctx < 1:
            raise NemohError(f"max_gen_toks {max_new} leaves no room for a prompt in max_length {self.max_length}")
        enc = [self.tok_encode(c)[-max_ctx:] for c in contexts]
        order = sorted(range(len(enc)), key=lambda i: len(enc[i]), reverse=True)
        out: list[str] = [""] * len(enc)
        with display.progress(len(enc), "nemoh generate_until", enabled=progress) as bar:
            for a in range(0, len(order), self.batch_size):
                idx = order[a:a + self.batch_size]
                for i, text in zip(idx, self._generate_batch([enc[i] for i in idx], until, max_new)):
                    out[i] = text
                bar.update(len(idx))
        return out

    def _generate_batch(self, enc: list[list[int]], until: Sequence[str], max_new: int) -> list[str]:
        ids, mask = self._left_padded(enc)
        s = self.model.session(len(enc))
        logits = s.prefill(ids, mask, last_only=True)[:, -1]
        gen: list[list[int]] = [[] for _ in enc]
        done = [False] * len(enc)
        for step in range(max_new):
            nxt = logits.argmax(-1)
            for b, t in enumerate(nxt.tolist()):
                if done[b]:
                    continue
                if t == self._eos:
                    done[b] = True
                    continue
                gen[b].append(t)
                text = self.tok_decode(gen[b])
                done[b] = any(u and u in text for u in until)
            if all(done) or step == max_new - 1:
                break
            logits = s.forward(nxt[:, None], last_only=True)[:, -1]
        texts = []
        for g in gen:
            text = self.tok_decode(g)
            for u in until:
                if u:
                    text = text.split(u)[0]
            texts.append(text)
        return texts

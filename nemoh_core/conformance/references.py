"""The references every backend and dtype of a run shares (the fp64 oracle and transformers), and what
a suite sees: one backend at one dtype on one model (`Ctx`)."""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from nemoh import oracle
from nemoh.conformance.case import Status
from nemoh.conformance.tolerances import set_variant
from nemoh.model.config import ModelConfig
from nemoh.model.ir import Graph, build_graph
from nemoh.model.quant import read_quant_config
from nemoh.model.weights import Checkpoint
from nemoh.oracle.ops import DEFAULT_QUANT
from nemoh.oracle.stream import StreamedParams
from nemoh.runtime.session import Model, Session


LOGITS_CACHE = 1 << 30  # bytes of oracle logits kept for later cases (a real vocabulary makes each one large)


class Reference:
    """The references shared by every backend and dtype of one run: the fp64 oracle and transformers."""

    def __init__(self, path: Path, config: ModelConfig, *, oracle_mode: str = "memory", hf_too_big: str = "",
                 logits_cache: int = LOGITS_CACHE):
        """`oracle_mode` "memory" holds the fp64 model, "stream" reads it block by block (nemoh.oracle.stream);
        `hf_too_big`, when set, is why transformers is not run at this size (its cases are NOT_SUPPORTED)."""
        self.path, self.config, self.oracle_mode, self.logits_cache = path, config, oracle_mode, logits_cache
        self.graph64 = build_graph(config, "float64")
        self._params: Mapping[str, torch.Tensor] | None = None
        self._hf: dict[tuple[str, bool], Any] = {}
        self._logits: OrderedDict[tuple[bytes, tuple[int, ...], str | None], torch.Tensor] = OrderedDict()
        self.hf_unavailable, self.hf_status = "", Status.SKIPPED
        # found, not imported (that costs seconds, in every --isolate worker); a broken install still
        # fails its import inside a case, which then is SKIPPED with the same hint
        if hf_too_big:
            self.hf_unavailable, self.hf_status = hf_too_big, Status.NOT_SUPPORTED
        elif not importable("transformers"):
            self.hf_unavailable = "transformers is not installed (pip install 'nemoh[ref]')"
        self.quant = read_quant_config(path)
        if self.quant is not None:
            # transformers 5 has no ModelOpt quantizer (it raises "Unknown quantization type, got modelopt"):
            # the quantized oracle alone is the reference; the quant suite compares with the original
            self.hf_status = Status.NOT_SUPPORTED
            self.hf_unavailable = (f"transformers cannot run ModelOpt {self.quant.algo} checkpoints; the fp64 oracle "
                                   "with the quantized semantics is the reference (the quant suite compares with the "
                                   "unquantized original)")
        set_variant("actq" if self.quant is not None and self.quant.fmt in ("fp8", "nvfp4") else "")

    @property
    def params(self) -> Mapping[str, torch.Tensor]:
        if self._params is None:
            ckpt = Checkpoint(self.path)
            self._params = StreamedParams(ckpt, self.graph64) if self.oracle_mode == "stream" else \
                ckpt.load(self.graph64)
        return self._params

    def oracle_logits(self, ids: torch.Tensor, input_dtype: str | None = None) -> torch.Tensor:
        """The fp64 oracle's logits for unpadded `ids`, kept for the run's later cases up to `logits_cache` bytes
        (the least recently used go first). `input_dtype`: a quantized checkpoint's quantizers see their inputs
        rounded to that dtype first (nemoh.oracle.ops.QuantOptions.input_dtype)."""
        key = (ids.contiguous().numpy().tobytes(), tuple(ids.shape), input_dtype)
        if key in self._logits:
            self._logits.move_to_end(key)
            return self._logits[key]
        streamed = self.params if isinstance(self.params, StreamedParams) else None
        if streamed is not None:
            streamed.begin()
        out = oracle.run(self.graph64, self.params, ids, qopts=replace(DEFAULT_QUANT, input_dtype=input_dtype))
        if streamed is not None:
            streamed.release()
        self._logits[key] = out
        while len(self._logits) > 1 and sum(t.numel() * t.element_size() for t in self._logits.values()) > \
                self.logits_cache:
            self._logits.popitem(last=False)
        return out

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one Reference per run
    def _hf_logits(self, key: bytes, shape: tuple[int, ...], dtype: str) -> torch.Tensor | None:
        ids = torch.frombuffer(bytearray(key), dtype=torch.int64).reshape(shape)
        hf = self.hf(dtype)
        if hf is None:
            return None
        with torch.inference_mode():
            return hf(input_ids=ids).logits.float()

    def hf_logits(self, ids: torch.Tensor, dtype: str) -> torch.Tensor | None:
        """transformers' logits (its dt clamp removed) for unpadded `ids`, computed once per run: the
        logits suite's low-precision verdicts reuse them as the reference error at that dtype."""
        return self._hf_logits(ids.contiguous().numpy().tobytes(), tuple(ids.shape), dtype)

    def oracle_summary(self) -> dict[str, Any]:
        """How the oracle ran: held in memory, or streamed (its calls, the most fp64 parameter bytes it held at
        once, and each block's wall time over the calls, reading from the checkpoint included)."""
        out: dict[str, Any] = {"mode": self.oracle_mode, "logits_calls": None, "peak_param_bytes": None,
                               "seconds_by_block": None}
        p = self._params
        if isinstance(p, StreamedParams):
            out.update(logits_calls=p.calls, peak_param_bytes=p.peak_bytes, seconds_by_block=dict(p.seconds))
        return out

    def hf(self, dtype: str, intended: bool = True):
        if self.hf_unavailable:
            return None
        if (dtype, intended) not in self._hf:
            from nemoh.oracle.reference import load_reference

            self._hf[(dtype, intended)] = load_reference(self.path, dtype, intended=intended)
        return self._hf[(dtype, intended)]


def importable(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # sys.modules[name] = None, a broken parent package
        return False


@dataclass
class Ctx:
    """What a suite sees: one backend at one dtype on one model, and the shared references."""

    config: ModelConfig
    graph: Graph
    dtype: str
    model: Model
    ref: Reference
    _prompts: dict = field(default_factory=dict)
    #: results a suite computes once per backend/dtype and shares between its cases (a one-shot prefill)
    memo: dict[Any, Any] = field(default_factory=dict)

    @property
    def hf_unavailable(self) -> str:
        return self.ref.hf_unavailable

    @property
    def hf_status(self) -> Status:
        """SKIPPED when transformers is not installed, NOT_SUPPORTED when the model is too big for it here."""
        return self.ref.hf_status

    @property
    def quant(self):
        """The checkpoint's quantization (nemoh.model.quant.QuantConfig), or None."""
        return self.ref.quant

    def prompt(self, batch: int, length: int, seed: int) -> torch.Tensor:
        """Deterministic token ids in [4, V): no special tokens."""
        key = (batch, length, seed)
        if key not in self._prompts:
            g = torch.Generator().manual_seed(seed)
            self._prompts[key] = torch.randint(min(4, self.config.vocab_size - 1), self.config.vocab_size,
                                               (batch, length), generator=g)
        return self._prompts[key]

    def session(self, batch: int) -> Session:
        return self.model.session(batch)

    def export_state(self, s: Session) -> dict[str, torch.Tensor]:
        return self.model.backend.export_state(s.state)

    def oracle_logits(self, ids: torch.Tensor, input_dtype: str | None = None) -> torch.Tensor:
        return self.ref.oracle_logits(ids, input_dtype)

    @torch.inference_mode()
    def hf_logits(self, ids: torch.Tensor, dtype: str, mask: torch.Tensor | None = None) -> torch.Tensor | None:
        if mask is None:
            return self.ref.hf_logits(ids, dtype)
        hf = self.ref.hf(dtype)
        return None if hf is None else hf(input_ids=ids, attention_mask=mask).logits.float()

    @torch.inference_mode()
    def hf_generate(self, ids: torch.Tensor, n: int):
        hf = self.ref.hf("float32")
        if hf is None:
            return None
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True,
                          output_logits=True)
        return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, dim=1).float()



class ShapeCtx:
    """Enough of a Ctx for suites to list their cases when the backend can't run."""

    def __init__(self, config, graph, dtype, quant=None):
        self.config, self.graph, self.dtype = config, graph, dtype
        self.quant = quant  # the checkpoint's nemoh.model.quant.QuantConfig, or None

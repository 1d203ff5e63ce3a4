"""The references every backend and dtype of a run shares (the fp64 oracle and transformers), and what
a suite sees: one backend at one dtype on one model (`Ctx`)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nemoh import oracle
from nemoh.model.config import ModelConfig
from nemoh.conformance.tolerances import set_variant
from nemoh.model.ir import Graph, build_graph
from nemoh.model.quant import read_quant_config
from nemoh.model.weights import Checkpoint
from nemoh.runtime.session import Model, Session


class Reference:
    """The references shared by every backend and dtype of one run: the fp64 oracle and transformers."""

    def __init__(self, path: Path, config: ModelConfig):
        self.path, self.config = path, config
        self.graph64 = build_graph(config, "float64")
        self._params: dict[str, torch.Tensor] | None = None
        self._hf: dict[tuple[str, bool], Any] = {}
        self.hf_unavailable = ""
        # found, not imported (that costs seconds, in every --isolate worker); a broken install still
        # fails its import inside a case, which then is SKIPPED with the same hint
        if not importable("transformers"):
            self.hf_unavailable = "transformers is not installed (pip install 'nemoh[ref]')"
        self.quant = read_quant_config(path)
        if self.quant is not None:
            # transformers 5 has no ModelOpt quantizer (it raises "Unknown quantization type, got modelopt"):
            # the quantized oracle alone is the reference; the quant suite compares with the original
            self.hf_unavailable = (f"transformers cannot run ModelOpt {self.quant.algo} checkpoints; the fp64 oracle "
                                   "with the quantized semantics is the reference (the quant suite compares with the "
                                   "unquantized original)")
        set_variant("actq" if self.quant is not None and self.quant.fmt in ("fp8", "nvfp4") else "")

    @property
    def params(self) -> dict[str, torch.Tensor]:
        if self._params is None:
            self._params = Checkpoint(self.path).load(self.graph64)
        return self._params

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one Reference per run
    def _oracle(self, key: bytes, shape: tuple[int, ...]) -> torch.Tensor:
        ids = torch.frombuffer(bytearray(key), dtype=torch.int64).reshape(shape)
        return oracle.run(self.graph64, self.params, ids)

    def oracle_logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self._oracle(ids.contiguous().numpy().tobytes(), tuple(ids.shape))

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

    def oracle_logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.ref.oracle_logits(ids)

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

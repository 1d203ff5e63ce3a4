"""The conformance suites. Each module defines `SUITE`, a `nemoh.harness.Suite`.

Adding a suite: a module here and one line in `all_suites`. Nothing is imported until asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nemoh.harness import Suite


def all_suites() -> dict[str, Suite]:
    from . import decode, determinism, eval_parity, logits, prefill_chunks, weights

    return {s.name: s for s in (logits.SUITE, prefill_chunks.SUITE, decode.SUITE, determinism.SUITE, weights.SUITE,
                                eval_parity.SUITE)}

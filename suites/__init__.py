"""The conformance suites. Each module defines `SUITE`, a `nemoh.harness.Suite`.

Adding a suite: a module here and one line in `SUITES`.
"""

from __future__ import annotations

from nemoh.harness import Suite


def all_suites() -> dict[str, Suite]:
    from . import decode, determinism, logits, prefill_chunks, weights

    return {s.name: s for s in (logits.SUITE, prefill_chunks.SUITE, decode.SUITE, determinism.SUITE, weights.SUITE)}

"""Helpers shared by the per-backend model tests (tests/backends/test_equivalences.py and the
per-backend files beside it)."""

from __future__ import annotations

import functools

import torch

from nemoh import oracle
from nemoh.conformance.tolerances import rel_max_abs, tol
from nemoh.model.presets import resolve_model
from nemoh.runtime.session import open_model

T = 260  # crosses the 128-token chunk twice (and tiny-list's 32-token chunk eight times)


@functools.cache
def open_cached(name: str, dtype: str, backend: str):
    return open_model(resolve_model(name), backend, dtype, "cpu")


@functools.cache
def prompt(batch: int = 2, length: int = T, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 512, (batch, length), generator=g)


@functools.cache
def oracle_logits(name: str) -> torch.Tensor:
    m = open_cached(name, "float64", "torch")
    return oracle.run(m.graph, m.checkpoint.load(m.graph), prompt())


def assert_close(out, ref, metric, dtype, what=""):
    err, t = rel_max_abs(out, ref), tol(metric, dtype)
    assert t is not None, f"the tolerance table does not judge {metric} at {dtype}"
    assert err <= t, f"{what}: {metric}={err:.3g} > {t:.3g}"


def run_chunks(m, ids, chunks, mask=None):
    s = m.session(ids.shape[0])
    logits = s.prefill(ids, mask, chunks=chunks)
    return logits, m.backend.export_state(s.state)


def assert_states_close(a, b, dtype, what):
    assert a.keys() == b.keys()
    for k in a:
        if k == "mask":
            assert torch.equal(a[k], b[k]), f"{what}: mask"
        else:
            assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, f"{what}: state {k}"
            assert_close(a[k], b[k], "equiv_rel_max_abs", dtype, f"{what} state {k}")

"""The one table of random-weight rules (nemoh.model.init): every tensor of every model has a rule in
both profiles, and each profile keeps the statistics its users rely on."""

from __future__ import annotations

import pytest
import torch

from nemoh.bench.models import BENCH_PRESETS, RandomWeights, bench_preset_config
from nemoh.model.config import load_config
from nemoh.model.init import KINDS, PROFILES, RULES, kind_of
from nemoh.model.ir import build_graph
from nemoh.model.presets import PRESETS, RELEASES_DIR, resolve_model

RELEASED = sorted(RELEASES_DIR.glob("*.json"))


def test_every_kind_has_a_rule_in_every_profile():
    assert {k for k, _ in KINDS} == set(RULES)
    assert all(set(r) == set(PROFILES) for r in RULES.values())


@pytest.mark.parametrize("cfg", [*(load_config(resolve_model(n)) for n in PRESETS),
                                 *(bench_preset_config(n) for n in BENCH_PRESETS),
                                 *(load_config(p) for p in RELEASED)], ids=lambda c: c.pattern[:12])
def test_every_tensor_of_every_model_has_a_kind(cfg):
    kinds = {kind_of(t.name, t.shape) for t in build_graph(cfg, "bfloat16").params}
    assert {"embedding", "lm_head", "norm", "linear"} <= kinds


def test_an_unknown_tensor_is_named():
    with pytest.raises(AssertionError, match="no initialisation rule for tensor layers.0.mixer.mystery"):
        kind_of("layers.0.mixer.mystery", (3,))


def test_plain_profile_keeps_a_long_stack_at_unit_scale():
    g = build_graph(bench_preset_config("cpu-small"), "float32")
    w = RandomWeights(g, 0)
    out = w.read("layers.0.mixer.out_proj.weight")
    assert abs(out.std().item() * (out.shape[-1] * g.config.num_layers) ** 0.5 - 1) < 0.05
    assert torch.equal(w.read("layers.0.mixer.D"), torch.ones_like(w.read("layers.0.mixer.D")))
    a_log = w.read("layers.0.mixer.A_log")
    assert torch.equal(a_log, RandomWeights(g, 0).read("layers.0.mixer.A_log"))  # made from (seed, name) alone

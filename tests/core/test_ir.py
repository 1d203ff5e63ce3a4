"""The graph IR: frozen data, JSON round trip, well-formed dataflow, counts derived from it."""

from __future__ import annotations

import dataclasses

import pytest

from nemoh.model.config import load_config, parse_config
from nemoh.model.ir import OP_KINDS, Graph, build_graph
from nemoh.model.presets import PRESETS, RELEASES_DIR

SHARED = RELEASES_DIR
CONFIGS = {p.stem: load_config(p) for p in sorted(SHARED.glob("*.json"))}
CONFIGS.update({name: parse_config(p.config, name) for name, p in PRESETS.items()})


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_json_round_trip_and_text(name, dtype):
    g = build_graph(CONFIGS[name], dtype)
    assert Graph.loads(g.dumps()) == g
    text = g.to_text()
    for b in g.blocks:
        for op in b.ops:
            assert op.name in text


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_dataflow_is_well_formed(name):
    g = build_graph(CONFIGS[name], "float32")
    names = [op.name for b in g.blocks for op in b.ops]
    assert len(names) == len(set(names))
    params = {t.name for t in g.params}
    states = {s.name for s in g.states}
    defined = {"ids"}
    for b in g.blocks:
        used_params = set()
        for op in b.ops:
            assert op.kind in OP_KINDS
            assert set(op.inputs) <= defined, (op.name, op.inputs)
            assert set(op.params) <= params and set(op.state) <= states
            used_params |= set(op.params)
            defined |= set(op.outputs)
        assert used_params == {t.name for t in b.params}  # every parameter is read by some op
    assert "logits" in defined


def test_frozen():
    g = build_graph(CONFIGS["tiny-moe"], "float32")
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.dtype = "float64"
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.layers[0].ops[0].kind = "linear"


def test_every_op_kind_is_exercised_by_the_presets():
    used = {op.kind for name in PRESETS for b in build_graph(CONFIGS[name], "float32").blocks for op in b.ops}
    assert used == set(OP_KINDS)


def test_state_bytes_nano30b_by_hand():
    g = build_graph(CONFIGS["NVIDIA-Nemotron-3-Nano-30B-A3B-BF16"], "bfloat16")
    n_mamba, n_attn = g.config.pattern.count("M"), g.config.pattern.count("*")
    assert (n_mamba, n_attn) == (23, 6)
    conv = 6144 * 3 * 2  # conv_dim x (K-1) x bf16
    ssm = 64 * 64 * 128 * 4  # H x P x N x fp32 (mamba_ssm_cache_dtype)
    assert g.state_bytes_per_sequence == n_mamba * (conv + ssm)
    assert g.state_bytes_per_token == n_attn * 2 * 2 * 128 * 2  # (k, v) x KV x Dh x bf16
    assert build_graph(g.config, "float32").state_bytes_per_token == 2 * g.state_bytes_per_token


def test_dtypes_in_the_graph():
    g = build_graph(CONFIGS["tiny-moe"], "bfloat16")
    for t in g.params:
        assert t.dtype == ("float32" if t.name.endswith("e_score_correction_bias") else "bfloat16")
    assert {s.dtype for s in g.states if s.kind == "ssm"} == {"float32"}


def test_params_by_kind_sums_to_total():
    g = build_graph(CONFIGS["NVIDIA-Nemotron-3-Nano-30B-A3B-BF16"], "bfloat16")
    assert sum(g.params_by_kind().values()) == g.params_total

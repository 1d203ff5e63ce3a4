"""How the weights suite and `nemoh verify` compare a quantized linear: its exact dequantization, as a value
(-0 and +0 are the same weight: e2m1's code 8 is -0, which ggml's NVFP4 table decodes as +0.0), every other bit
exact."""

from __future__ import annotations

import torch

from nemoh.model import presets as P
from nemoh.model.config import load_config
from nemoh.model.ir import build_graph
from nemoh.model.weights import Checkpoint, unsigned_zero


def test_a_dequantized_weight_is_compared_up_to_the_sign_of_zero_only():
    path = P.cached_checkpoint("tiny-wide-nvfp4")
    ck = Checkpoint(path)
    g = build_graph(load_config(path), "float32")
    loaded = ck.load(g)
    name = next(iter(ck.formats(g)))
    w = loaded[name]
    assert bool((torch.signbit(w) & (w == 0)).any())  # the exact dequantization keeps e2m1's -0 codes
    assert ck.mismatches({name: unsigned_zero(w)}) == []  # as ggml gives them: the same weights
    moved = w.clone().view(-1)
    moved[int((moved != 0).nonzero()[0])] *= 1 + 2 ** -20
    assert ck.mismatches({name: moved.view(w.shape)}) == [name]  # any other bit still counts

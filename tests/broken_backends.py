"""Deliberately broken backends: the PyTorch executor with one bug each, from the classes of bug
real engines shipped in their Nemotron-H ports. Each overrides one seam of TorchBackend.

`BUGS` maps a factory name to (preset where the bug is observable, the suite that must FAIL it,
the layer kind it must be localised to, the ops it may be localised to). Used by
tests/sensitivity/test_sensitivity.py through `nemoh conformance --backend broken_backends:NAME`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from nemoh.backends.torch_backend import TorchBackend, ssd_prefill


class GroupTiling(TorchBackend):
    """B/C groups mapped to heads by tiling (h % G) instead of contiguous blocks (h // (H/G))."""

    def _heads(self, t, H):
        return t.repeat(1, 1, H // t.shape[2], 1)


class ConvStateAfterConv(TorchBackend):
    """The carried conv state holds the last K-1 conv *outputs* instead of its inputs."""

    def _conv(self, conv_state, xBC, w, b, K):
        y, _ = super()._conv(conv_state, xBC, w, b, K)
        full = torch.cat([conv_state, y.transpose(1, 2)], dim=-1)
        return y, full[:, :, -(K - 1):].clone()


class SsmStateDropped(TorchBackend):
    """Each prefill chunk starts the scan from zeros: the SSM state is lost between chunks."""

    def _ssd(self, x, dt, A, B, C, D, s0, chunk):
        return super()._ssd(x, dt, A, B, C, D, torch.zeros_like(s0) if x.shape[1] > 1 else s0, chunk)


class ConvStateDropped(TorchBackend):
    """Each prefill chunk starts the conv from zero padding: the conv state is lost between chunks."""

    def _conv(self, conv_state, xBC, w, b, K):
        return super()._conv(torch.zeros_like(conv_state) if xBC.shape[1] > 1 else conv_state, xBC, w, b, K)


class InitialStatesDroppedAtBatchOne(TorchBackend):
    """A prefill chunk of a batch of ONE sequence starts from zero conv and SSM states (a real engine
    took its no-initial-state path whenever the batch had one sequence): right at B > 1, and for a
    first prefill or single-token decode at any B."""

    def _conv(self, conv_state, xBC, w, b, K):
        drop = xBC.shape[0] == 1 and xBC.shape[1] > 1
        return super()._conv(torch.zeros_like(conv_state) if drop else conv_state, xBC, w, b, K)

    def _ssd(self, x, dt, A, B, C, D, s0, chunk):
        drop = x.shape[0] == 1 and x.shape[1] > 1
        return super()._ssd(x, dt, A, B, C, D, torch.zeros_like(s0) if drop else s0, chunk)


class DecayFromChunkStart(TorchBackend):
    """Decays accumulated from the start of the new chunk only: the carried state enters the chunk
    undecayed (y += C.s0 without exp(cumsum dt*A), s_end = s_chunk + s0)."""

    def _ssd(self, x, dt, A, B, C, D, s0, chunk):
        if x.shape[1] == 1:
            return super()._ssd(x, dt, A, B, C, D, s0, chunk)
        y, s = ssd_prefill(x, dt, A, B, C, D, torch.zeros_like(s0), chunk)
        return y + torch.einsum("bthn,bhpn->bthp", C, s0), s + s0


class DtClamped(TorchBackend):
    """dt clamped at time_step_min, as transformers' prefill path does."""

    def _dt(self, dt, dt_bias, a):
        assert self.graph is not None  # set by load(), before any forward
        return super()._dt(dt, dt_bias, a).clamp(min=self.graph.config.time_step_min)


class ALogTwice(TorchBackend):
    """A = -exp(A_log) applied twice (the loader stored A, the kernel exponentiated again)."""

    A: dict[int, torch.Tensor]  # set by TorchBackend.load, unannotated there

    def load(self, graph, checkpoint, *, device=None):
        super().load(graph, checkpoint, device=device)
        self.A = {i: -torch.exp(A) for i, A in self.A.items()}


class RopeAdded(TorchBackend):
    """Rotary position embeddings applied to q and k (the configs carry rope_theta; it is unused)."""

    def _qk(self, q, k):
        def rope(x, pos):
            d = x.shape[-1]
            inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
            ang = pos[:, None].double() * inv[None]  # [T, d/2]
            cos, sin = torch.cat([ang.cos()] * 2, -1).to(x.dtype), torch.cat([ang.sin()] * 2, -1).to(x.dtype)
            x1, x2 = x[..., : d // 2], x[..., d // 2:]
            return x * cos[None, :, None] + torch.cat([-x2, x1], -1) * sin[None, :, None]

        T, S = q.shape[1], k.shape[1]
        return rope(q, torch.arange(S - T, S)), rope(k, torch.arange(S))


class GatedNormUngrouped(TorchBackend):
    """The gated RMSNorm normalises all of d_inner at once instead of each group separately."""

    def _gated_norm(self, y, z, w, group_size, eps):
        return super()._gated_norm(y, z, w, y.shape[-1], eps)


class RouterBiasBf16(TorchBackend):
    """The router's correction bias rounded to bf16 (its spread is below bf16's resolution)."""

    def _router_bias(self, pre):
        return super()._router_bias(pre).to(torch.bfloat16).float()


class RoutingWeightsWithBias(TorchBackend):
    """Expert weights taken from the biased choice scores instead of the raw sigmoid scores."""

    def _route_weights(self, scores, choice, idx):
        return choice.gather(1, idx)


class SharedExpertOnLatent(TorchBackend):
    """The shared expert fed the latent round trip (fc2(fc1(h))) instead of the hidden state."""

    def _shared_input(self, h, pre):
        if pre + "fc1_latent_proj.weight" not in self.p:
            return h
        return self._linear(pre + "fc2_latent_proj", self._linear(pre + "fc1_latent_proj", h))


class PaddingNotMasked(TorchBackend):
    """Left padding not zeroed in the Mamba layers: pad tokens leak into the conv and SSM state."""

    def _pad(self, x, pad):
        return x


BUGS = {
    "GroupTiling": ("tiny-dense", "logits", "mamba", {"layers.{i}.mixer.ssd"}),
    "ConvStateAfterConv": ("tiny-dense", "prefill-chunks", "mamba", {"layers.{i}.mixer.conv1d"}),
    "SsmStateDropped": ("tiny-dense", "prefill-chunks", "mamba", {"layers.{i}.mixer.ssd"}),
    "ConvStateDropped": ("tiny-list", "prefill-chunks", "mamba", {"layers.{i}.mixer.conv1d"}),
    "InitialStatesDroppedAtBatchOne": ("tiny-dense", "prefill-chunks", "mamba", {"layers.{i}.mixer.conv1d",
                                                                              "layers.{i}.mixer.ssd"}),
    "DecayFromChunkStart": ("tiny-dense", "prefill-chunks", "mamba", {"layers.{i}.mixer.ssd"}),
    "DtClamped": ("tiny-dense", "logits", "mamba", {"layers.{i}.mixer.ssd"}),
    "ALogTwice": ("tiny-list", "logits", "mamba", {"layers.{i}.mixer.ssd"}),
    "RopeAdded": ("tiny-dense", "logits", "attention", {"layers.{i}.mixer.attention"}),
    "GatedNormUngrouped": ("tiny-dense", "logits", "mamba", {"layers.{i}.mixer.gated_norm"}),
    "RouterBiasBf16": ("tiny-moe", "logits", "moe", {"layers.{i}.mixer.router"}),
    "RoutingWeightsWithBias": ("tiny-moe", "logits", "moe", {"layers.{i}.mixer.router"}),
    "SharedExpertOnLatent": ("tiny-latent-moe", "logits", "moe", {"layers.{i}.mixer.shared_experts.up_proj"}),
    "PaddingNotMasked": ("tiny-dense", "determinism", "mamba", {"layers.{i}.mixer.in_proj",
                                                               "layers.{i}.mixer.conv1d"}),
}



# -- quantized checkpoints (issue 20): the mistakes a port of ModelOpt's FP8 / NVFP4 can make ---------------


class NibbleOrderSwapped(TorchBackend):
    """Reads element 2j from the high nibble (ModelOpt packs it in the low one)."""

    def _codes(self, name, fmt):
        if fmt == "fp8":
            return super()._codes(name, fmt)
        from nemoh.backends.torch_backend import _byte_table

        return _byte_table(nibble_low_first=False)[self.stored[name].to(torch.int64)].flatten(-2)


class BlockScaleShifted(TorchBackend):
    """Applies each e4m3 block scale to the wrong 16 elements (blocks misaligned by half a block)."""

    def _block_scales(self, v, bs):
        return v * torch.roll(bs.to(torch.float64).repeat_interleave(16, dim=-1), 8, dims=-1)


class GlobalScaleForgotten(TorchBackend):
    """Drops the per-tensor scale (NVFP4's weight_scale_2, FP8's weight_scale)."""

    def _global_scale(self, v, g):
        return v


class GlobalScaleTwice(TorchBackend):
    """Applies the per-tensor scale twice (once folded into the block scales, once after)."""

    def _global_scale(self, v, g):
        return super()._global_scale(super()._global_scale(v, g), g)


class ActivationsNotQuantized(TorchBackend):
    """Reads a W4A4 / W8A8 checkpoint as weight-only: the activations stay in high precision."""

    def _quant_act(self, weight, x, expert=None):
        return x


class ExcludedModuleQuantized(TorchBackend):
    """Ignores exclude_modules: every linear is quantized to the checkpoint's format, excluded ones too."""

    def load(self, graph, checkpoint, *, device=None):
        from nemoh.model.quant import QUANTIZABLE
        from nemoh.model.quant_writer import quantize_nvfp4
        from nemoh.oracle.ops import dequant_nvfp4

        super().load(graph, checkpoint, device=device)
        for name, w in list(self.p.items()):
            if QUANTIZABLE.fullmatch(name) and name not in self.formats and w.dim() == 2:
                self.p[name] = dequant_nvfp4(*quantize_nvfp4(w.float())).to(w.dtype)


class Fp8ReadAsE5M2(TorchBackend):
    """Reinterprets the FP8 weight bytes as float8_e5m2 instead of float8_e4m3fn."""

    def _codes(self, name, fmt):
        if fmt != "fp8":
            return super()._codes(name, fmt)
        return self.stored[name].view(torch.uint8).view(torch.float8_e5m2).to(torch.float64)


class KvCacheNotQuantized(TorchBackend):
    """Ignores kv_cache_quant_algo FP8: K and V are cached at the compute dtype (tests/core/test_quant.py plants
    it on an FP8-KV checkpoint written for the test: no preset carries one)."""

    def load(self, graph, checkpoint, *, device=None):
        super().load(graph, checkpoint, device=device)
        self.kvq = {}


QUANT_BUGS = {  # judged at float64, where the executor matches the quantized oracle to ~1e-15
    "NibbleOrderSwapped": ("tiny-wide-nvfp4", "mamba", {"layers.{i}.mixer.in_proj"}),
    "BlockScaleShifted": ("tiny-wide-nvfp4", "mamba", {"layers.{i}.mixer.in_proj"}),
    "GlobalScaleForgotten": ("tiny-wide-nvfp4", "mamba", {"layers.{i}.mixer.in_proj"}),
    "GlobalScaleTwice": ("tiny-wide-nvfp4", "mamba", {"layers.{i}.mixer.in_proj"}),
    "ActivationsNotQuantized": ("tiny-wide-nvfp4", "mamba", {"layers.{i}.mixer.in_proj"}),
    "ExcludedModuleQuantized": ("tiny-wide-nvfp4", "attention", {"layers.{i}.mixer.attention"}),
    "Fp8ReadAsE5M2": ("tiny-moe-fp8", "mamba", {"layers.{i}.mixer.in_proj"}),
}

assert math.isfinite(len(BUGS)) and F is not None  # keep the imports honest for linters


class Explodes(TorchBackend):
    """Not a numerical bug: a backend that raises mid-run must give FAIL, not crash the harness."""

    def forward(self, state, ids, mask=None, *, last_only=False, trace=None):
        if ids.shape[1] == 1:
            raise RuntimeError("kernel exploded")
        return super().forward(state, ids, mask, last_only=last_only, trace=trace)


def aborting_llamacpp():
    """llama.cpp whose worker abort()s, as a GGML_ASSERT does, in its third forward: that case must FAIL
    with the abort's message, and the cases after it run on a fresh worker."""
    from nemoh.backends.llamacpp_backend import LlamaCppBackend

    class AbortingLlamaCpp(LlamaCppBackend):
        forwards = 0

        def forward(self, state, ids, mask=None, *, last_only=False, trace=None):
            AbortingLlamaCpp.forwards += 1
            if AbortingLlamaCpp.forwards == 3:
                self.crash_for_test()
            return super().forward(state, ids, mask, last_only=last_only, trace=trace)

    return AbortingLlamaCpp()

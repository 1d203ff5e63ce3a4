"""Reading a GGUF back: tensors by nemoh parameter name, in nemoh's shapes, dequantized when quantized.

Uses the `gguf` reader of the llama.cpp tree the converter came from (llamacpp_convert.gguf_module). The name
table is llama.cpp's (gguf-py's tensor mapping for nemotron_h / nemotron_h_moe as the converter writes it);
the shape changes are the converter's: conv1d [C, 1, K] -> [C, K], A_log [H] -> ssm_a [H, 1] holding
-exp(A_log), D [H] -> [H, 1], the gated norm [d_inner] -> [G, d_inner / G], dt_bias -> ssm_dt.bias.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

TOP = {"embeddings.weight": "token_embd.weight", "norm_f.weight": "output_norm.weight",
       "lm_head.weight": "output.weight"}
LAYER = {
    "norm.weight": "attn_norm.weight",
    # Mamba2
    "mixer.in_proj.weight": "ssm_in.weight", "mixer.conv1d.weight": "ssm_conv1d.weight",
    "mixer.conv1d.bias": "ssm_conv1d.bias", "mixer.A_log": "ssm_a", "mixer.D": "ssm_d",
    "mixer.dt_bias": "ssm_dt.bias", "mixer.norm.weight": "ssm_norm.weight", "mixer.out_proj.weight": "ssm_out.weight",
    # attention
    "mixer.q_proj.weight": "attn_q.weight", "mixer.k_proj.weight": "attn_k.weight",
    "mixer.v_proj.weight": "attn_v.weight", "mixer.o_proj.weight": "attn_output.weight",
    # dense MLP
    "mixer.up_proj.weight": "ffn_up.weight", "mixer.down_proj.weight": "ffn_down.weight",
    # MoE
    "mixer.gate.weight": "ffn_gate_inp.weight", "mixer.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mixer.experts.up_proj": "ffn_up_exps.weight", "mixer.experts.down_proj": "ffn_down_exps.weight",
    "mixer.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mixer.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
    "mixer.fc1_latent_proj.weight": "ffn_latent_down.weight", "mixer.fc2_latent_proj.weight": "ffn_latent_up.weight",
}


def gguf_name(name: str) -> str:
    if name in TOP:
        return TOP[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in LAYER:
        return f"blk.{parts[1]}.{LAYER[parts[2]]}"
    raise KeyError(f"no GGUF tensor is known for nemoh parameter {name!r}")


class GgufTensors:
    def __init__(self, path: str | Path):
        from nemoh.backends.llamacpp_convert import gguf_module

        self.gguf = gguf_module()
        self.reader = self.gguf.GGUFReader(str(path))
        self.by_name = {t.name: t for t in self.reader.tensors}

    def types(self) -> dict[str, str]:
        return {n: t.tensor_type.name for n, t in self.by_name.items()}

    def raw(self, gname: str) -> torch.Tensor:
        """The tensor as stored: F32 -> float32, F16 -> float16, BF16 -> bfloat16 (bits kept), quantized ->
        dequantized float32; numpy shape order (the reverse of ggml's ne)."""
        g = self.gguf
        t = self.by_name[gname]
        shape = tuple(int(v) for v in reversed([int(x) for x in t.shape]))
        qt = t.tensor_type
        if qt == g.GGMLQuantizationType.F32:
            return torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(shape))
        if qt == g.GGMLQuantizationType.F16:
            return torch.from_numpy(np.array(t.data, dtype=np.float16).reshape(shape))
        if qt == g.GGMLQuantizationType.BF16:
            bits = np.array(t.data).view(np.uint16).reshape(shape).astype(np.int16)
            return torch.from_numpy(bits).view(torch.bfloat16)
        return torch.from_numpy(np.array(g.quants.dequantize(t.data, qt), dtype=np.float32).reshape(shape))

    def read_param(self, name: str, graph) -> torch.Tensor:
        """The tensor in nemoh's name and shape (A_log in llama.cpp's form, -exp(A_log)); a quantized tensor
        with a `.scale` companion (ModelOpt NVFP4's weight_scale_2, per expert for stacked experts) times it, as
        llama.cpp's graph multiplies it after the matmul."""
        gname = gguf_name(name)
        t = self.raw(gname)
        scale = gname.removesuffix(".weight") + ".scale"
        if gname.endswith(".weight") and scale in self.by_name and self.types()[gname] not in ("F32", "F16", "BF16"):
            s = self.raw(scale).reshape(-1)
            t = t * (s if s.numel() == 1 else s.reshape(-1, *[1] * (t.dim() - 1)))
        want = next((tuple(p.shape) for p in graph.params if p.name == name), None)
        if want is not None and tuple(t.shape) != want:
            if t.numel() != int(np.prod(want)):
                raise ValueError(f"GGUF tensor {gguf_name(name)} has shape {list(t.shape)}, "
                                 f"nemoh's {name} {list(want)}")
            t = t.reshape(want)
        return t

"""A ModelOpt FP8 / NVFP4 checkpoint (nemoh.model.quant) under llama.cpp: what its converter made of it.

Measured on nemoh's quantized presets (docs/llamacpp.md, docs/quantized-formats.md) and read in the llama.cpp
source vendored by llama-cpp-python 0.3.36 (0c1e57098): `conversion/base.py` dequantizes ModelOpt FP8 weights
(weight x weight_scale in fp32) and drops `input_scale`; it repacks NVFP4 codes and block scales into ggml's
NVFP4 type (64-element super-blocks of four 16-element blocks) and writes `weight_scale_2` and `input_scale` as
tensors, which llama.cpp loads (`src/llama-model.cpp`) but whose `input_scale` no graph applies.
"""

from __future__ import annotations


def modelopt_reading(algo: str, types: dict[str, str]) -> dict[str, str]:
    """How the GGUF llama.cpp's converter wrote from a ModelOpt checkpoint carries it (read from the GGUF)."""
    inp = [n for n in types if n.endswith(".input_scale")]
    nv = [n for n, t in types.items() if t == "NVFP4"]
    return {
        "algo": algo,
        "weights": (f"{len(nv)} tensors kept NVFP4 (codes and E4M3 block scales repacked into ggml's NVFP4), "
                    "weight_scale_2 as a '.scale' tensor multiplied after the matmul" if nv else
                    "dequantized by the converter (weight x weight_scale, fp32) into the GGUF's float type"),
        "activations": (f"{len(inp)} input_scale tensors written; llama.cpp 0c1e57098's graphs load but never "
                        "apply them (the CPU matmul quantizes activations to the weights' vec_dot type, Q8_0 for "
                        "NVFP4)" if inp else "input_scale dropped by the converter: weight-only, activations not "
                        "quantized to the format"),
    }


def modelopt_hint(checkpoint, graph) -> str:
    """nemoh's reading of an NVFP4 refusal, after the converter's own line: ggml's NVFP4 type packs 64-element
    super-blocks (QK_NVFP4 64: four 16-element blocks), and the converter reshapes every NVFP4 row into them."""
    if checkpoint.quant.fmt != "nvfp4":
        return ""
    widths = {t.name: t.shape[-1] for t in graph.params}
    odd = [n for n, f in checkpoint.formats(graph).items() if f == "nvfp4" and widths[n] % 64]
    if not odd:
        return ""
    return (f" (ggml's NVFP4 packs rows in 64-element super-blocks; {len(odd)} NVFP4 linear(s) here have rows of "
            f"width not a multiple of 64, first {odd[0]}: {widths[odd[0]]})")

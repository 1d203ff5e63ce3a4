"""Writing ModelOpt-layout quantized checkpoints (FP8, NVFP4) from an unquantized one, quantized the way
ModelOpt's post-training quantization and unified HF export do it (max calibration, per-tensor and
per-block scales); nemoh.model.quant documents the layout, docs/quantized-formats.md the sources.

  FP8 weight:    weight_scale = amax(W) / 448;  weight = e4m3(W / weight_scale)       (saturating)
  NVFP4 weight:  weight_scale_2 = amax(W) / (6 * 448)
                 weight_scale[r, b] = e4m3(max(amax(W[r, 16b:16b+16]) / (6 * weight_scale_2), 2^-9))
                                      (a zero block's scale is 1)
                 codes = e2m1(W / (weight_scale * weight_scale_2)), packed two a byte, element 2j low
  input_scale:   amax of the linear's calibration inputs / 448 (FP8) or / (6 * 448) (NVFP4); an expert's
                 over the tokens routed to it (an expert no calibration token reaches takes the layer's max)
  k_scale, v_scale (kv_cache_quant_algo FP8): amax of the calibration K / V (k_proj / v_proj outputs; no RoPE
                 in Nemotron-H) / 448, next to k_proj / v_proj whether or not those are quantized

Scales are computed in fp32 from fp32 weights, as ModelOpt does. nvidia-modelopt's own exporter is not used:
see docs/quantized-formats.md for why.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from nemoh.model.quant import QUANTIZABLE, QuantConfig, write_quant_config
from nemoh.oracle.ops import E2M1, E4M3_MAX, round_e2m1

CALIB_SEED = 20
CALIB_SHAPE = (2, 96)  # calibration batch: seeded random token ids (the presets' weights are random too)


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [out, in] -> (float8_e4m3fn [out, in], fp32 per-tensor scale [])."""
    w = w.float()
    scale = w.abs().amax() / E4M3_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale.reshape(())


def e2m1_codes(v: torch.Tensor) -> torch.Tensor:
    """fp32 [...] -> e2m1 codes uint8 (sign in bit 3, set for every negative input as ModelOpt does)."""
    mag = round_e2m1(v.double()).abs()
    table = torch.tensor(E2M1, dtype=torch.float64)
    idx = torch.searchsorted(table, mag)  # exact: mag is on the grid
    return (idx + 8 * (v < 0).to(torch.int64)).to(torch.uint8)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """codes [..., n] -> uint8 [..., n/2], element 2j in the low nibble (ModelOpt's packing)."""
    return (codes[..., 1::2] << 4) | codes[..., 0::2]


def quantize_nvfp4(w: torch.Tensor, group: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 [out, in] -> (packed uint8 [out, in/2], block scales float8_e4m3fn [out, in/16], global fp32 [])."""
    w = w.float()
    g = w.abs().amax() / (6.0 * E4M3_MAX)
    g = torch.where(g > 0, g, torch.ones_like(g))
    wb = w.unflatten(-1, (-1, group))  # [out, in/16, 16]
    bs = wb.abs().amax(-1) / (6.0 * g)
    bs = torch.where(bs == 0, torch.ones_like(bs), bs).clamp(min=2.0 ** -9).to(torch.float8_e4m3fn)
    scaled = wb / (bs.float() * g)[..., None]
    return pack_e2m1(e2m1_codes(scaled.flatten(-2))), bs, g.reshape(())


def calibrate(base_dir: Path, ids: torch.Tensor) -> dict[str, float]:
    """amax of each linear's input (hub module name -> amax) over the fp64 oracle's run on `ids`."""
    from nemoh.model.config import load_config
    from nemoh.model.ir import build_graph
    from nemoh.model.weights import Checkpoint
    from nemoh.oracle.interpreter import OracleState, run_block
    from nemoh.oracle.ops import relu2

    g = build_graph(load_config(base_dir), "float64")
    params = Checkpoint(base_dir).load(g)
    amax: dict[str, float] = {}
    st = OracleState()
    mask = torch.ones(ids.shape, dtype=torch.bool)
    vals: dict[str, torch.Tensor] = {"ids": ids}
    for block in g.blocks:
        vals = run_block(block, vals, params, st, mask, mask)
        for op in block.ops:
            if op.kind == "linear":
                mod = "lm_head" if op.params[0] == "lm_head.weight" else "backbone." + op.params[0][:-len(".weight")]
                amax[mod] = vals[op.inputs[0]].abs().max().item()
                if mod.endswith(("mixer.k_proj", "mixer.v_proj")):  # what an FP8 KV cache holds
                    amax[f"{mod}.{mod[-6]}_scale"] = vals[op.outputs[0]].abs().max().item()
            elif op.kind == "moe_experts":
                x = vals[op.inputs[0]].reshape(-1, vals[op.inputs[0]].shape[-1])
                idx = vals[op.inputs[2]]
                up, _ = (params[n] for n in op.params)
                pre = "backbone." + op.name.rsplit(".", 1)[0] + ".experts"
                for e in range(up.shape[0]):
                    rows = (idx == e).any(-1)
                    if rows.any():
                        amax[f"{pre}.{e}.up_proj"] = x[rows].abs().max().item()
                        amax[f"{pre}.{e}.down_proj"] = relu2(x[rows] @ up[e].T).abs().max().item()
                for proj in ("up_proj", "down_proj"):  # experts no calibration token reached
                    top = max(v for k, v in amax.items() if k.startswith(pre + ".") and k.endswith(proj))
                    for e in range(up.shape[0]):
                        amax.setdefault(f"{pre}.{e}.{proj}", top)
    return amax


def write_quantized(base_dir: str | Path, out_dir: str | Path, qc: QuantConfig, *, shards: int = 1) -> Path:
    """Quantize the unquantized checkpoint in `base_dir` per `qc` into `out_dir` (ModelOpt's unified HF
    layout: hf_quant_config.json, config.json's quantization_config, codes and scales per linear)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from nemoh.model.weights import canonical_name

    base, out = Path(base_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = torch.randint(4, 512, CALIB_SHAPE, generator=torch.Generator().manual_seed(CALIB_SEED))
    amax = calibrate(base, ids)
    files = sorted(base.glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for key in h.keys():
                t = h.get_tensor(key)
                name, action, _ = canonical_name(key)
                mod = key.removesuffix(".weight")
                if qc.kv_cache_algo is not None and mod.endswith(("mixer.k_proj", "mixer.v_proj")):
                    kv = f"{mod}.{mod[-6]}_scale"
                    tensors[kv] = (torch.tensor(amax[kv], dtype=torch.float32) / E4M3_MAX).reshape(())
                if name is None or not QUANTIZABLE.fullmatch(name) or qc.excluded(mod):
                    tensors[key] = t
                    continue
                a = torch.tensor(amax[mod], dtype=torch.float32)
                if qc.fmt == "fp8":
                    tensors[key], tensors[f"{mod}.weight_scale"] = quantize_fp8(t)
                    tensors[f"{mod}.input_scale"] = (a / E4M3_MAX).reshape(())
                else:
                    tensors[key], tensors[f"{mod}.weight_scale"], tensors[f"{mod}.weight_scale_2"] = quantize_nvfp4(t)
                    tensors[f"{mod}.input_scale"] = (a / (6.0 * E4M3_MAX)).reshape(())
    for stale in (*out.glob("model*.safetensors"), out / "model.safetensors.index.json"):
        stale.unlink(missing_ok=True)
    keys = sorted(tensors)
    if shards <= 1:
        save_file({k: tensors[k].contiguous() for k in keys}, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: tensors[k].contiguous() for k in keys[i::shards]}
            save_file(part, str(out / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    config["quantization_config"] = {"quant_method": "modelopt", "quant_algo": qc.algo,
                                     "kv_cache_quant_algo": qc.kv_cache_algo, "group_size": qc.group_size,
                                     "exclude_modules": list(qc.exclude_modules),
                                     "producer": {"name": "nemoh", "version": "quant-writer-1"}}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    write_quant_config(out, qc)
    for f in base.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copyfile(f, out / f.name)
    return out

"""What `nemoh inspect` says about a quantized checkpoint or preset (its own module: it reads the presets, which
import nemoh.model.quant)."""

from __future__ import annotations

import re
from pathlib import Path

from nemoh.model.quant import QUANTIZABLE, quant_config_of, read_quant_config, stored_bytes


def quant_summary(model: str, g) -> dict | None:
    """What `inspect` says about a quantized checkpoint (None for an unquantized one): algorithm, group size,
    exclude_modules, KV-cache format, which linears stay unquantized and the bytes per parameter."""
    from nemoh import dtypes as dt
    from nemoh.model.presets import known_presets

    p = Path(model)
    if p.exists():
        qc = read_quant_config(p if p.is_dir() else p.parent)
    elif model in known_presets():
        qc = quant_config_of(known_presets()[model].config, f"preset {model}")
    else:
        qc = None
    if qc is None:
        return None
    fdt = g.config.torch_dtype
    size = dt.ITEMSIZE.get(fdt, 2)
    total = qbytes = qparams = 0.0
    quantized, kept = [], []
    for t in g.params:
        stacked = bool(re.search(r"experts\.(up|down)_proj$", t.name))
        fmt = qc.format_of(t.name, t.shape[0] if stacked else None)
        if fmt is None:
            total += t.numel * (4 if t.dtype == "float32" and t.buffer else size)
            if QUANTIZABLE.fullmatch(t.name):
                kept.append(t.name)
            continue
        b = stored_bytes(fmt, t.numel, t.shape[0] if stacked else 1)
        total, qbytes, qparams = total + b, qbytes + b, qparams + t.numel
        quantized.append(t.name)
    n = sum(t.numel for t in g.params)
    return {**qc.summary(), "quantized_linears": len(quantized), "quantized_params": int(qparams),
            "quantized_bytes_per_param": qbytes / qparams if qparams else 0.0, "bytes_per_param": total / n,
            "float_dtype": fdt, "unquantized_linears": kept}

"""Checkpoint (hub layout) -> GGUF, with llama.cpp's own converter, cached by checkpoint hash and type.

The converter is the `convert_hf_to_gguf.py` (+ `conversion/`, `gguf-py/`) of the llama.cpp that the
installed llama-cpp-python vendors. The installed wheel does not ship it, so it is taken from the
source distribution of exactly the installed version:

1. `$NEMOH_LLAMACPP_SRC`: a llama.cpp source tree (holding convert_hf_to_gguf.py), or an unpacked
   llama-cpp-python sdist (its `vendor/llama.cpp` is used), or the sdist `.tar.gz` itself;
2. the cache `$NEMOH_CACHE/llamacpp-src/<version>/` (then ~/.cache/nemoh/llamacpp-src/<version>/), filled on first use
   from (1) or by `pip download --no-deps --no-binary :all: llama-cpp-python==<version>` (the package
   registry through its ordinary client; afterwards everything runs offline).

The converter runs in a subprocess with the vendored `gguf-py` first on its path (the PyPI `gguf`
package may lag behind the converter). Two adaptations, both recorded in docs/llamacpp.md:

- the converter's Granite-hybrid validation asserts `d_inner % d_head == 0` with `d_head` defaulting to
  64 (Granite's head size), which rejects every NemotronH model whose H*P is not a multiple of 64
  (all tiny presets). The conversion reads a config overlay that adds `mamba_d_head = mamba_head_dim`
  (only that assertion reads it);
- the tiny presets' byte-level BPE tokenizer is not in the converter's table of known pre-tokenizers
  (`get_vocab_base_pre` raises). nemoh drives llama.cpp on token ids, never on text, so an unknown
  pre-tokenizer is written as `default`; the token list and ids are the checkpoint's, unchanged.

Quantized types (Q8_0, Q4_K_M, ...) are made from the F32 GGUF by llama.cpp's `llama_model_quantize`,
run in the backend's worker process (see llamacpp_worker.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

#: GGUF file types the converter writes itself
CONVERTER_TYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16"}
#: llama_ftype values of llama.h for the quantized types a user can pick (llama_model_quantize)
QUANT_FTYPES = {
    "Q8_0": 7, "Q4_0": 2, "Q4_1": 3, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12,
    "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18,
}
WEIGHT_TYPES = (*CONVERTER_TYPES, *QUANT_FTYPES)
#: the llama.cpp commit each llama-cpp-python release vendors (its CHANGELOG: "update llama.cpp to ...")
KNOWN_COMMITS = {"0.3.36": "0c1e57098bba43ac29e6e3b677cdceebdd22334f"}


class ConversionError(RuntimeError):
    """The conversion failed; `last_line` is the converter's own last line (its exception), when it ran."""

    def __init__(self, message: str, last_line: str = ""):
        super().__init__(message)
        self.last_line = last_line or (message.strip().splitlines() or [""])[-1]


def cache_root() -> Path:
    base = os.environ.get("NEMOH_CACHE")
    return Path(base) if base else Path.home() / ".cache" / "nemoh"


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:  # importable without its metadata (LLAMA_CPP_LIB_PATH / a source checkout)
        import llama_cpp

        return llama_cpp.__version__


def _llama_tree(root: Path) -> Path | None:
    for cand in (root, root / "vendor" / "llama.cpp"):
        if (cand / "convert_hf_to_gguf.py").is_file() and (cand / "gguf-py").is_dir():
            return cand
    return None


def _extract_sdist(tar_path: Path, dest: Path) -> Path:
    """Unpack only what conversion needs (converter, conversion/, gguf-py/, CHANGELOG) from an sdist."""
    tmp = Path(tempfile.mkdtemp(prefix="nemoh-llamacpp-src-", dir=dest.parent))
    with tarfile.open(tar_path) as tf:
        members = [m for m in tf.getmembers() if (m.isfile() or m.isdir()) and (
            "/vendor/llama.cpp/conversion/" in m.name or "/vendor/llama.cpp/gguf-py/" in m.name
            or m.name.endswith(("/vendor/llama.cpp/convert_hf_to_gguf.py", "/CHANGELOG.md"))
            and m.name.count("/") <= 3)]
        tf.extractall(tmp, members=members, filter="data")
    tops = [p for p in tmp.iterdir() if p.is_dir()]
    if len(tops) != 1 or _llama_tree(tops[0]) is None:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConversionError(f"{tar_path}: not a llama-cpp-python source distribution with vendor/llama.cpp")
    if dest.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tops[0].rename(dest)
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def llama_source(fetch: bool = True) -> Path:
    """The llama.cpp tree holding convert_hf_to_gguf.py for the installed llama-cpp-python."""
    ver = package_version()
    env = os.environ.get("NEMOH_LLAMACPP_SRC")
    dest = cache_root() / "llamacpp-src" / ver
    if env:
        p = Path(env)
        if p.is_file() and p.name.endswith((".tar.gz", ".tgz")):
            dest.parent.mkdir(parents=True, exist_ok=True)
            return _llama_tree(_extract_sdist(p, dest)) or dest
        tree = _llama_tree(p)
        if tree is None:
            raise ConversionError(f"NEMOH_LLAMACPP_SRC={env}: no convert_hf_to_gguf.py and gguf-py/ there "
                                  "(give a llama.cpp tree, an unpacked llama-cpp-python sdist or its .tar.gz)")
        return tree
    # the cache of this run, then the user's default cache (tests run with a private NEMOH_CACHE)
    for cand in (dest, Path.home() / ".cache" / "nemoh" / "llamacpp-src" / ver):
        tree = _llama_tree(cand)
        if tree is not None:
            return tree
    if not fetch:
        raise ConversionError(f"llama.cpp's converter for llama-cpp-python {ver} is not cached in {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as d:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={ver}", "-d", d]
        r = subprocess.run(cmd, capture_output=True, text=True)
        tars = list(Path(d).glob("*.tar.gz"))
        if r.returncode or not tars:
            raise ConversionError(f"cannot get llama.cpp's converter: `{' '.join(cmd)}` failed "
                                  f"({(r.stderr or r.stdout).strip().splitlines()[-1:]}); set NEMOH_LLAMACPP_SRC "
                                  "to a llama.cpp source tree or the llama-cpp-python sdist")
        _extract_sdist(tars[0], dest)
    tree = _llama_tree(dest)
    if tree is None:
        raise ConversionError(f"{dest}: the sdist holds no convert_hf_to_gguf.py")
    return tree


def llama_commit() -> str:
    """The llama.cpp commit vendored by the installed llama-cpp-python ("unknown" if not recorded)."""
    ver = package_version()
    if ver in KNOWN_COMMITS:
        return KNOWN_COMMITS[ver]
    for p in (cache_root() / "llamacpp-src" / ver / "CHANGELOG.md",):
        if p.is_file():
            text = p.read_text(errors="replace")
            sec = text.split(f"## [{ver}]", 1)[-1]
            for line in sec.splitlines():
                if "llama.cpp@" in line:
                    return line.split("llama.cpp@", 1)[1].split()[0]
    return "unknown"


def checkpoint_hash(path: Path) -> str:
    """sha256 over every file the conversion can read (their relative names and bytes), first 16 hex
    digits. `convert` hands the converter every entry of the directory (config.json, the safetensors,
    and the tokenizer files: tokenizer.json, tokenizer_config.json, vocab, merges, special tokens,
    chat template, generation config), so all of them are in the key: a new vocabulary is a new GGUF.
    Hidden entries (a hub download's `.cache/`) are left out; the converter reads none of them."""
    h = hashlib.sha256()
    files = sorted(f for f in path.rglob("*")
                   if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts))
    for f in files:
        h.update(f.relative_to(path).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()[:16]


def gguf_dir() -> Path:
    return cache_root() / "gguf"


#: bumped when the converter adaptations change (part of the cache key)
ADAPTATIONS = "a3"


def _as_is() -> bool:
    return os.environ.get("NEMOH_LLAMACPP_CONVERTER_AS_IS", "") not in ("", "0")


def gguf_path(checkpoint_dir: Path, wtype: str) -> Path:
    conv = "asis" if _as_is() else ADAPTATIONS
    return gguf_dir() / f"{checkpoint_dir.name}-{checkpoint_hash(checkpoint_dir)}-{package_version()}-{conv}" \
        / f"model-{wtype}.gguf"


_DRIVER = r"""
import sys
import conversion.base as base
_orig = base.TextModel.get_vocab_base_pre
def _pre(self, tokenizer):
    try:
        return _orig(self, tokenizer)
    except NotImplementedError:
        print("nemoh: BPE pre-tokenizer not in llama.cpp's table; written as 'default' "
              "(nemoh drives llama.cpp on token ids)", file=sys.stderr)
        return "default"
base.TextModel.get_vocab_base_pre = _pre
if not AS_IS:
    # transformers 5's AutoConfig.to_dict() carries NemotronHConfig's MoE defaults (num_experts_per_tok, ...)
    # into every config, and the converter takes their presence for a MoE model: a dense model (no E / moe
    # layer) is then written as nemotron_h_moe with every n_ff = 0 and llama.cpp fails to load it; with the
    # MoE keys gone, n_group / topk_group still become expert_group_count = 1 and llama.cpp aborts on
    # GGML_ASSERT(hparams.n_expert_groups == 0). Drop them all when the layer pattern has no MoE layer;
    # and count list-form "mlp" layers as MLP layers (the converter counts only "moe" in list form).
    _load = base.ModelBase.load_hparams
    def _hparams(dir_model, is_mistral_format):
        h = _load(dir_model, is_mistral_format)
        pat = h.get("hybrid_override_pattern") or h.get("layers_block_type")
        if pat is not None and "E" not in pat and "moe" not in pat:
            for k in ("num_experts_per_tok", "n_routed_experts", "moe_intermediate_size",
                      "moe_shared_expert_intermediate_size", "moe_latent_size", "n_group", "topk_group"):
                if h.pop(k, None) is not None:
                    print(f"nemoh: dense pattern {pat!r}: dropped the MoE default {k} (converter adaptation)",
                          file=sys.stderr)
        return h
    base.ModelBase.load_hparams = staticmethod(_hparams)
    import conversion.nemotron as nem
    _init = nem.NemotronHModel.__init__
    def _init2(self, *a, **k):
        _init(self, *a, **k)
        pat = self.hparams.get("layers_block_type")
        if not self.is_moe and isinstance(pat, list) and not self._mlp_layers:
            self._mlp_layers = [i for i, v in enumerate(pat) if v == "mlp"]
            if self._mlp_layers:
                print(f"nemoh: list-form pattern: layers {self._mlp_layers} ('mlp') counted as MLP layers "
                      "(converter adaptation)", file=sys.stderr)
    nem.NemotronHModel.__init__ = _init2
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[1:]]
import runpy
runpy.run_path(CONVERTER, run_name="__main__")
"""


def convert(checkpoint_dir: Path, wtype: str, out: Path) -> Path:
    """Run llama.cpp's converter on `checkpoint_dir` (F32/F16/BF16) writing `out`."""
    tree = llama_source()
    with tempfile.TemporaryDirectory(prefix="nemoh-gguf-") as d:
        ov = Path(d) / "model"
        ov.mkdir()
        for f in checkpoint_dir.iterdir():
            if f.name != "config.json":
                (ov / f.name).symlink_to(f.resolve())
        cfg = json.loads((checkpoint_dir / "config.json").read_text())
        if "mamba_head_dim" in cfg and "mamba_d_head" not in cfg:
            cfg["mamba_d_head"] = cfg["mamba_head_dim"]  # only the converter's d_inner % d_head check reads it
        (ov / "config.json").write_text(json.dumps(cfg))
        tmp_out = out.with_suffix(".partial")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), str(tree / "gguf-py")]),
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", NO_LOCAL_GGUF="")
        code = _DRIVER.replace("CONVERTER", repr(str(tree / "convert_hf_to_gguf.py"))).replace(
            "AS_IS", repr(_as_is()))
        cmd = [sys.executable, "-c", code, str(ov), "--outfile", str(tmp_out), "--outtype", CONVERTER_TYPES[wtype]]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=d, env=env)
        if r.returncode or not tmp_out.is_file():
            lines = [ln for ln in (r.stderr or r.stdout).strip().splitlines() if ln.strip()]
            raise ConversionError(f"llama.cpp's convert_hf_to_gguf.py failed on {checkpoint_dir} "
                                  f"({wtype}):\n" + "\n".join(lines[-6:]), (lines[-1:] or [""])[0].strip())
        tmp_out.replace(out)
        (out.parent / f"convert-{wtype}.log").write_text(r.stderr)
    return out


def ensure_gguf(checkpoint_dir: Path, wtype: str, quantize=None) -> Path:
    """The cached GGUF of `checkpoint_dir` at `wtype`, converting (and quantizing, through the callable
    `quantize(src, dst, ftype)`) on first use."""
    wtype = wtype.upper()
    if wtype not in WEIGHT_TYPES:
        raise ValueError(f"unknown GGUF weight type {wtype!r}; known: {', '.join(WEIGHT_TYPES)}")
    out = gguf_path(checkpoint_dir, wtype)
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    if wtype in CONVERTER_TYPES:
        return convert(checkpoint_dir, wtype, out)
    if quantize is None:
        raise ConversionError(f"{wtype} needs llama_model_quantize (the backend's worker)")
    src = ensure_gguf(checkpoint_dir, "F32")
    tmp = out.with_suffix(".partial")
    quantize(str(src), str(tmp), QUANT_FTYPES[wtype])
    tmp.replace(out)
    return out


def gguf_module(tree: Path | None = None):
    """The vendored gguf-py (the reader matching the converter), imported in this process."""
    tree = tree or llama_source()
    p = str(tree / "gguf-py")
    mod = sys.modules.get("gguf")
    if mod is not None and not str(getattr(mod, "__file__", "")).startswith(p):
        # a different gguf is already imported: use it (its reader handles every GGUF version 3 file)
        return mod
    if p not in sys.path:
        sys.path.insert(0, p)
    import gguf

    return gguf

"""Checkpoint loading (nemoh.model.weights): layouts, laziness, dtype casts, bit-exactness, and the
one-line errors for every kind of broken checkpoint, directly and through the CLI.

Why one file: every test here writes or breaks a checkpoint through the same fixtures and helpers
(a written preset, its shards and index, byte-level header surgery); split, they would be imported
across files or written twice.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import struct
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")

from safetensors.torch import load_file, save_file  # noqa: E402

from nemoh.cli import main as cli_main  # noqa: E402
from nemoh.errors import WeightsError  # noqa: E402
from nemoh.model import presets as P  # noqa: E402
from nemoh.model.config import load_config  # noqa: E402
from nemoh.model.ir import build_graph  # noqa: E402
from nemoh.model.weights import Checkpoint  # noqa: E402

MOE = ("tiny-moe", "tiny-latent-moe")
SHARD_SIZE = "50KB"  # tiny-moe: ~19 shards, each layer's experts spread over several of them
INDEX = "model.safetensors.index.json"


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """Every checkpoint these tests read, written once. Tests copy before modifying."""
    root = tmp_path_factory.mktemp("weights")
    out: dict[str, Path] = {}
    for name in ("tiny-dense", *MOE):
        out[name] = P.write_checkpoint(name, root / name)
        out[f"{name}/sharded"] = P.write_checkpoint(name, root / f"{name}-sharded", max_shard_size=SHARD_SIZE)
    for name in MOE:
        out[f"{name}/memory"] = P.write_in_memory_layout(out[name], root / f"{name}-memory")
        out[f"{name}/spread"] = spread_shards(out[name], root / f"{name}-spread")
    return out


def spread_shards(src: Path, dst: Path, n: int = 5) -> Path:
    """Re-shard a single-file checkpoint so that each layer's experts are scattered over `n` shards,
    later experts in earlier files (transformers keeps one stacked tensor in one shard; releases don't)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = load_file(src / "model.safetensors")
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for i, (key, t) in enumerate(sorted(tensors.items())):
        m = re.search(r"experts\.(\d+)\.", key)
        shards[(-int(m[1]) if m else i) % n][key] = t
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, dst / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    (dst / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return dst


def clone(src: Path, tmp_path: Path, name: str = "ck") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def rewrite(path: Path, edit) -> None:
    """Load a safetensors file, let `edit` change the dict in place, write it back."""
    tensors = dict(load_file(path))
    edit(tensors)
    tensors = {k: v.clone().contiguous() for k, v in tensors.items()}  # no shared storage for save_file
    tmp = path.with_suffix(".tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)


def edit_header(path: Path, edit) -> None:
    """Change the JSON header in place, keeping the 8-byte header-length field (and the data) as is."""
    b = path.read_bytes()
    (n,) = struct.unpack("<Q", b[:8])
    header = json.loads(b[8 : 8 + n])
    assert json.dumps(header, separators=(",", ":")).ljust(n).encode() == b[8 : 8 + n]  # we can re-serialise
    edit(header)
    new = json.dumps(header, separators=(",", ":"))
    assert len(new) <= n, "edited header no longer fits; pick a shorter edit"
    path.write_bytes(b[:8] + new.ljust(n).encode() + b[8 + n :])


def graph(path: Path, dtype: str = "float32"):
    return build_graph(load_config(path), dtype)


def load(path: Path, dtype: str = "float32") -> dict[str, torch.Tensor]:
    return Checkpoint(path).load(graph(path, dtype))


def file_tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def weights_error(path: Path, dtype: str = "float32") -> str:
    """The message of the WeightsError raised while indexing and loading `path`."""
    with pytest.raises(WeightsError) as ei:
        Checkpoint(path).load(graph(path, dtype))
    msg = str(ei.value)
    assert "\n" not in msg, msg
    return msg


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_cli_error(capsys, model: Path, *needles: str) -> str:
    code, out, err = run_cli(capsys, "generate", str(model), "--prompt", "The cat", "-n", "2")
    assert code == 2, (code, out, err)
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith("nemoh: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, err)
    assert out == ""
    return lines[0]


# ---------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("name", ["tiny-dense", *MOE])
def test_sharded_loads_identical_to_single_file(ckpts, name):
    single, sharded = ckpts[name], ckpts[f"{name}/sharded"]
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) >= 3 and (sharded / INDEX).is_file()
    assert not (sharded / "model.safetensors").exists()
    assert_same(load(single), load(sharded))
    assert_same(load(single, "bfloat16"), load(sharded, "bfloat16"))


@pytest.mark.parametrize("name", MOE)
def test_experts_scattered_over_shards_load_identical(ckpts, name):
    spread = ckpts[f"{name}/spread"]
    ck = Checkpoint(spread)
    stacked = [es for n, es in ck.entries.items() if n.endswith("experts.up_proj")]
    assert stacked and all(len({e.file for e in es}) > 1 for es in stacked)
    assert_same(load(ckpts[name]), ck.load(graph(spread)))


@pytest.mark.parametrize("name", MOE)
def test_in_memory_layout_loads_identical_to_hub_layout(ckpts, name):
    mem = ckpts[f"{name}/memory"]
    keys = list(file_tensors(mem))
    assert keys and all(k.startswith(("model.", "lm_head.")) for k in keys)
    assert any(re.fullmatch(r"model\.layers\.\d+\.mixer\.experts\.up_proj", k) for k in keys)
    assert not any(re.search(r"experts\.\d+\.", k) for k in keys)
    assert_same(load(ckpts[name]), load(mem))
    assert_same(load(ckpts[name], "bfloat16"), load(mem, "bfloat16"))


@pytest.mark.parametrize("layout", ["hub", "memory", "sharded", "spread"])
@pytest.mark.parametrize("name", MOE)
def test_stacked_experts_are_in_numeric_expert_order(ckpts, name, layout):
    hub = file_tensors(ckpts[name])
    path = ckpts[name if layout == "hub" else f"{name}/{layout}"]
    ck = Checkpoint(path)
    E = P.PRESETS[name].config["n_routed_experts"]
    stacked = [t.name for t in graph(path).params if ".experts." in t.name and "shared" not in t.name]
    assert stacked
    for canon in stacked:
        layer, proj = re.fullmatch(r"layers\.(\d+)\.mixer\.experts\.(up_proj|down_proj)", canon).groups()
        per_expert = [hub[f"backbone.layers.{layer}.mixer.experts.{e}.{proj}.weight"] for e in range(E)]
        got = ck.read(canon)
        assert got.dtype == torch.float32
        assert torch.equal(got, torch.stack(per_expert)), canon
        if E > 10:  # expert 10 sorts before expert 2 as a string: lexical order must give a different stack
            lexical = sorted(range(E), key=str)
            assert not torch.equal(got, torch.stack([per_expert[e] for e in lexical]))


def test_mtp_tensors_are_ignored_with_notice(ckpts, tmp_path):
    assert Checkpoint(ckpts["tiny-moe"]).notices == []
    d = clone(ckpts["tiny-moe"], tmp_path)

    def add_mtp(t):
        t["mtp.layers.0.norm.weight"] = torch.ones(64)
        t["mtp.layers.0.mixer.in_proj.weight"] = torch.zeros(3, 5)  # no shape a graph would accept

    rewrite(d / "model.safetensors", add_mtp)
    ck = Checkpoint(d)
    assert any("mtp" in n for n in ck.notices), ck.notices
    assert not any("mtp" in n for n in ck.entries)
    assert_same(load(ckpts["tiny-moe"]), ck.load(graph(d)))


# ---------------------------------------------------------------------------------- laziness


class _SpyHandle:
    def __init__(self, real, log: list):
        self._real, self._log = real, log

    def keys(self):
        self._log.append(("keys", None))
        return self._real.keys()

    def get_slice(self, key):
        self._log.append(("get_slice", key))
        return self._real.get_slice(key)

    def get_tensor(self, key):
        self._log.append(("get_tensor", key))
        return self._real.get_tensor(key)

    def __getattr__(self, attr):
        self._log.append((attr, None))
        return getattr(self._real, attr)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._real.__exit__(*exc)


@pytest.fixture
def spy_log(monkeypatch) -> list:
    log: list = []
    real_open = safetensors.safe_open

    def spy_open(*args, **kwargs):
        return _SpyHandle(real_open(*args, **kwargs), log)

    monkeypatch.setattr(safetensors, "safe_open", spy_open)
    return log


@pytest.mark.parametrize("which", ["tiny-latent-moe", "tiny-latent-moe/spread"])
def test_checkpoint_is_lazy(ckpts, spy_log, which):
    path = ckpts[which]
    ck = Checkpoint(path)
    assert spy_log, "the spy saw nothing: Checkpoint no longer opens files through safetensors.safe_open"
    assert {call for call, _ in spy_log} == {"keys"}  # indexing: names only, no data, not even shapes

    spy_log.clear()
    g = graph(path)
    ck.validate(g)
    assert {call for call, _ in spy_log} <= {"get_slice"}  # shapes from the header only

    spy_log.clear()
    name = "layers.1.mixer.experts.up_proj"
    out = ck.load(g, names=[name])
    assert list(out) == [name]
    read = sorted(k for call, k in spy_log if call == "get_tensor")
    E = P.PRESETS["tiny-latent-moe"].config["n_routed_experts"]
    assert read == sorted(f"backbone.layers.1.mixer.experts.{e}.up_proj.weight" for e in range(E))


# ---------------------------------------------------------------------------------- dtypes, bit equality


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-latent-moe/memory"])
def test_bfloat16_cast_keeps_router_bias_float32(ckpts, name):
    path = ckpts[name]
    ck = Checkpoint(path)
    g = graph(path, "bfloat16")
    loaded = ck.load(g)
    assert sorted(loaded) == sorted(t.name for t in g.params)
    biases = [n for n in loaded if n.endswith("e_score_correction_bias")]
    assert biases
    for n, t in loaded.items():
        ref = ck.read(n)
        assert ref.dtype == torch.float32  # read() does not cast
        if n in biases:
            assert t.dtype == torch.float32, n
            assert torch.equal(t, ref), n  # not rounded through bf16 on the way
            assert not torch.equal(t, ref.to(torch.bfloat16).float())  # (so the check above means something)
        else:
            assert t.dtype == torch.bfloat16, n
            assert torch.equal(t, ref.to(torch.bfloat16)), n
    assert ck.mismatches(loaded) == []


def _flip_bit(t: torch.Tensor, flat_index: int = 5, bit: int = 0) -> None:
    ints = {4: torch.int32, 2: torch.int16}[t.element_size()]
    v = t.view(ints).view(-1)
    v[flat_index] ^= 1 << bit


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mismatches_names_exactly_the_flipped_tensor(ckpts, dtype):
    path = ckpts["tiny-moe"]
    ck = Checkpoint(path)
    loaded = ck.load(graph(path, dtype))
    assert ck.mismatches(loaded) == []
    for name in ("layers.0.mixer.in_proj.weight", "layers.1.mixer.experts.down_proj",
                 "layers.1.mixer.gate.e_score_correction_bias"):
        copy = {k: v.clone() for k, v in loaded.items()}
        _flip_bit(copy[name])  # lowest mantissa bit of one element
        assert ck.mismatches(copy) == [name]


def test_mismatches_compares_bits_not_values(ckpts, tmp_path):
    """-0.0 == 0.0 and NaN != NaN as numbers; as stored weights, the opposite."""
    d = clone(ckpts["tiny-dense"], tmp_path)

    def specials(t):
        t["backbone.layers.0.mixer.D"][:2] = torch.tensor([0.0, float("nan")])

    rewrite(d / "model.safetensors", specials)
    ck = Checkpoint(d)
    loaded = ck.load(graph(d), names=["layers.0.mixer.D"])
    assert ck.mismatches(loaded) == []  # NaN loaded as NaN (same bits) is not a mismatch
    copy = {k: v.clone() for k, v in loaded.items()}
    copy["layers.0.mixer.D"][0] = -0.0
    assert ck.mismatches(copy) == ["layers.0.mixer.D"]


def test_loaded_tensors_do_not_alias_the_checkpoint(ckpts):
    path = ckpts["tiny-dense"]
    key, name = "backbone.layers.0.mixer.D", "layers.0.mixer.D"
    on_disk = load_file(path / "model.safetensors")[key]
    ck = Checkpoint(path)
    loaded = ck.load(graph(path, "float32"))
    loaded[name].add_(1.0)  # e.g. a backend preprocessing its parameters in place
    assert ck.mismatches(loaded) == [name]
    assert torch.equal(ck.read(name), on_disk)


# ---------------------------------------------------------------------------------- errors


def test_missing_tensor(ckpts, tmp_path, capsys):
    d = clone(ckpts["tiny-dense"], tmp_path)
    rewrite(d / "model.safetensors", lambda t: t.pop("backbone.layers.2.mixer.D"))
    msg = weights_error(d)
    assert "layers.2.mixer.D" in msg and str(d) in msg
    assert_cli_error(capsys, d, "layers.2.mixer.D")


def test_unexpected_tensor_under_known_prefix(ckpts, tmp_path):
    d = clone(ckpts["tiny-dense"], tmp_path)
    rewrite(d / "model.safetensors", lambda t: t.update({"backbone.layers.0.mixer.bogus.weight": torch.ones(3)}))
    msg = weights_error(d)
    assert "backbone.layers.0.mixer.bogus.weight" in msg and str(d / "model.safetensors") in msg


def test_unexpected_tensor_outside_the_name_table(ckpts, tmp_path):
    d = clone(ckpts["tiny-dense"], tmp_path)
    rewrite(d / "model.safetensors", lambda t: t.update({"vision_tower.proj.weight": torch.ones(3)}))
    with pytest.raises(WeightsError) as ei:
        Checkpoint(d)
    assert "vision_tower.proj.weight" in str(ei.value) and str(d / "model.safetensors") in str(ei.value)


def test_misshaped_tensor(ckpts, tmp_path, capsys):
    d = clone(ckpts["tiny-dense"], tmp_path)
    key = "backbone.layers.0.mixer.in_proj.weight"

    def cut(t):
        t[key] = t[key][:-1].contiguous()

    rewrite(d / "model.safetensors", cut)
    msg = weights_error(d)
    assert key in msg and str(d / "model.safetensors") in msg
    shape = list(load_file(ckpts["tiny-dense"] / "model.safetensors")[key].shape)
    assert str(shape) in msg  # the expected shape
    assert_cli_error(capsys, d, key)


def test_misshaped_transposed_tensor(ckpts, tmp_path):
    """Same number of elements, wrong shape: must still be caught."""
    d = clone(ckpts["tiny-dense"], tmp_path)
    key = "backbone.layers.1.mixer.up_proj.weight"
    rewrite(d / "model.safetensors", lambda t: t.update({key: t[key].t().contiguous()}))
    assert key in weights_error(d)


@pytest.mark.parametrize("layout", ["hub", "memory"])
def test_misshaped_expert(ckpts, tmp_path, layout):
    src = ckpts["tiny-moe" if layout == "hub" else "tiny-moe/memory"]
    d = clone(src, tmp_path)
    key = ("backbone.layers.1.mixer.experts.5.up_proj.weight" if layout == "hub"
           else "model.layers.1.mixer.experts.up_proj")
    rewrite(d / "model.safetensors", lambda t: t.update({key: t[key][..., :-1].contiguous()}))
    msg = weights_error(d)
    assert key in msg and str(d / "model.safetensors") in msg


@pytest.mark.parametrize("name,expert", [("tiny-moe", 3), ("tiny-latent-moe", 10), ("tiny-latent-moe", 15)])
def test_missing_expert(ckpts, tmp_path, name, expert):
    d = clone(ckpts[name], tmp_path)
    rewrite(d / "model.safetensors", lambda t: t.pop(f"backbone.layers.1.mixer.experts.{expert}.down_proj.weight"))
    msg = weights_error(d)
    assert "layers.1.mixer.experts.down_proj" in msg and f"[{expert}]" in msg
    assert str(d / "model.safetensors") in msg


def test_expert_index_out_of_range(ckpts, tmp_path):
    d = clone(ckpts["tiny-moe"], tmp_path)
    k = "backbone.layers.4.mixer.experts.{}.up_proj.weight"
    rewrite(d / "model.safetensors", lambda t: t.update({k.format(8): t[k.format(7)].clone()}))
    msg = weights_error(d)
    assert "layers.4.mixer.experts.up_proj" in msg and "8" in msg


def test_expert_tensor_in_both_layouts(ckpts, tmp_path):
    d = clone(ckpts["tiny-moe"], tmp_path)

    def add_stacked(t):
        t["backbone.layers.1.mixer.experts.up_proj"] = torch.stack(
            [t[f"backbone.layers.1.mixer.experts.{e}.up_proj.weight"] for e in range(8)])

    rewrite(d / "model.safetensors", add_stacked)
    assert "layers.1.mixer.experts.up_proj" in weights_error(d)


def test_duplicate_expert_message(ckpts, tmp_path):
    d = clone(ckpts["tiny-moe"], tmp_path)
    rewrite(d / "model.safetensors", lambda t: t.update(
        {"model.layers.1.mixer.experts.3.up_proj.weight": t["backbone.layers.1.mixer.experts.3.up_proj.weight"]}))
    msg = weights_error(d)
    assert "layers.1.mixer.experts" in msg
    assert "out of range" not in msg and re.search(r"twice|duplicate", msg), msg


def test_same_tensor_in_both_prefixes(ckpts, tmp_path):
    d = clone(ckpts["tiny-dense"], tmp_path)
    rewrite(d / "model.safetensors", lambda t: t.update({"model.norm_f.weight": t["backbone.norm_f.weight"]}))
    msg = weights_error(d)
    assert "backbone.norm_f.weight" in msg and "model.norm_f.weight" in msg


def _shard_of(path: Path, key: str) -> Path:
    return path / json.loads((path / INDEX).read_text())["weight_map"][key]


def test_duplicate_tensor_across_shards(ckpts, tmp_path):
    d = clone(ckpts["tiny-moe/sharded"], tmp_path)
    key = "backbone.norm_f.weight"
    home = _shard_of(d, key)
    other = next(f for f in sorted(d.glob("*.safetensors")) if f != home)
    value = load_file(home)[key]
    rewrite(other, lambda t: t.update({key: value}))
    with pytest.raises(WeightsError) as ei:
        Checkpoint(d)
    msg = str(ei.value)
    assert key in msg and home.name in msg and other.name in msg


def test_duplicate_tensor_across_unindexed_files(ckpts, tmp_path):
    d = clone(ckpts["tiny-dense"], tmp_path)
    key = "backbone.layers.3.mixer.o_proj.weight"
    save_file({key: load_file(d / "model.safetensors")[key]}, d / "extra.safetensors")
    with pytest.raises(WeightsError) as ei:
        Checkpoint(d)
    assert key in str(ei.value) and "extra.safetensors" in str(ei.value) and "model.safetensors" in str(ei.value)


def test_index_lists_missing_shard(ckpts, tmp_path):
    d = clone(ckpts["tiny-moe/sharded"], tmp_path)
    gone = _shard_of(d, "backbone.layers.1.mixer.experts.5.up_proj.weight")
    gone.unlink()
    with pytest.raises(WeightsError) as ei:
        Checkpoint(d)
    assert gone.name in str(ei.value) and INDEX in str(ei.value)


def test_index_lists_tensor_absent_from_every_shard(ckpts, tmp_path):
    d = clone(ckpts["tiny-moe/sharded"], tmp_path)
    key = "backbone.layers.0.mixer.dt_bias"
    home = _shard_of(d, key)
    rewrite(home, lambda t: t.pop(key))
    with pytest.raises(WeightsError) as ei:
        Checkpoint(d)
    assert key in str(ei.value) and home.name in str(ei.value)


def test_index_lists_tensor_in_the_wrong_shard(ckpts, tmp_path):
    d = clone(ckpts["tiny-moe/sharded"], tmp_path)
    key = "backbone.norm_f.weight"
    index = json.loads((d / INDEX).read_text())
    real = index["weight_map"][key]
    wrong = next(f for f in sorted(set(index["weight_map"].values())) if f != real)
    index["weight_map"][key] = wrong
    (d / INDEX).write_text(json.dumps(index))
    try:
        Checkpoint(d)
        msg = None
    except WeightsError as e:
        msg = str(e)
    assert msg is not None, f"an index placing '{key}' in {wrong} (it is in {real}) was accepted"
    assert key in msg and wrong in msg


def test_malformed_index(ckpts, tmp_path):
    d = clone(ckpts["tiny-moe/sharded"], tmp_path)
    (d / INDEX).write_text('{"metadata": {}, "weight_map": ')
    with pytest.raises(WeightsError) as ei:
        Checkpoint(d)
    assert INDEX in str(ei.value)


@pytest.mark.parametrize("which", ["tiny-dense", "tiny-moe/sharded"])
def test_truncated_file(ckpts, tmp_path, capsys, which):
    d = clone(ckpts[which], tmp_path)
    f = d / "model.safetensors" if which == "tiny-dense" else sorted(d.glob("*.safetensors"))[4]
    b = f.read_bytes()
    f.write_bytes(b[: len(b) // 2])
    with pytest.raises(WeightsError) as ei:
        Checkpoint(d)
    assert str(f) in str(ei.value) and "\n" not in str(ei.value)
    assert_cli_error(capsys, d, str(f))


def _shift_end(h):
    h[A_LOG]["data_offsets"][1] += 4  # overlaps the next tensor


def _shift_both(h):
    a, b = h[A_LOG]["data_offsets"]
    h[A_LOG]["data_offsets"] = [a + 4, b + 4]  # leaves a hole, overlaps the next tensor


A_LOG = "backbone.layers.0.mixer.A_log"
_TAMPER = {
    "shape": lambda h: h[A_LOG].update(shape=[9]),
    "dtype": lambda h: h[A_LOG].update(dtype="F16"),
    "offset-end": _shift_end,
    "offsets-shifted": _shift_both,
}


@pytest.mark.parametrize("how", sorted(_TAMPER))
def test_tampered_header(ckpts, tmp_path, how):
    d = clone(ckpts["tiny-dense"], tmp_path)
    f = d / "model.safetensors"
    assert load_file(f)[A_LOG].shape == (8,)
    before = f.stat().st_size
    edit_header(f, _TAMPER[how])
    assert f.stat().st_size == before
    with pytest.raises(WeightsError) as ei:
        Checkpoint(d).load(graph(d))
    assert str(f) in str(ei.value) and "\n" not in str(ei.value)


def test_not_safetensors_at_all(ckpts, tmp_path, capsys):
    d = clone(ckpts["tiny-dense"], tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(WeightsError) as ei:
        Checkpoint(d)
    assert str(f) in str(ei.value)
    assert_cli_error(capsys, d, str(f))


def test_empty_directory(tmp_path):
    with pytest.raises(WeightsError) as ei:
        Checkpoint(tmp_path)
    assert str(tmp_path) in str(ei.value) and "safetensors" in str(ei.value)


@pytest.fixture
def no_unpickling(monkeypatch) -> list:
    calls: list = []

    def refuse(what):
        def f(*a, **k):
            calls.append(what)
            raise AssertionError(f"{what} called: nemoh must never unpickle")
        return f

    monkeypatch.setattr(torch, "load", refuse("torch.load"))
    monkeypatch.setattr(pickle, "load", refuse("pickle.load"))
    monkeypatch.setattr(pickle, "loads", refuse("pickle.loads"))
    monkeypatch.setattr(pickle, "Unpickler", refuse("pickle.Unpickler"))
    return calls


def test_pickle_checkpoint_is_rejected(ckpts, tmp_path, capsys, no_unpickling):
    d = tmp_path / "ck"
    d.mkdir()
    shutil.copyfile(ckpts["tiny-dense"] / "config.json", d / "config.json")
    (d / "pytorch_model.bin").write_bytes(b"PK\x03\x04" + random.Random(1).randbytes(2048))
    with pytest.raises(WeightsError) as ei:
        Checkpoint(d)
    assert str(d) in str(ei.value) and "safetensors" in str(ei.value)
    assert_cli_error(capsys, d, str(d))
    assert no_unpickling == []


def test_cli_generate_loads_a_good_checkpoint(ckpts, capsys, no_unpickling):
    """The control for the CLI error tests: the same command on an intact checkpoint succeeds."""
    code, out, err = run_cli(capsys, "generate", str(ckpts["tiny-moe/sharded"]), "--prompt", "The cat", "-n", "2")
    assert code == 0, err
    assert out.startswith("The cat")
    assert "nemoh: error" not in err


def test_integer_tensor_is_refused(ckpts, tmp_path):
    d = clone(ckpts["tiny-dense"], tmp_path)
    rewrite(d / "model.safetensors",
            lambda t: t.update({"backbone.layers.0.mixer.D": t["backbone.layers.0.mixer.D"].to(torch.int32)}))
    msg = weights_error(d)
    assert "backbone.layers.0.mixer.D" in msg and "I32" in msg and "floating-point" in msg


def test_pickle_only_directory_says_why(ckpts, tmp_path):
    d = tmp_path / "pk"
    d.mkdir()
    (d / "config.json").write_text((ckpts["tiny-dense"] / "config.json").read_text())
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    msg = weights_error(d)
    assert "pytorch_model.bin" in msg and "pickle" in msg and "safetensors" in msg


def test_expert_numbers_with_leading_zeros_are_unexpected(ckpts, tmp_path):
    d = clone(ckpts["tiny-moe"], tmp_path)
    key = "backbone.layers.1.mixer.experts.3.up_proj.weight"
    rewrite(d / "model.safetensors", lambda t: t.update({key.replace(".3.", ".03."): t.pop(key)}))
    msg = weights_error(d)
    assert "experts.03.up_proj" in msg and "unexpected" in msg

"""Hostile input, through the CLI: no traceback, exit 0 or 2 (one line on stderr), bounded time.

Two hypothesis fuzzers (config.json; safetensors headers and shard index files) run `nemoh inspect`
and `nemoh verify` in-process, at a small example count by default. NEMOH_FUZZ_EXAMPLES=N raises it
(the nox session `fuzz`). Then one focused test per kind of bad input of issue 13: output paths,
sizes, the shard index, malformed JSON and transformers-bound fields, devices, ids, -n and backend
specs, and the parameter count.

Why one file: the fuzzers and the focused tests share the same hostile-file builders and the same
one-line-error, exit-code and time checks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import stat
import struct
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nemoh.cli import main
from nemoh.errors import ConfigError, InputError, NemohError
from nemoh.model import config as C
from nemoh.model import config_checks as checks
from nemoh.model.config import load_config, parse_config

EXAMPLES = int(os.environ.get("NEMOH_FUZZ_EXAMPLES", "0") or 0)
FUZZ = settings(max_examples=EXAMPLES or 20, deadline=None, derandomize=not EXAMPLES,
                suppress_health_check=list(HealthCheck))
CALL_SECONDS = 30.0  # one CLI call on a tiny checkpoint takes well under a second
INDEX = "model.safetensors.index.json"

BASE = dict(model_type="nemotron_h", vocab_size=64, hidden_size=16, mamba_num_heads=4, mamba_head_dim=4,
            ssm_state_size=4, n_groups=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
            intermediate_size=24, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
            moe_shared_expert_intermediate_size=8, hybrid_override_pattern="M*-E")


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """main(args) in-process: (exit code, stdout, stderr); an exception escaping is a test failure."""
    t0 = time.monotonic()
    rc = main(list(args))
    took = time.monotonic() - t0
    out, err = capsys.readouterr()
    assert took < CALL_SECONDS, f"nemoh {' '.join(args)} took {took:.1f}s"
    return rc, out, err


def assert_clean(rc: int, err: str, ok=(0, 2)) -> None:
    assert rc in ok, (rc, err)
    assert "Traceback" not in err
    if rc == 2:
        assert err.startswith("nemoh: error:") and err.count("\n") == 1, err


# ----------------------------------------------------------------------------------------------
# fuzz: config.json

KEYS = sorted((set(checks.TRANSFORMERS_TYPES) | {f.name for f in dataclasses.fields(C.ModelConfig)} | set(C.ALIASES)
               | {"use_return_dict", "sub_configs", "rope_theta", "rope_scaling", "rope_parameters",
                  "partial_rotary_factor", "id2label", "label2id", "num_labels", "problem_type"})
              - {"source", "layer_types"})
leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 70), st.integers(-(10 ** 120), 10 ** 120),
    st.integers(0, 1 << 40), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["inf", "M*-E", "MMMM", "mamba", "moe", "float32", "bfloat16", "relu2", "silu",
                     "nemotron_h", {"__float__": "Infinity"}, [0.0, 1.0], [0.0, math.inf], ["mamba", "moe"]]),
)
value = st.recursive(leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                     max_leaves=8)


@st.composite
def config_texts(draw) -> str:
    kind = draw(st.sampled_from(["patch", "patch", "patch", "drop", "text", "deep", "digits"]))
    if kind == "text":
        return draw(st.text(max_size=200))
    if kind == "deep":
        n = draw(st.integers(1, 20000))
        return '{"x": ' + "[" * n + "]" * n + "}"
    if kind == "digits":
        key = draw(st.sampled_from(KEYS))
        return json.dumps({**BASE})[:-1] + f', "{key}": {draw(st.sampled_from(["", "-"]))}' + "7" * draw(
            st.integers(90, 6000)) + "}"
    raw = dict(BASE)
    if kind == "drop":
        for k in draw(st.lists(st.sampled_from(sorted(BASE)), max_size=3)):
            raw.pop(k, None)
    raw.update(draw(st.dictionaries(st.sampled_from(KEYS), value, min_size=1, max_size=4)))
    return json.dumps(raw)


@FUZZ
@given(text=config_texts())
def test_fuzz_config_json(tmp_path_factory, capsys, text):
    d = tmp_path_factory.mktemp("cfg")
    (d / "config.json").write_text(text, encoding="utf-8")
    rc, out, err = run_cli(capsys, "inspect", str(d), "--json")
    assert_clean(rc, err)
    if rc == 0:
        assert json.loads(out)["params_total"] > 0
        # what nemoh accepts, transformers (the reference of `conformance`) accepts too
        from transformers import NemotronHConfig

        NemotronHConfig.from_pretrained(str(d))


# ----------------------------------------------------------------------------------------------
# fuzz: safetensors headers and shard index files


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    from nemoh.model.presets import write_checkpoint

    root = tmp_path_factory.mktemp("hostile-ckpt")
    return {"single": write_checkpoint("tiny-dense", root / "single"),
            "sharded": write_checkpoint("tiny-dense", root / "sharded", max_shard_size="100KB")}


def _header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _write(path: Path, header_bytes: bytes, body: bytes, n: int | None = None) -> None:
    path.write_bytes(struct.pack("<Q", len(header_bytes) if n is None else n) + header_bytes + body)


header_value = st.one_of(
    value, st.sampled_from(["F32", "BF16", "F16", "F64", "I32", "F8_E4M3", "BOOL", "XX"]),
    st.lists(st.integers(-2, 1 << 62), max_size=4),
    st.tuples(st.integers(-5, 1 << 20), st.integers(-5, 1 << 20)).map(list),
)


@st.composite
def header_mutations(draw):
    return draw(st.sampled_from(["field", "field", "key", "extra", "length", "truncate", "bytes"])), draw(
        st.data())


@FUZZ
@given(m=header_mutations())
def test_fuzz_safetensors_header(tiny, tmp_path_factory, capsys, m):
    kind, data = m
    d = tmp_path_factory.mktemp("st")
    ck = Path(shutil.copytree(tiny["single"], d / "ck"))
    f = ck / "model.safetensors"
    header, body = _header(f)
    names = sorted(k for k in header if k != "__metadata__")
    hb = None
    n = None
    if kind == "field":
        name = data.draw(st.sampled_from(names))
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        if data.draw(st.booleans()):
            header[name][field] = data.draw(header_value)
        else:
            del header[name][field]
    elif kind == "key":
        name = data.draw(st.sampled_from(names))
        new = data.draw(st.text(max_size=40) | st.sampled_from(["backbone.layers.99.norm.weight", "lm_head.bias"]))
        header[new] = header.pop(name)
    elif kind == "extra":
        header[data.draw(st.text(max_size=10))] = data.draw(header_value)
    hb = json.dumps(header).encode()
    if kind == "length":
        n = data.draw(st.integers(0, (1 << 64) - 1) | st.integers(0, len(hb) + 64))
    if kind == "bytes":
        hb = bytearray(hb)
        for _ in range(data.draw(st.integers(1, 8))):
            hb[data.draw(st.integers(0, len(hb) - 1))] = data.draw(st.integers(0, 255))
        hb = bytes(hb)
    _write(f, hb, body, n)
    if kind == "truncate":
        raw = f.read_bytes()
        f.write_bytes(raw[:data.draw(st.integers(0, len(raw) - 1))])
    rc, out, err = run_cli(capsys, "verify", str(ck))
    assert_clean(rc, err)
    if rc == 0:
        assert "bit-equal" in out


@st.composite
def index_texts(draw, weight_map: dict, shards: list[str]):
    kind = draw(st.sampled_from(["value", "value", "key", "map", "text", "deep"]))
    if kind == "text":
        return draw(st.text(max_size=200))
    if kind == "deep":
        n = draw(st.integers(1, 20000))
        return '{"weight_map": ' + "[" * n + "]" * n + "}"
    wm = dict(weight_map)
    if kind == "map":
        return json.dumps({"metadata": {}, "weight_map": draw(value)})
    key = draw(st.sampled_from(sorted(wm)))
    if kind == "key":
        wm[draw(st.text(max_size=30))] = wm.pop(key)
    else:
        wm[key] = draw(value | st.sampled_from(
            [*shards, "../sharded/" + shards[0], "/etc/passwd", "/dev/zero", "config.json", "", ".", "./" + shards[0],
             "sub/../" + shards[0], "C:\\x.safetensors", "..\\x.safetensors", "missing.safetensors"]))
    return json.dumps({"metadata": {}, "weight_map": wm})


@FUZZ
@given(data=st.data())
def test_fuzz_index_file(tiny, tmp_path_factory, capsys, data):
    d = tmp_path_factory.mktemp("ix")
    ck = Path(shutil.copytree(tiny["sharded"], d / "ck"))
    wm = json.loads((ck / INDEX).read_text())["weight_map"]
    (ck / INDEX).write_text(data.draw(index_texts(wm, sorted(set(wm.values())))), encoding="utf-8")
    rc, out, err = run_cli(capsys, "verify", str(ck))
    assert_clean(rc, err)


# ----------------------------------------------------------------------------------------------
# 1. output paths


def test_output_paths_are_checked_before_the_run(tmp_path, capsys):
    from nemoh.output import check_output_paths

    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link.json").symlink_to(tmp_path / "target.json")
    (tmp_path / "alias").symlink_to(tmp_path, target_is_directory=True)
    cases = {
        "is a directory": {"--json": tmp_path / "dir"},
        "no such directory": {"--json": tmp_path / "nope" / "r.json"},
        "is a FIFO": {"--html": tmp_path / "fifo"},
        "is a device": {"--json": Path("/dev/null")},
        "symbolic link": {"--json": tmp_path / "link.json"},
        "the same file as --json": {"--json": tmp_path / "r.json", "--html": tmp_path / "alias" / "r.json"},
    }
    for why, paths in cases.items():
        with pytest.raises(NemohError, match=why):
            check_output_paths(paths)
    assert check_output_paths({"--json": tmp_path / "r.json", "--html": None}) == [tmp_path / "r.json"]
    # the commands refuse before running anything: a conformance run would take far longer
    for opt in ("--json", "--html", "--junit"):
        t0 = time.monotonic()
        rc, _, err = run_cli(capsys, "conformance", "--model", "tiny-moe", "--backend", "torch", opt,
                             str(tmp_path / "dir"))
        assert rc == 2 and "is a directory" in err and err.count("\n") == 1 and time.monotonic() - t0 < 5
    rc, _, err = run_cli(capsys, "conformance", "--model", "tiny-moe", "--backend", "torch", "--json",
                         "/dev/null")
    assert rc == 2 and "is a device" in err and stat.S_ISCHR(os.stat("/dev/null").st_mode)
    rc, _, err = run_cli(capsys, "eval", "--model", "tiny-moe", "--tasks", "nemoh_mmlu_fixture", "--json",
                         str(tmp_path / "dir"))
    assert rc == 2 and "is a directory" in err
    (tmp_path / "afile").write_text("x")
    rc, _, err = run_cli(capsys, "export-onnx", "tiny-moe", "--out", str(tmp_path / "afile"))
    assert rc == 2 and "not a directory" in err

    from nemoh.bench.cli import main as bench_main

    assert bench_main(["--model", "tiny-moe", "--backend", "torch", "--json", str(tmp_path / "dir")]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert bench_main(["--model", "tiny-moe", "--backend", "torch", "--json", str(tmp_path / "r.json"),
                       "--html", str(tmp_path / "r.json")]) == 2
    assert "the same file" in capsys.readouterr().err
    assert bench_main(["--model", "tiny-moe", "--backend", "torch", "--device", "meta"]) == 2


def test_reports_use_the_umask_never_replace_special_files_and_leave_no_temp(tmp_path, monkeypatch):
    from nemoh import output

    old = os.umask(0o022)
    try:
        output.write_json({"a": 1}, tmp_path / "r.json")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "r.json").st_mode) == 0o644  # mkstemp alone gives 0600
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(NemohError, match="FIFO"):
        output.atomic_write(tmp_path / "fifo", "x")
    assert stat.S_ISFIFO(os.lstat(tmp_path / "fifo").st_mode)
    (tmp_path / "l").symlink_to(tmp_path / "r.json")
    with pytest.raises(NemohError, match="symbolic link"):
        output.atomic_write(tmp_path / "l", "x")
    assert (tmp_path / "l").is_symlink()

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(output.os, "replace", fail)
    with pytest.raises(NemohError, match=r"r\.json: cannot write the report \(No space left on device\)"):
        output.write_json({"b": 2}, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}  # the old report is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "l", "r.json"]  # no temp file left


# ----------------------------------------------------------------------------------------------
# 2. sizes


def test_sizes_are_bounded_with_the_field_named(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "hybrid_override_pattern": "M" * 1_000_000}))
    rc, _, err = run_cli(capsys, "inspect", str(tmp_path))
    assert rc == 2 and "hybrid_override_pattern" in err and "more than the maximum" in err
    for field, v in [("hidden_size", 1 << 30), ("vocab_size", 1 << 40), ("mamba_num_heads", 1 << 20),
                     ("conv_kernel", 1 << 20), ("max_position_embeddings", 1 << 40)]:
        with pytest.raises(ConfigError, match=f"field '{field}' is .* more than the maximum"):
            parse_config({**BASE, field: v}, "c.json")
    with pytest.raises(ConfigError, match="layers_block_type"):
        parse_config({**BASE, "layers_block_type": ["mamba"] * (checks.MAX_LAYERS + 1)})


def test_generation_lengths_and_memory_are_checked_up_front(capsys, monkeypatch):
    rc, _, err = run_cli(capsys, "generate", "tiny-dense", "--ids", "1", "-n", "5000")
    assert rc == 2 and "max_position_embeddings (4096" in err
    rc, _, err = run_cli(capsys, "generate", "tiny-dense", "--ids", ",".join(["5"] * 4097), "-n", "1")
    assert rc == 2 and "4097 tokens, more than the model's max_position_embeddings" in err
    from nemoh.runtime import session

    monkeypatch.setattr(session, "available_memory", lambda device: 10_000)
    rc, _, err = run_cli(capsys, "generate", "tiny-dense", "--ids", "1", "-n", "2")
    assert rc == 2 and "only 9.8 KiB is available on cpu" in err and err.count("\n") == 1


# ----------------------------------------------------------------------------------------------
# 3. the shard index and non-regular files


def _timed(capsys, args: list[str], timeout: float = 60) -> tuple[int, str]:
    """main(args) in a daemon thread with a timeout: a FIFO used to hang the reader forever (a hung
    thread is abandoned, and the test fails instead of hanging)."""
    box: dict[str, object] = {}
    th = threading.Thread(target=lambda: box.update(rc=main(args)), daemon=True)
    th.start()
    th.join(timeout)
    assert not th.is_alive(), f"nemoh {' '.join(args)} hung"
    return box["rc"], capsys.readouterr().err


def test_index_names_only_files_inside_the_checkpoint(tiny, tmp_path, capsys):
    other = Path(shutil.copytree(tiny["single"], tmp_path / "other"))
    for val, why in [("../other/model.safetensors", "inside the checkpoint folder"),
                     ("/etc/passwd", "inside the checkpoint folder"),
                     (str(other / "model.safetensors"), "inside the checkpoint folder"),
                     (5, "maps to 5, expected a shard file name"), (["a"], "expected a shard file name")]:
        ck = tmp_path / "ck"
        shutil.rmtree(ck, ignore_errors=True)
        shutil.copytree(tiny["sharded"], ck)
        ix = json.loads((ck / INDEX).read_text())
        ix["weight_map"] = {k: val for k in ix["weight_map"]}
        (ck / INDEX).write_text(json.dumps(ix))
        rc, out, err = run_cli(capsys, "verify", str(ck))
        assert rc == 2 and why in err and "bit-equal" not in out and err.count("\n") == 1, err


def test_fifo_shard_and_config_are_refused_not_read(tiny, tmp_path, capsys):
    ck = Path(shutil.copytree(tiny["sharded"], tmp_path / "ck"))
    shard = sorted(ck.glob("model-*.safetensors"))[0]
    shard.unlink()
    os.mkfifo(shard)
    rc, err = _timed(capsys, ["verify", str(ck)])
    assert rc == 2 and "is a FIFO" in err and err.count("\n") == 1
    one = Path(shutil.copytree(tiny["single"], tmp_path / "one"))
    (one / "config.json").unlink()
    os.mkfifo(one / "config.json")
    (one / "model.safetensors").unlink()
    os.mkfifo(one / "model.safetensors")
    rc, err = _timed(capsys, ["verify", str(one)])
    assert rc == 2 and "config.json: is a FIFO" in err
    (one / "config.json").unlink()
    shutil.copy(tiny["single"] / "config.json", one / "config.json")
    rc, err = _timed(capsys, ["verify", str(one)])
    assert rc == 2 and "model.safetensors: is a FIFO" in err


# ----------------------------------------------------------------------------------------------
# 4. malformed JSON of any shape, and the fields transformers reads


@pytest.mark.parametrize("text,why", [
    ('{"x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    ('{"a": {"b": ' + "[" * 80 + "]" * 80 + "}}", "field 'a' is nested more than"),
    ('{"vocab_size": ' + "9" * 4000 + "}", "field 'vocab_size' is an integer of 4000 digits"),
    ('{"eos_token_id": [1, -' + "9" * 5000 + "]}", r"field 'eos_token_id\[1\]' is an integer of 5000 digits"),
    ("[1, 2]", "expected a JSON object at the top level, got list"),
    ('"text"', "expected a JSON object at the top level, got str"),
    ("\ufeff\x00", "malformed JSON"),
])
def test_malformed_json_of_any_shape(tmp_path, capsys, text, why):
    (tmp_path / "config.json").write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=why):
        load_config(tmp_path)
    rc, _, err = run_cli(capsys, "inspect", str(tmp_path))
    assert rc == 2 and err.count("\n") == 1


@pytest.mark.parametrize("patch,field", [
    ({"pad_token_id": "abc"}, "pad_token_id"), ({"expand": "x"}, "expand"), ({"mamba_expand": "x"}, "mamba_expand"),
    ({"bos_token_id": 10 ** 20}, "bos_token_id"), ({"bos_token_id": True}, "bos_token_id"),
    ({"eos_token_id": [2, "x"]}, "eos_token_id"), ({"eos_token_id": 64}, "eos_token_id"),
    ({"max_position_embeddings": "x"}, "max_position_embeddings"), ({"use_cache": "yes"}, "use_cache"),
    ({"initializer_range": "a"}, "initializer_range"), ({"sliding_window": "x"}, "sliding_window"),
    ({"attention_dropout": True}, "attention_dropout"), ({"time_step_min": 1}, "time_step_min"),
    ({"mtp_layers_block_type": "MM"}, "mtp_layers_block_type"), ({"vocab_size": 64.0}, "vocab_size"),
    ({"intermediate_size": "x", "hybrid_override_pattern": "M"}, "intermediate_size"),
    ({"n_routed_experts": None, "hybrid_override_pattern": "M"}, "n_routed_experts"),
    ({"time_step_limit": [0, 1e999]}, "time_step_limit"), ({"hidden_size": 1e400}, "hidden_size"),
])
def test_fields_transformers_reads_are_validated(tmp_path, patch, field):
    """Each of these made transformers raise inside `conformance` (exit 1, the code of a FAIL)."""
    from transformers import NemotronHConfig

    raw = {**BASE, **patch}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=f"field '{field}'") as e:
        load_config(tmp_path)
    assert "\n" not in str(e.value)
    try:
        NemotronHConfig.from_pretrained(str(tmp_path))
        hf_accepts = True
    except Exception:
        hf_accepts = False
    assert not hf_accepts or field in ("bos_token_id", "eos_token_id")  # transformers only warns on ranges


def test_conformance_refuses_a_bad_field_with_exit_2(tiny, tmp_path, capsys):
    ck = Path(shutil.copytree(tiny["single"], tmp_path / "ck"))
    raw = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**raw, "pad_token_id": "abc"}))
    rc, _, err = run_cli(capsys, "conformance", "--model", str(ck), "--backend", "torch", "--suite", "logits")
    assert rc == 2 and "field 'pad_token_id'" in err


# ----------------------------------------------------------------------------------------------
# 5. devices, ids, -n, backend specs


def test_check_device():
    from nemoh.runtime.session import check_device

    assert check_device(None) is None and str(check_device("cpu")) == "cpu"
    for bad, why in [("bogus", "not a device"), ("meta", "not supported"), ("cuda:x", "not a device")]:
        with pytest.raises(InputError, match=why):
            check_device(bad)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            check_device("cuda")


@pytest.mark.parametrize("cmd", ["generate", "verify", "conformance"])
@pytest.mark.parametrize("device", ["bogus", "meta", "cuda:99"])
def test_bad_device_is_one_line_exit_2(capsys, cmd, device):
    args = {"generate": ["generate", "tiny-dense", "--ids", "1"], "verify": ["verify", "tiny-dense"],
            "conformance": ["conformance", "--model", "tiny-dense", "--backend", "torch"]}[cmd]
    rc, _, err = run_cli(capsys, *args, "--device", device)
    assert rc == 2 and "--device" in err and err.count("\n") == 1


@pytest.mark.parametrize("args,why", [
    (["--ids", "99999999999999999999"], "out of range"), (["--ids", "1,x"], "comma-separated integers"),
    (["--ids", ""], "comma-separated integers"), (["--ids", "-1"], "out of range"),
    (["--ids", "1", "-n", "0"], "must be >= 1"), (["--ids", "1", "-n", "-5"], "must be >= 1"),
])
def test_generate_bad_ids_and_counts(capsys, args, why):
    rc, _, err = run_cli(capsys, "generate", "tiny-dense", *args)
    assert rc == 2 and why in err and err.count("\n") == 1


def test_check_ids_overflow_is_an_input_error():
    from nemoh.runtime.session import check_ids

    with pytest.raises(InputError, match="token ids must be integers"):
        check_ids([[99999999999999999999]], 10)
    with pytest.raises(InputError):
        check_ids([["a"]], 10)


@pytest.mark.parametrize("spec", [":", "os:system", "no.such.module:x", "nemoh.cli:nope"])
def test_bad_backend_specs_exit_2(capsys, spec):
    rc, _, err = run_cli(capsys, "verify", "tiny-dense", "--backend", spec)
    assert_clean(rc, err, ok=(2,))


# ----------------------------------------------------------------------------------------------
# 7. parameter count


def test_inspect_counts_params_like_transformers(capsys):
    rc, out, _ = run_cli(capsys, "inspect", "tiny-moe", "--json")
    d = json.loads(out)
    from nemoh.model.ir import build_graph
    from nemoh.model.presets import PRESETS, build_model

    model = build_model("tiny-moe")
    assert d["params_total"] == model.num_parameters()
    bufs = sum(b.numel() for n, b in model.named_buffers() if "e_score_correction_bias" in n)
    assert d["buffers_total"] == bufs == 3 * 8  # MEM*EME: 3 MoE layers x 8 experts
    assert d["checkpoint_tensors_total"] == d["params_total"] + bufs == sum(
        t.numel() for t in model.state_dict().values())
    g = build_graph(parse_config(PRESETS["tiny-moe"].config))
    assert sum(g.params_by_kind().values()) == g.params_total == d["params_total"]

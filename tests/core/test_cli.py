"""`nemoh inspect`, `nemoh presets`, `nemoh make-model`, `nemoh verify`, and the backend registry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nemoh.cli import main
from nemoh.errors import NemohError
from nemoh.model.config import parse_config
from nemoh.model.ir import build_graph
from nemoh.model.presets import PRESETS, RELEASES_DIR
from nemoh.runtime.registry import available_backends, get_backend

SHARED = RELEASES_DIR


def run_json(capsys, *args) -> dict:
    assert main(["inspect", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_inspect_preset_json(capsys, preset):
    d = run_json(capsys, preset)
    g = build_graph(parse_config(PRESETS[preset].config), d["dtype"])
    assert d["params_total"] == g.params_total == sum(l["params"] for l in d["layers"]) + d["params_by_kind"][
        "embedding"] + d["params_by_kind"]["head"]
    assert [l["kind"] for l in d["layers"]] == list(g.config.layer_types)
    assert {l["kind"] for l in d["layers"]} <= {"mamba", "attention", "mlp", "moe"}
    assert [l["index"] for l in d["layers"]] == list(range(len(d["layers"])))
    assert d["state_bytes_per_sequence"] == g.state_bytes_per_sequence > 0
    assert d["state_bytes_per_token"] == g.state_bytes_per_token > 0


def test_inspect_released_config_and_dir(capsys, tmp_path):
    src = SHARED / "NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.json"
    d = run_json(capsys, str(src))
    # transformers' num_parameters(); the 23 MoE layers' 128-expert router biases are buffers, apart
    assert d["params_total"] == 31_577_937_344 and d["num_layers"] == 52
    assert d["buffers_total"] == 23 * 128 and d["checkpoint_tensors_total"] == 31_577_940_288
    assert d["state_bytes_per_token"] == 6144 and d["dtype"] == "bfloat16"
    (tmp_path / "config.json").write_text(src.read_text())  # a directory holding only a config.json
    assert run_json(capsys, str(tmp_path))["params_total"] == 31_577_937_344
    assert run_json(capsys, str(tmp_path), "--dtype", "float32")["state_bytes_per_token"] == 12288


def test_inspect_table_and_ir(capsys):
    assert main(["inspect", "tiny-latent-moe"]) == 0
    out = capsys.readouterr().out
    assert "params total:" in out and "moe" in out and "state per token" in out
    assert main(["inspect", "tiny-latent-moe", "--ir"]) == 0
    assert "moe_router" in capsys.readouterr().out
    assert main(["inspect", "tiny-latent-moe", "--ir-json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "nemoh-graph/1"


def test_unknown_model_and_usage_errors(capsys):
    assert main(["inspect", "tiny-dens"]) == 2
    err = capsys.readouterr().err
    assert "Did you mean: tiny-dense" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        main(["inspect"])
    assert e.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_make_model_then_verify(capsys, tmp_path):
    out = tmp_path / "ck"
    assert main(["make-model", "--preset", "tiny-dense", "--out", str(out), "--max-shard-size", "100KB"]) == 0
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0
    assert "bit-equal" in capsys.readouterr().out
    assert main(["make-model", "--preset", "nope", "--out", str(tmp_path / "x")]) == 2


def test_entry_point_script_exit_codes(tmp_path):
    exe = Path(sys.executable).with_name("nemoh")
    ok = subprocess.run([str(exe), "inspect", "tiny-moe", "--json"], capture_output=True, text=True)
    assert ok.returncode == 0 and json.loads(ok.stdout)["params_total"] > 0
    (tmp_path / "config.json").write_text('{"hybrid_override_pattern": "M*Z"}')
    bad = subprocess.run([str(exe), "inspect", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1


def test_registry():
    assert available_backends()["torch"] == "nemoh.backends.torch_backend:TorchBackend"
    assert get_backend("torch").name == "torch"
    assert get_backend("nemoh.backends.torch_backend:TorchBackend").name == "torch"
    with pytest.raises(NemohError, match=r"Unknown backend 'trch'. Did you mean: torch\? Available: .*torch"):
        get_backend("trch")
    with pytest.raises(NemohError, match="cannot import module 'no_such_mod'"):
        get_backend("no_such_mod:Factory")
    with pytest.raises(NemohError, match="has no attribute 'Nope'"):
        get_backend("nemoh.backends.torch_backend:Nope")
    with pytest.raises(NemohError, match="does not implement the nemoh backend protocol|not a backend"):
        get_backend("collections:OrderedDict")


def test_capability_query():
    from nemoh.model.ir import OP_KINDS

    be = get_backend("torch")
    assert be.available().ok
    assert all(be.supports(op, dt).ok for op in OP_KINDS for dt in ("float64", "float32", "bfloat16", "float16"))
    assert not be.supports("rotary_embedding", "float32").ok
    no = be.supports("linear", "float8_e4m3")
    assert not no.ok and "float8_e4m3" in no.reason


def test_generate_on_a_preset_says_the_weights_are_random_and_escapes_what_a_terminal_would_run(capsys):
    """A random-weight preset generates bytes that are not text: control characters (an escape sequence
    could rewrite the terminal) and U+FFFD are shown as escapes, with a note, and the weights are named random."""
    import unicodedata

    assert main(["generate", "tiny-moe", "--prompt", "The cat", "-n", "24"]) == 0
    cap = capsys.readouterr()
    assert "random weights" in cap.err
    raw = [ch for ch in cap.out if ch == "\ufffd" or (unicodedata.category(ch)[0] == "C" and ch not in "\n\t")]
    assert not raw, [hex(ord(ch)) for ch in raw]
    assert cap.out.startswith("The cat")
    # the seeded preset's 24 tokens hold both (the issue's own example); each one is said
    assert "\\x1f" in cap.out and "\\ufffd" in cap.out and "shown as escapes" in cap.err


def test_printable_escapes_control_characters_and_replacement_chars():
    from nemoh.display import printable

    assert printable("ok\tline\n") == ("ok\tline\n", 0)
    assert printable("a\x1b[2Jb\ufffdc\x7f\u200bé") == ("a\\x1b[2Jb\\ufffdc\\x7f\\u200bé", 4)


def test_a_directory_named_like_a_preset_is_a_checkpoint_not_random_weights(tmp_path, monkeypatch):
    from nemoh.cli import _is_preset

    assert _is_preset("tiny-moe") and not _is_preset("no-such-preset")
    (tmp_path / "tiny-moe").mkdir()
    monkeypatch.chdir(tmp_path)
    assert not _is_preset("tiny-moe")  # a directory of that name is a checkpoint, not the preset

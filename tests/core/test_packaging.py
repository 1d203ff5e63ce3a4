"""Packaging: one import namespace (`nemoh`), no generic top-level names, light core imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True)
    (whl,) = out.glob("nemoh-*.whl")
    return whl


def test_wheel_installs_only_the_nemoh_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"nemoh", next(t for t in tops if t.endswith(".dist-info"))}
    for sub in ("nemoh/backends/torch_backend.py", "nemoh/suites/__init__.py", "nemoh/reports/__init__.py",
                "nemoh/model/config.py", "nemoh/model/tokenizer_corpus.txt", "nemoh/oracle/ops.py",
                "nemoh/eval/fixtures/nemoh_mmlu_fixture.yaml", "nemoh/eval/fixtures/data/mmlu_fixture_test.jsonl",
                "nemoh/reports/templates/conformance.html.j2"):
        assert sub in names
    ep = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "nemoh.backends" in ep and "torch = nemoh.backends.torch_backend:TorchBackend" in ep
    # the core finds suites, renderers and commands through entry points, never by importing them
    assert "[nemoh.suites]" in ep and "logits = nemoh.suites.logits:SUITE" in ep
    assert "[nemoh.renderers]" in ep and "conformance-html = nemoh.reports.conformance_html:render" in ep
    assert "[nemoh.commands]" in ep and "export-onnx = nemoh.backends.onnx_export:register" in ep


def test_wheel_imports_in_a_fresh_venv(wheel, tmp_path):
    """A bare venv (no torch, nothing else): the namespace and the pure-data core import from the wheel."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with zipfile.ZipFile(wheel) as z:  # what `pip install --no-deps` does for a pure wheel
        z.extractall(site)
    probe = """
import json, importlib.util, sys
import nemoh, nemoh.backends, nemoh.suites, nemoh.reports
from nemoh.model.config import parse_config
from nemoh.model.ir import build_graph
g = build_graph(parse_config({"hybrid_override_pattern": "M*-E"}), "bfloat16")
print(json.dumps({"file": nemoh.__file__, "params": g.params_total,
                  "generic": [m for m in ("backends", "reports", "suites", "nemoh_core")
                              if importlib.util.find_spec(m) is not None],
                  "torch": "torch" in sys.modules}))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    res = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["file"].startswith(site) and out["generic"] == [] and out["torch"] is False
    assert out["params"] > 0


def test_core_imports_no_heavy_optional_packages():
    code = ("import sys, nemoh, nemoh.model.config, nemoh.model.ir, nemoh.model.weights, nemoh.oracle, "
            "nemoh.runtime.session, "
            "nemoh.runtime.registry, nemoh.cli, nemoh.model.presets, nemoh.backends.torch_backend;"
            "print([m for m in ('cupy', 'onnxruntime', 'onnx', 'transformers', 'lm_eval', 'tokenizers') "
            "if m in sys.modules])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"

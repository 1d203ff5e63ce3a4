"""nox sessions. `nox` alone runs `tests`.

The CPU build of torch is pinned first in every session: an unpinned torch would pull the
multi-GB CUDA build (see README).
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True
TORCH = "torch==2.13.0"
# backends with a session of their own (their runs take far longer than the rest of the matrix, or need a
# build): `nox -s cupy-emulated` (the CUDA kernels on the CPU emulator), `nox -s llamacpp`
OWN_SESSION = ("cupy-emulated", "llamacpp")


def install(session: nox.Session, extras: str = "test") -> None:
    session.install(TORCH)
    session.install("-e", f".[{extras}]")


def preset_names(session: nox.Session) -> list[str]:
    """Every preset: the hand-made tiny ones, those made from the released configs, then the ModelOpt-quantized ones
    (a backend that cannot run a quantized checkpoint as it means answers NOT_SUPPORTED with its reason)."""
    return session.run("python", "-c", "from nemoh.model.presets import all_presets, quant_presets; "
                       "print(' '.join([*all_presets(), *quant_presets()]))", silent=True).split()


@nox.session
def tests(session: nox.Session) -> None:
    """The default test run (the README's test command)."""
    install(session)
    session.run("pytest", "-q", *session.posargs)


@nox.session
def conformance(session: nox.Session) -> None:
    """Every preset (the hand-made ones, those made from released configs, the ModelOpt-quantized ones) x every
    registered backend x (float32, bfloat16), into artifacts/conformance/.

    Per preset: PRESET.json (schema reports/conformance.schema.json), PRESET.html and PRESET.junit.xml.
    A backend that cannot run here (cupy without CUDA, onnx at bf16 on the CPU) reports NOT_SUPPORTED
    with its reason; only a FAIL fails the session. `nox -s conformance -- --backend torch` narrows it.
    """
    install(session)
    out = Path("artifacts/conformance")
    out.mkdir(parents=True, exist_ok=True)
    presets = preset_names(session)
    registered = session.run("python", "-c", "from nemoh.runtime.registry import available_backends as a; "
                             "print(' '.join(sorted(a())))", silent=True).split()
    backends = ",".join(b for b in registered if not b.startswith(OWN_SESSION))
    args = list(session.posargs)
    baseline = None  # `-- --baseline DIR`: afterwards, `nemoh compare DIR artifacts/conformance` (a regression fails)
    if "--baseline" in args:
        i = args.index("--baseline")
        baseline, args = args[i + 1], args[:i] + args[i + 2:]
    update = "--update-baseline" in args  # `-- --update-baseline`: then copy the reports into baselines/conformance/
    args = [a for a in args if a != "--update-baseline"] or ["--backend", backends]
    failed = []
    for preset in presets:
        try:
            session.run("nemoh", "conformance", "--model", preset, "--dtype", "float32,bfloat16", *args,
                        "--json", str(out / f"{preset}.json"), "--html", str(out / f"{preset}.html"),
                        "--junit", str(out / f"{preset}.junit.xml"), "--no-progress")
        except nox.command.CommandFailed:
            failed.append(preset)  # keep going: every preset gets its report
    if update:
        dest = Path("baselines/conformance")
        dest.mkdir(parents=True, exist_ok=True)
        for old in dest.glob("*.json"):
            old.unlink()
        for preset in presets:
            if (out / f"{preset}.json").exists():
                (dest / f"{preset}.json").write_bytes((out / f"{preset}.json").read_bytes())
    if baseline:
        Path("artifacts/compare").mkdir(parents=True, exist_ok=True)
        try:
            session.run("nemoh", "compare", baseline, str(out), "--markdown", "artifacts/compare/conformance.md",
                        "--html", "artifacts/compare/conformance.html", "--json", "artifacts/compare/conformance.json")
        except nox.command.CommandFailed:
            failed.append(f"the comparison with {baseline} (artifacts/compare/conformance.html)")
    if failed:
        session.error(f"conformance failed on: {', '.join(failed)} (see {out}/*.html)")


@nox.session
def ray(session: nox.Session) -> None:
    """The layer-wise checks with Ray installed (the `ray` extra): tests/core/test_layerwise.py, whose local-cluster
    test (ray.init on this machine, two workers) then runs instead of skipping, and compares the merged Ray
    report with the single-process run."""
    install(session, "test,ray")
    session.run("pytest", "-q", "tests/core/test_layerwise.py", *session.posargs)


@nox.session(name="real-size")
def real_size(session: nox.Session) -> None:
    """Nemotron-H-8B-Base-8K at its real shapes (the released config.json in nemoh_core/model/releases/), random
    weights, on this machine: the checkpoint (16.2 GB of bf16 in 2 GiB shards, written tensor by tensor, kept
    in build/real-size/ between runs), then `nemoh conformance --backend torch --dtype bfloat16 --suite logits`
    with the oracle streamed layer by layer (its memory plan, peak memory and per-layer times in the JSON),
    then the layer-wise check of one traced forward. Reports in artifacts/real-size/ (or the folder given:
    `nox -s real-size -- OUT`); docs/real-size.md has the figures measured on the 2-core, 24 GiB machine."""
    install(session)
    model = Path("build/real-size/nemotron-h-8b-base-8k")
    out = Path(session.posargs[0] if session.posargs else "artifacts/real-size")
    out.mkdir(parents=True, exist_ok=True)
    if not (model / "model.safetensors.index.json").exists():
        session.run("nemoh", "make-model", "--config", "nemoh_core/model/releases/Nemotron-H-8B-Base-8K.json",
                    "--out", str(model), "--seed", "0")
    session.run("nemoh", "conformance", "--model", str(model), "--backend", "torch", "--dtype", "bfloat16",
                "--suite", "logits", "--no-progress", "--json", str(out / "conformance.json"),
                "--html", str(out / "conformance.html"))
    session.run("nemoh", "layerwise", "trace", "--model", str(model), "--backend", "torch", "--dtype", "bfloat16",
                "--out", str(out / "trace"))
    session.run("nemoh", "layerwise", "check", "--model", str(model), "--trace", str(out / "trace"),
                "--json", str(out / "layerwise.json"))


@nox.session(name="eval")
def eval_(session: nox.Session) -> None:
    """`nemoh eval` on nemoh's fixture tasks (MMLU- and GSM8K-style, offline) for the torch and onnx
    backends, into artifacts/eval/BACKEND.json. `nox -s eval -- ARGS` runs `nemoh eval ARGS` instead
    (e.g. `-- --model DIR --backend onnx --tasks mmlu,gsm8k --num-fewshot 5 --data-dir HF_DATASETS_CACHE`).
    """
    install(session)
    if session.posargs:
        session.run("nemoh", "eval", *session.posargs)
        return
    out = Path("artifacts/eval")
    out.mkdir(parents=True, exist_ok=True)
    for backend in ("torch", "onnx"):
        session.run("nemoh", "eval", "--model", "tiny-moe", "--backend", backend, "--dtype", "float32",
                    "--tasks", "nemoh_mmlu_fixture,nemoh_gsm8k_fixture", "--json", str(out / f"{backend}.json"))


@nox.session(name="cupy-emulated")
def cupy_emulated(session: nox.Session) -> None:
    """The CuPy executor on the CPU: its CUDA kernels compiled by g++ and run by the emulator
    (backends/cuda_emu.py), every kernel check and every check of the real `cupy` backend through the CuPy
    stand-in (tests/standin), slow ones included, the whole GPU test file through the stand-in, then every preset
    (those made from released configs too) x (float32, bfloat16) through every suite on `cupy-emulated`, into
    artifacts/cupy-emulated/.
    `nox -s cupy-emulated -- PRESET...` narrows the presets; `-- --standin PRESET...` runs their conformance on
    the real `cupy` backend through the stand-in instead (CupyDevice and all). Timings are the emulator's."""
    install(session)
    session.run("pytest", "-q", "-p", "no:cacheprovider", "-m", "slow or not slow",
                "tests/backends/test_cupy_emulated.py", "tests/backends/test_cupy_limits.py",
                "tests/backends/test_cupy_standin.py",
                env={"NEMOH_EMU_SCHEDULES": "2"})  # the kernel checks always compare two schedules
    # the GPU test file itself, every test of it, through the CuPy stand-in: what a GPU visit will run has run here
    # (it found three races of the tests' own before a second GPU run)
    session.run("pytest", "-q", "-p", "no:cacheprovider", "tests/backends/test_cupy_gpu.py",
                env={"NEMOH_CUPY_STANDIN": "1", "NEMOH_EMU_SCHEDULES": "1"})
    out = Path("artifacts/cupy-emulated")
    out.mkdir(parents=True, exist_ok=True)
    args = list(session.posargs)
    standin = "--standin" in args
    presets = [a for a in args if a != "--standin"] or preset_names(session)
    backend, env = ("cupy", {"PYTHONPATH": str(Path("tests/standin").resolve())}) if standin else ("cupy-emulated", {})
    for preset in presets:
        session.run("nemoh", "conformance", "--model", preset, "--backend", backend,
                    "--dtype", "float32,bfloat16", "--json", str(out / f"{preset}.{backend}.json"),
                    "--html", str(out / f"{preset}.{backend}.html"), "--no-progress", env=env)


@nox.session
def llamacpp(session: nox.Session) -> None:
    """llama.cpp's own Nemotron-H port under test, through llama-cpp-python built from source for the CPU
    (its build dominates: see docs/llamacpp.md), then its tests and the conformance of tiny-moe (or the
    presets given: `nox -s llamacpp -- tiny-nano-30b tiny-8b`) at F32 and at Q8_0 and Q4_K_M with the
    quant suite, then (without presets given) the ModelOpt presets at F32, into artifacts/llamacpp/.
    `--isolate` on purpose: a GGML_ASSERT in llama.cpp must fail its case, not end the run. A FAIL found in
    llama.cpp is a result: it does not fail the session."""
    session.install(TORCH)
    session.install("-e", ".[test,llamacpp]", env={
        "CMAKE_ARGS": "-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF",
        "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)})
    session.run("pytest", "-q", "-p", "no:cacheprovider", "tests/backends/test_llamacpp.py")
    out = Path("artifacts/llamacpp")
    out.mkdir(parents=True, exist_ok=True)
    for preset in session.posargs or ["tiny-moe"]:
        for backend in ("llamacpp", "llamacpp-q8_0", "llamacpp-q4_k_m"):
            session.run("nemoh", "conformance", "--model", preset, "--backend", backend, "--dtype", "float32",
                        "--isolate", "--json", str(out / f"{preset}.{backend}.json"),
                        "--html", str(out / f"{preset}.{backend}.html"), "--no-progress", success_codes=[0, 1])
    if session.posargs:
        return
    # the ModelOpt presets (issue 20), judged against the quantized fp64 oracle, the quant suite against the
    # original: FP8 converts (weight-only: its FAIL is a finding), NVFP4 with rows not a multiple of 64 is refused
    # by the converter (exit 3: every case NOT_SUPPORTED with its line), tiny-nvfp4-64 converts and runs NVFP4
    # weights x Q8_0 activations (its logits FAIL: a finding). ~2.5 min on 2 cores with an empty cache, most of it
    # writing the presets
    quant = session.run("python", "-c", "from nemoh.model.presets import QUANT_SPECS; print(' '.join(QUANT_SPECS))",
                        silent=True).split()
    for preset in quant:
        session.run("nemoh", "conformance", "--model", preset, "--backend", "llamacpp", "--dtype", "float32",
                    "--isolate", "--json", str(out / f"{preset}.llamacpp.json"),
                    "--html", str(out / f"{preset}.llamacpp.html"), "--no-progress", success_codes=[0, 1, 3])


#: the transformers versions the reference is tested on: the oldest the pin allows (5.17.0; 5.3.0, the first with
#: Nemotron-H, fails the conformance tests), the last that clamps dt in prefill (a known deviation,
#: nemoh/conformance/deviations.py), and the newest (None: whatever pip resolves today, as a fresh install
#: gets; .ci/run's default test run is that one)
TRANSFORMERS_VERSIONS = {"oldest": "5.17.0", "last-dt-clamp": "5.24.0", "newest": None}


@nox.session(name="transformers-range")
@nox.parametrize("which", list(TRANSFORMERS_VERSIONS))
def transformers_range(session: nox.Session, which: str) -> None:
    """The reference changes every month: the conformance tests (the known deviations against the installed
    reference, the executor against transformers, checkpoints transformers writes) on each version above.
    `nox -s transformers-range` runs all three; `nox -s "transformers-range(which='oldest')"` one."""
    install(session)
    version = TRANSFORMERS_VERSIONS[which]
    session.install(f"transformers=={version}" if version else "transformers>=5.17,<6", "--upgrade")
    session.run("python", "-c", "import transformers; print('transformers', transformers.__version__)")
    session.run("pytest", "-q", "-p", "no:cacheprovider", "tests/core/test_deviations.py",
                "tests/core/test_conformance.py", "tests/backends/test_torch_backend.py", "tests/core/test_config.py",
                *session.posargs, env={"NEMOH_CACHE": session.create_tmp()})  # presets written by this version


@nox.session(venv_backend="none")
def gpu(session: nox.Session) -> None:
    """The prepared GPU visit (tests/gpu_check.py): environment, every kernel against the oracle, the whole
    test_cupy_gpu.py, conformance of cupy and torch on every preset, nemoh-bench at Nano 9B v2 and Nano 30B-A3B
    shapes; each step under its own time limit, at most 8 files in the folder given (default artifacts/gpu).
    Runs with the interpreter nox runs on and installs nothing (a GPU machine has no package registry):
    `nox -s gpu -- OUT`. `nox -s gpu -- --dry-run OUT` runs the same steps on the CPU (CI does)."""
    import sys

    session.run(sys.executable, "tests/gpu_check.py", *(session.posargs or ["artifacts/gpu"]), external=True)


@nox.session
def quant(session: nox.Session) -> None:
    """Quantized checkpoints (issue 20): every planted quantization bug (slow ones too), the format tests, then
    conformance of the torch executor on each quantized preset at float64 (the exact meaning) and float32,
    into artifacts/quant/."""
    install(session)
    session.install("nvidia-modelopt", "requests", TORCH)  # ModelOpt quantizers, CPU PTQ + export
    session.run("pytest", "-q", "-p", "no:cacheprovider", "-m", "slow or not slow", "tests/core/test_quant.py",
                "tests/sensitivity/test_quant_sensitivity.py")
    out = Path("artifacts/quant")
    out.mkdir(parents=True, exist_ok=True)
    presets = session.run("python", "-c", "from nemoh.model.presets import QUANT_SPECS; print(' '.join(QUANT_SPECS))",
                          silent=True).split()
    for preset in session.posargs or presets:
        session.run("nemoh", "conformance", "--model", preset, "--backend", "torch", "--dtype", "float64,float32",
                    "--json", str(out / f"{preset}.json"), "--html", str(out / f"{preset}.html"), "--no-progress")


@nox.session
def fuzz(session: nox.Session) -> None:
    """The hostile-input fuzzers (tests/core/test_hostile_inputs.py: config.json, safetensors headers and
    index files through the CLI) at a large example count (NEMOH_FUZZ_EXAMPLES, default 2000)."""
    install(session)
    session.run("pytest", "-q", "tests/core/test_hostile_inputs.py", "-k", "fuzz", "-p", "no:cacheprovider",
                env={"NEMOH_FUZZ_EXAMPLES": os.environ.get("NEMOH_FUZZ_EXAMPLES", "2000")})


@nox.session(reuse_venv=False)
@nox.parametrize("extras", ["", "ref", "ref,onnx"])
def extras(session: nox.Session, extras: str) -> None:
    """Each install a user may have, in a fresh virtual environment: a missing optional package is a
    SKIPPED with the extra to install (or a one-line exit 2), never a FAIL or a traceback."""
    session.install(TORCH)
    session.install("-e", f".[{extras}]" if extras else ".")
    cache = session.create_tmp()
    out = session.run("nemoh", "conformance", "--model", "tiny-moe", "--backend", "torch", "--no-progress",
                      env={"NEMOH_CACHE": cache}, success_codes=[0, 2], silent=True)
    print(out)
    if "Traceback" in out or " FAIL " in out:
        session.error("a missing optional package showed as a failure or a traceback")
    if not extras and "nemoh[ref]" not in out:  # no transformers: the preset cannot be written
        session.error("the base install must say to pip install 'nemoh[ref]'")


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "nemoh_core", "backends", "suites", "reports", "tests", "examples", "noxfile.py")


@nox.session
def tolerances(session: nox.Session) -> None:
    """Re-measure the figures quoted in nemoh/tolerances.py."""
    install(session)
    session.run("python", "-m", "nemoh.conformance.measure_tolerances", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """nemoh-bench: the PyTorch executor against the transformers reference (docs/bench/README.md).

    `nox -s bench` measures the small CPU preset into artifacts/bench/; `nox -s bench -- ARGS` runs
    `nemoh-bench ARGS` instead (e.g. `-- --backend torch --model tiny-moe --prompt-lengths 512 2048`).
    """
    install(session)
    args = list(session.posargs)
    baseline = None  # `-- --baseline DIR_OR_JSON`: then compare the run's --json with it (a slowdown can fail)
    if "--baseline" in args:
        i = args.index("--baseline")
        baseline, args = args[i + 1], args[:i] + args[i + 2:]
    args = args or ["--backend", "torch", "--model", "cpu-small", "--prompt-lengths", "512", "2048",
                    "--context-depths", "128", "2048", "--json", "artifacts/bench/cpu-small.json",
                    "--html", "artifacts/bench/cpu-small.html"]
    session.run("nemoh-bench", *args)
    if baseline:
        if "--json" not in args:
            session.error("--baseline needs the run's --json to compare")
        Path("artifacts/compare").mkdir(parents=True, exist_ok=True)
        session.run("nemoh", "compare", baseline, args[args.index("--json") + 1], "--fail-on", "new-fail,slowdown=10",
                    "--markdown", "artifacts/compare/bench.md", "--html", "artifacts/compare/bench.html",
                    "--json", "artifacts/compare/bench.json")

"""Quantized checkpoints (issue 20): each mistake a port of ModelOpt's FP8 / NVFP4 can make
(tests/broken_backends.py QUANT_BUGS) is FAILed by the logits suite and localised to the first layer it
breaks, at float64, where the unbroken executor matches the quantized oracle to ~1e-15."""

from __future__ import annotations

import pytest
from broken_backends import QUANT_BUGS

from nemoh.conformance.runner import run_conformance


# the default run plants two (one dequantization bug, one exclusion bug); `nox -s quant` runs them all
DEFAULT = ("NibbleOrderSwapped", "ExcludedModuleQuantized")


@pytest.mark.parametrize("bug", [b if b in DEFAULT else pytest.param(b, marks=pytest.mark.slow)
                                 for b in sorted(QUANT_BUGS)])
def test_quant_bug_is_caught_and_localised(bug):
    preset, kind, ops = QUANT_BUGS[bug]
    report = run_conformance(preset, [f"broken_backends:{bug}"], ["float64"], ["logits"], progress=False,
                             deviations=False)
    fails = [r for run in report["runs"] for r in run["results"] if r["status"] == "FAIL"]
    assert fails, f"{bug}: the logits suite did not FAIL it"
    located = [r["localisation"] for r in fails if (r["localisation"] or {}).get("found")]
    assert located, f"{bug}: no failing case was localised: {[r['localisation'] for r in fails][:2]}"
    for loc in located:
        assert loc["kind"] == kind, f"{bug}: localised to {loc['kind']} layer {loc['layer']}, expected {kind}"
        assert loc["op"] in {o.format(i=loc["layer"]) for o in ops}, f"{bug}: localised to op {loc['op']}"


@pytest.mark.parametrize("preset", [p if p == "tiny-wide-nvfp4" else pytest.param(p, marks=pytest.mark.slow)
                                    for p in sorted({p for p, *_ in QUANT_BUGS.values()})])
def test_unbroken_executor_passes_on_quantized_presets(preset):
    report = run_conformance(preset, ["torch"], ["float64"], ["logits", "weights"], progress=False, deviations=False)
    assert report["summary"]["exit_code"] == 0

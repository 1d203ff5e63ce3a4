"""The harness is only worth something if it catches real bugs: each deliberately broken backend
(tests/broken_backends.py) must be FAILed by the suite that should catch it and localised to the
right layer kind and op; the unbroken executor passes the same suites."""

from __future__ import annotations

import pytest
from broken_backends import BUGS

from nemoh.conformance.runner import run_conformance


def failing(report, suite):
    return [r for run in report["runs"] for r in run["results"] if r["suite"] == suite and r["status"] == "FAIL"]


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_bug_is_caught_and_localised(bug):
    preset, suite, kind, ops = BUGS[bug]
    report = run_conformance(preset, [f"broken_backends:{bug}"], ["float32"], [suite], progress=False,
                             deviations=False)
    fails = failing(report, suite)
    assert fails, f"{bug}: suite {suite} did not FAIL it"
    assert report["summary"]["exit_code"] == 1
    located = [r["localisation"] for r in fails if (r["localisation"] or {}).get("found")]
    assert located, f"{bug}: no failing case was localised: {[r['localisation'] for r in fails][:2]}"
    for loc in located:
        assert loc["kind"] == kind, f"{bug}: localised to {loc['kind']} layer {loc['layer']}, expected {kind}"
        assert loc["op"] in {o.format(i=loc["layer"]) for o in ops}, f"{bug}: localised to op {loc['op']}"


@pytest.mark.parametrize("preset", sorted({p for p, *_ in BUGS.values()}))
def test_unbroken_executor_passes_the_same_suites(preset):
    suites = sorted({s for p, s, *_ in BUGS.values() if p == preset})
    report = run_conformance(preset, ["torch"], ["float32"], suites, progress=False, deviations=False)
    assert report["summary"]["exit_code"] == 0, [r["message"] for s in suites for r in failing(report, s)]

"""The registry of known reference deviations: versions, probes and the text that follows the measurement.

A deviation is a fact about particular transformers versions. The probes measure the installed one; these
tests make both outcomes of each measurement happen on whatever version is installed (the dt clamp of
5.15-5.24 is forced onto the installed reference), and check that the registry's versions, the probe and the
text agree. `nox -s transformers-range` runs the conformance tests on the oldest, a clamping and the newest
transformers the pin allows.
"""

from __future__ import annotations

import pytest
import torch

from nemoh.conformance import deviations as dv
from nemoh.conformance.references import Reference
from nemoh.model.config import load_config
from nemoh.model.presets import resolve_model

pytest.importorskip("transformers")
pytest.importorskip("packaging")

BY_ID = {d.id: d for d in dv.DEVIATIONS}
CLAMP = BY_ID["hf-dt-clamp-prefill-only"]


def test_registry_names_the_versions_read_off_transformers_sources():
    assert [v for v in ("5.3.0", "5.14.1", "5.15.0", "5.20.1", "5.24.0", "5.25.0", "5.30.0") if CLAMP.expected(v)] \
        == ["5.15.0", "5.20.1", "5.24.0"]
    assert CLAMP.package == "transformers" and dv.split_requirement("transformers>=5.3") == ("transformers", ">=5.3")
    for d in dv.DEVIATIONS:
        assert d.package == "transformers" and d.description.strip() and d.absent.strip()
        assert d.description != d.absent


class ForcedClamp:
    """A Reference whose shipped transformers clamps dt at time_step_min, as 5.15-5.24 do."""

    def __init__(self, ref: Reference):
        self.ref = ref

    def __getattr__(self, name):
        return getattr(self.ref, name)

    def hf(self, dtype: str, intended: bool = True):
        if intended:
            return self.ref.hf(dtype, True)
        from nemoh.oracle.reference import load_reference

        m = load_reference(self.ref.path, dtype, intended=False)
        for layer in m.model.layers:
            if hasattr(layer.mixer, "time_step_limit"):
                layer.mixer.time_step_limit = (self.ref.config.time_step_min, float("inf"))
        return m


@pytest.fixture(scope="module")
def ref() -> Reference:
    path = resolve_model("tiny-moe")
    return Reference(path, load_config(path))


def ids() -> torch.Tensor:
    return torch.randint(4, 512, (2, 40), generator=torch.Generator().manual_seed(0))


def test_the_probe_sees_the_clamp_when_the_reference_has_it(ref):
    with_clamp = dv.dt_clamp(ForcedClamp(ref), ids())
    assert dv.dt_clamp_present(with_clamp)
    assert with_clamp["shipped_vs_corrected_rel_max_abs"] > 100 * 2e-5
    assert with_clamp["shipped_vs_oracle_clamped_rel_max_abs"] < 2e-5  # the deviation is exactly the clamp
    installed = dv.dt_clamp(ref, ids())
    present = dv.dt_clamp_present(installed)
    assert present == CLAMP.expected(dv.installed_version("transformers") or "0")
    if not present:  # the installed reference takes the config's limit: shipped == corrected == intended oracle
        assert installed["shipped_vs_corrected_rel_max_abs"] == 0.0
        assert installed["shipped_vs_oracle_intended_rel_max_abs"] < 2e-5


def test_the_text_and_the_consistency_follow_the_measurement(ref, monkeypatch):
    monkeypatch.setattr(dv, "DEVIATIONS", (CLAMP,))
    version = dv.installed_version("transformers")
    assert version is not None
    (installed,) = dv.measure_all(ref, ids())
    assert installed["consistent"] is True and installed["installed"] == f"transformers {version}"
    assert installed["description"] == (CLAMP.description if installed["present"] else CLAMP.absent)
    (forced,) = dv.measure_all(ForcedClamp(ref), ids())
    assert forced["present"] is True and forced["description"] == CLAMP.description
    assert forced["consistent"] is CLAMP.expected(version)  # a clamp where the registry expects none is named
    monkeypatch.setattr(dv, "installed_version", lambda package: None)  # no transformers: nothing claimed
    (missing,) = dv.measure_all(_NoHf(ref), ids())
    assert missing["status"].startswith("not measured") and missing["present"] is None
    assert missing["expected"] is None and missing["installed"] == "transformers not installed"


class _NoHf(ForcedClamp):
    hf_unavailable = "transformers is not installed (pip install 'nemoh[ref]')"

    def hf(self, dtype: str, intended: bool = True):
        return None

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tests generate their own checkpoints: a stale or tampered user cache can't leak in."""
    old = os.environ.get("NEMOH_CACHE")
    os.environ["NEMOH_CACHE"] = str(tmp_path_factory.mktemp("nemoh-cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield
    if old is None:
        os.environ.pop("NEMOH_CACHE", None)
    else:
        os.environ["NEMOH_CACHE"] = old

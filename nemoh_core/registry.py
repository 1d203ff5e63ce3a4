"""Finding backends: the entry-point group `nemoh.backends`, or `package.module:factory`.

The built-in backends register exactly like third-party ones, in pyproject.toml:

    [project.entry-points."nemoh.backends"]
    torch = "nemoh.backends.torch_backend:TorchBackend"

A factory is anything callable with no arguments that returns an object implementing
nemoh.backend.Backend (usually the class itself).
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from .backend import Backend
from .errors import NemohError, did_you_mean

GROUP = "nemoh.backends"


def available_backends() -> dict[str, str]:
    """name -> 'module:factory' for every registered backend."""
    return {ep.name: ep.value for ep in entry_points(group=GROUP)}


def _load_factory(spec: str, what: str):
    mod_name, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise NemohError(f"backend {what}: cannot import module '{mod_name}' ({e})") from None
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise NemohError(f"backend {what}: module '{mod_name}' has no attribute '{attr}'") from None


def get_backend(name: str) -> Backend:
    """A fresh backend instance for a registered name or a `package.module:factory` spec."""
    if ":" in name:
        factory = _load_factory(name, f"'{name}'")
    else:
        registered = available_backends()
        if name not in registered:
            raise NemohError(did_you_mean("backend", name, registered))
        factory = _load_factory(registered[name], f"'{name}' (entry point {registered[name]})")
    backend = factory()
    missing = [m for m in ("available", "supports", "load", "new_state", "copy_state", "forward",
                           "export_state", "import_state", "read_param", "describe") if not hasattr(backend, m)]
    if missing or not isinstance(getattr(backend, "name", None), str):
        raise NemohError(f"backend '{name}' does not implement the nemoh backend protocol "
                         f"(missing: {', '.join(missing) or 'name'}); see nemoh.backend.Backend")
    return backend

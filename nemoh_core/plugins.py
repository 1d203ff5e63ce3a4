"""What the core finds at run time instead of importing: entry-point groups.

The core never imports `nemoh.backends`, `nemoh.suites` or `nemoh.reports`; they, and any third-party
package, register here through their pyproject.toml, exactly like nemoh's own:

    [project.entry-points."nemoh.backends"]     name -> a factory returning a backend (nemoh.runtime.backend)
    [project.entry-points."nemoh.suites"]       name -> a nemoh.conformance.case.Suite
    [project.entry-points."nemoh.renderers"]    name -> render(report: dict) -> str   (HTML pages)
    [project.entry-points."nemoh.commands"]     name -> register(subparsers): adds a `nemoh NAME` command

`package.module:attr` specs work wherever a name does, so an unregistered module can be tried too.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from nemoh.errors import NemohError, did_you_mean

BACKENDS, SUITES, RENDERERS, COMMANDS = "nemoh.backends", "nemoh.suites", "nemoh.renderers", "nemoh.commands"
_KIND = {BACKENDS: "backend", SUITES: "suite", RENDERERS: "renderer", COMMANDS: "command"}


def registered(group: str) -> dict[str, str]:
    """name -> 'module:attr' for every entry point of `group`."""
    return {ep.name: ep.value for ep in entry_points(group=group)}


def load_spec(spec: str, what: str) -> Any:
    """The object named by 'package.module:attr'; a one-line NemohError when it can't be had."""
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr or not all(p.isidentifier() for p in [*mod_name.split("."), *attr.split(".")]):
        raise NemohError(f"{what}: '{spec}' is not of the form package.module:attribute")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise NemohError(f"{what}: cannot import module '{mod_name}' ({e})") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise NemohError(f"{what}: module '{mod_name}' has no attribute '{attr}'") from None
    return obj


def load(group: str, name: str) -> Any:
    """The object registered as `name` in `group`, or named by a `module:attr` spec."""
    kind = _KIND.get(group, group)
    if ":" in name:
        return load_spec(name, f"{kind} '{name}'")
    found = registered(group)
    if name not in found:
        raise NemohError(did_you_mean(kind, name, found))
    return load_spec(found[name], f"{kind} '{name}' (entry point {found[name]})")


def load_all(group: str) -> dict[str, Any]:
    """Every object registered in `group`, by name."""
    return {name: load(group, name) for name in sorted(registered(group))}

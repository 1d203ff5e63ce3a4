"""The house's layout: the core never reaches upward into backends/suites/reports, and no import cycle.

The import graph is read from the sources (every `import`, module-level or inside a function), so
a lazy import that goes upward or closes a cycle is caught as surely as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: source folder -> the package it installs as (pyproject.toml's package-dir)
PACKAGES = {"nemoh_core": "nemoh", "backends": "nemoh.backends", "suites": "nemoh.suites", "reports": "nemoh.reports"}
UPWARD = ("nemoh.backends", "nemoh.suites", "nemoh.reports")
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for folder, pkg in PACKAGES.items():
        for p in (ROOT / folder).rglob("*.py"):
            rel = p.relative_to(ROOT / folder).with_suffix("")
            parts = [] if rel.parts == ("__init__",) else [x for x in rel.parts if x != "__init__"]
            if folder == "nemoh_core" and parts and parts[0] in ("backends", "suites", "reports"):
                continue
            out[".".join([pkg, *parts])] = p
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The nemoh modules `name` imports; `from pkg import sub` counts as importing pkg.sub when sub is a module."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            subs = {f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in known}
            found |= subs or {mod}
            if subs and len(subs) < len(node.names):
                found.add(mod)
    return {m for m in found if m == "nemoh" or m.startswith("nemoh.")}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: {i for i in _imports(m, p, known) if i in known and i != m} for m, p in mods.items()}


def test_the_core_never_imports_backends_suites_or_reports():
    graph = _graph()
    bad = sorted(f"{m} imports {i}" for m, deps in graph.items() if not m.startswith(UPWARD)
                 for i in deps if i.startswith(UPWARD))
    assert not bad, bad
    assert any(deps for deps in graph.values())  # the graph was really read


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))


def test_the_cycle_check_can_fail(tmp_path, monkeypatch):
    """A graph with a cycle is reported (the check above is not vacuous)."""
    fake = {"nemoh.a": {"nemoh.b"}, "nemoh.b": {"nemoh.a"}}
    monkeypatch.setattr(__import__(__name__), "_graph", lambda: fake)
    try:
        test_no_import_cycle()
    except AssertionError as e:
        assert "nemoh.a -> nemoh.b -> nemoh.a" in str(e)
    else:
        raise AssertionError("a cycle went unnoticed")


def test_lazy_imports_are_in_the_graph():
    """A function-level import counts: runtime.session imports presets lazily."""
    assert "nemoh.model.presets" in _graph()["nemoh.runtime.session"]


def test_every_subpackage_of_the_core_has_a_docstring_saying_its_job():
    for init in (ROOT / "nemoh_core").glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and len(doc.split()) >= 8, f"{init.parent.name}/__init__.py should say what the subpackage is for"


def test_no_long_file_without_a_reason():
    """Files over ~500 lines say at their top why they are not split."""
    long = []
    for folder in (*PACKAGES, "tests", "examples"):
        for p in (ROOT / folder).rglob("*.py"):
            lines = p.read_text(encoding="utf-8").splitlines()
            if len(lines) > MAX_LINES and not any("Why one file" in line for line in lines[:40]):
                long.append(f"{p.relative_to(ROOT)} ({len(lines)} lines)")
    assert not long, long

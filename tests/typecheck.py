"""The type check of .ci/run: mypy over the installed package `nemoh` as the interpreter sees it.

The repository keeps the package in four folders that install under one name (nemoh_core/ is `nemoh`,
backends/ is `nemoh.backends`, suites/ and reports/ likewise: pyproject.toml's package-dir). mypy cannot follow
that mapping through an editable install, so every `from nemoh.x import y` would be unresolved and typed Any,
and a wrong attribute on a class from another module would go unreported. This script lays the package out as
it is installed, as a tree of symbolic links under build/typecheck/, and runs mypy on it with the settings of
[tool.mypy] in pyproject.toml. Findings name the files through that tree (build/typecheck/nemoh/backends/x.py is
backends/x.py).

    python tests/typecheck.py [MYPY ARGS]      # exit code: mypy's
"""

from __future__ import annotations

import shutil
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREE = ROOT / "build" / "typecheck"


def package_dirs() -> dict[str, Path]:
    """`nemoh.x` -> its folder, from pyproject.toml's [tool.setuptools] package-dir."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {name: ROOT / folder for name, folder in cfg.items()}


def build_tree() -> Path:
    """build/typecheck/nemoh/... : the installed layout, as symbolic links to the repository's files."""
    if TREE.exists():
        shutil.rmtree(TREE)
    dirs = package_dirs()
    for name, folder in sorted(dirs.items()):
        dest = TREE.joinpath(*name.split("."))
        dest.mkdir(parents=True, exist_ok=True)
        nested = {d.name for n, d in dirs.items() if n.startswith(name + ".") and n.count(".") == name.count(".") + 1}
        for entry in folder.iterdir():
            if entry.name.startswith((".", "__pycache__")) or entry.name in nested:
                continue
            if entry.is_dir() and not (entry / "__init__.py").exists():
                continue  # data folders (kernels, templates, fixtures)
            if entry.is_file() and entry.suffix != ".py":
                continue
            (dest / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    return TREE


def main(argv: list[str]) -> int:
    from mypy import api

    build_tree()
    out, err, code = api.run(["--config-file", str(ROOT / "pyproject.toml"), "-p", "nemoh", *argv])
    sys.stdout.write(out.replace(str(TREE) + "/", "").replace("build/typecheck/", ""))
    sys.stderr.write(err)
    return code


if __name__ == "__main__":
    import os

    os.chdir(ROOT)
    os.environ["MYPYPATH"] = str(TREE)
    raise SystemExit(main(sys.argv[1:]))

"""The type checker of .ci/run (mypy over nemoh_core, backends, suites, reports) catches what it is there for.

A GPU-only path once called `self.dev.synchronize()` on a class that has no `dev`: the bug cost a GPU
visit, and mypy reports it on a CPU in seconds. Here mypy runs with the project's own configuration on
one tiny planted module (never on the whole tree: .ci/run does that), and every `# type: ignore` in the
checked folders is held to naming its error code and its reason.
"""

from __future__ import annotations

import io
import re
import textwrap
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECKED = ("nemoh_core", "backends", "suites", "reports")

# an unannotated method, as in the CuPy seam: only check_untyped_defs makes mypy look inside it
PLANTED = '''
class Device:
    def synchronize(self) -> None:
        pass


class Runner:
    def __init__(self, device: Device) -> None:
        self.device = device

    def timed(self, fn):
        fn()
        self.dev.synchronize()  # the bug: the attribute is `device`
        return 1
'''


def _mypy(tmp_path: Path, source: str) -> tuple[str, int]:
    """mypy with the project's configuration on one module; its own cache, so the second run is quick."""
    api = pytest.importorskip("mypy.api", reason="mypy is not installed: pip install 'nemoh[test]'")
    f = tmp_path / "planted.py"
    f.write_text(textwrap.dedent(source))
    out, err, rc = api.run([str(f), "--config-file", str(ROOT / "pyproject.toml"),
                            "--cache-dir", str(tmp_path / ".mypy_cache")])
    return out + err, rc


def test_mypy_reports_a_planted_attribute_error(tmp_path: Path) -> None:
    out, rc = _mypy(tmp_path, PLANTED)
    assert rc == 1, out
    assert re.search(r'planted\.py:13: error: "Runner" has no attribute "dev".*\[attr-defined\]', out), out
    # and the fixed module is clean: the error above came from the bug, not from the set-up
    out, rc = _mypy(tmp_path, PLANTED.replace("self.dev.", "self.device."))
    assert rc == 0, out


IGNORE = re.compile(r"#\s*type:\s*ignore\b(?P<codes>\[[^\]]*\])?(?P<rest>.*)")
CODES = re.compile(r"\[[a-z][a-z0-9-]*(,\s*[a-z][a-z0-9-]*)*\]")
REASON = re.compile(r"\s*#\s*\S.*")


def _ignores(path: Path) -> list[tuple[int, str]]:
    """(line, comment) of every `# type: ignore` comment: tokens, so a string that mentions one is not one."""
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline):
        if tok.type == tokenize.COMMENT and IGNORE.search(tok.string):
            out.append((tok.start[0], tok.string))
    return out


def _well_formed(comment: str) -> bool:
    """`# type: ignore[code, ...]  # reason`: at least one error code, then a reason comment."""
    m = IGNORE.search(comment)
    return bool(m and m["codes"] and CODES.fullmatch(m["codes"]) and REASON.fullmatch(m["rest"]))


def test_every_type_ignore_names_its_code_and_reason() -> None:
    files = [p for d in CHECKED for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 20, "the checked folders moved: update CHECKED"
    bad = [f"{p.relative_to(ROOT)}:{line}: {comment.strip()}"
           for p in files for line, comment in _ignores(p) if not _well_formed(comment)]
    assert not bad, ("every `# type: ignore` needs an error code and a reason, as "
                     "`# type: ignore[attr-defined]  # cupy ships no stubs`:\n" + "\n".join(bad))


@pytest.mark.parametrize("comment, ok", [
    ("# type: ignore[arg-type]  # transformers' wrapped .to binds no self", True),
    ("# type: ignore[union-attr, attr-defined]  # why", True),
    ("# type: ignore", False),
    ("# type: ignore[arg-type]", False),
    ("# type: ignore  # no code", False),
    ("# type: ignore[]  # empty code", False),
    ("# type: ignore[arg-type]  #", False),
])
def test_the_ignore_rule_can_fail(comment: str, ok: bool, tmp_path: Path) -> None:
    """A bare ignore, or one without a reason, is refused; a string that only mentions one is not seen."""
    f = tmp_path / "m.py"
    f.write_text(f"x = 1  {comment}\ns = '# type: ignore'  # a string, not a comment\n")
    ((line, found),) = _ignores(f)
    assert line == 1
    assert _well_formed(found) is ok

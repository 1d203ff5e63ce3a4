"""Writing reports: JSON (the source of truth) and HTML (rendered from the JSON alone by a renderer
registered under the `nemoh.renderers` entry points; nemoh's own live in nemoh.reports).

Every file is written to a temporary name in the same folder and renamed into place, so an
interrupted run never leaves a half-written report over a good one, and no temporary file is left
behind on any failure. Reports get the mode a plain `open(path, "w")` would give (0666 less the
umask), so a CI collector running as another user can read them.

`check_output_paths` is run by every command before its (possibly long) run: each output path must
be a file name in a writable directory, not a directory, not the same file as another output, and
never an existing symlink, device, FIFO or socket (a report never replaces one: as root,
`--json /dev/full` used to replace the device node with a regular file).
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from nemoh import plugins
from nemoh.errors import NemohError


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _label(option: str | None, path: Path) -> str:
    return f"{option} {path}" if option else str(path)


def _check_target(path: Path, option: str | None = None) -> None:
    """An existing `path` must be a regular file (not followed if a symlink)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise NemohError(f"{_label(option, path)}: cannot be checked ({e.strerror})") from None
    if stat.S_ISLNK(st.st_mode):
        raise NemohError(f"{_label(option, path)}: is a symbolic link; reports never replace one "
                         "(give the real file path)")
    if stat.S_ISDIR(st.st_mode):
        raise NemohError(f"{_label(option, path)}: is a directory, expected a file path")
    if not stat.S_ISREG(st.st_mode):
        what = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file")
        raise NemohError(f"{_label(option, path)}: is {what}; reports are only written to regular files")


def _check_dir(d: Path, what: str, create: bool) -> None:
    """`d` is (or, with `create`, can be made as) a writable directory."""
    probe = d
    while not probe.exists():
        if not create:
            raise NemohError(f"{d}: no such directory for {what}")
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise NemohError(f"{probe}: is not a directory, so it cannot hold {what}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise NemohError(f"{probe}: directory is not writable, so it cannot hold {what}")
    if probe == d:  # definitive (read-only file systems, ACLs): create and remove a probe file
        try:
            fd, tmp = tempfile.mkstemp(prefix=".nemoh-probe.", dir=d)
            os.close(fd)
            os.unlink(tmp)
        except OSError as e:
            raise NemohError(f"{d}: cannot write {what} there ({e.strerror})") from None


def check_output_paths(paths: Mapping[str, Any] | Iterable[Any], *, create_dirs: bool = False) -> list[Path]:
    """Check report paths before a run; the paths given (None entries dropped), as Paths.

    `paths` maps an option name (`--json`) to its path, or is a plain iterable of paths.
    `create_dirs`: a missing parent folder is allowed when it can be created (it is then created).
    Raises NemohError naming the option and path at fault.
    """
    items = list(paths.items()) if isinstance(paths, Mapping) else [(None, p) for p in paths]
    out: list[Path] = []
    seen: dict[str, str] = {}
    for option, p in items:
        if p is None:
            continue
        p = Path(p)
        if str(p) in ("", ".") or p.name in ("", ".", ".."):
            raise NemohError(f"{_label(option, p)}: expected a file path")
        _check_target(p, option)
        _check_dir(p.parent, f"the output file {p.name}" + (f" ({option})" if option else ""), create_dirs)
        key = os.path.normcase(os.path.join(os.path.realpath(p.parent), p.name))
        if key in seen:
            raise NemohError(f"{_label(option, p)}: the same file as {seen[key]}; give each output its own path")
        seen[key] = _label(option, p)
        out.append(p)
    if create_dirs:
        for p in out:
            try:
                p.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise NemohError(f"{p.parent}: cannot create the directory ({e.strerror})") from None
    return out


def check_output_dir(path: Any, option: str | None = None) -> Path:
    """A directory to write into (created if missing): not an existing file, symlink or device."""
    p = Path(path)
    if os.path.lexists(p) and not p.is_dir():
        _check_target(p, option)  # a symlink, device or FIFO: name it
        raise NemohError(f"{_label(option, p)}: exists and is not a directory")
    _check_dir(p, "the output files" + (f" ({option})" if option else ""), create=True)
    return p


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` via a temporary file renamed into place (mode 0666 & ~umask).

    Refuses to replace anything but a regular file; an OSError (disk full, permissions) is a
    NemohError naming the file, and the temporary file is always removed.
    """
    path = Path(path)
    _check_target(path)
    data = text.encode("utf-8")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.write(data)
        _check_target(path)  # still not a device, FIFO or link at the moment it is replaced
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise NemohError(f"{path}: cannot write the report ({e.strerror or e})") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def write_json(report: dict[str, Any], path: Path) -> None:
    atomic_write(path, json.dumps(report, indent=1, allow_nan=False) + "\n")


def write_html(report: dict[str, Any], path: Path, renderer: str) -> None:
    """Render `report` with the renderer registered as `renderer` (e.g. 'conformance-html')."""
    atomic_write(path, plugins.load(plugins.RENDERERS, renderer)(report))

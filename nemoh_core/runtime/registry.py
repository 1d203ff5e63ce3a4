"""Finding backends: the entry-point group `nemoh.backends`, or `package.module:factory`.

The built-in backends register exactly like third-party ones, in pyproject.toml:

    [project.entry-points."nemoh.backends"]
    torch = "nemoh.backends.torch_backend:TorchBackend"

A factory is anything callable with no arguments that returns an object implementing
nemoh.runtime.backend.Backend (usually the class itself, often a subclass of BackendBase).
"""

from __future__ import annotations

import contextlib
import io
import sys

from nemoh import plugins
from nemoh.errors import NemohError
from nemoh.runtime.backend import Backend, protocol_methods


def available_backends() -> dict[str, str]:
    """name -> 'module:factory' for every registered backend."""
    return plugins.registered(plugins.BACKENDS)


def get_backend(name: str) -> Backend:
    """A fresh backend instance for a registered name or a `package.module:factory` spec."""
    if not name.strip():
        raise NemohError("empty backend name; give a registered name or package.module:factory")
    factory = plugins.load(plugins.BACKENDS, name)
    if not callable(factory):
        raise NemohError(f"backend '{name}': {factory!r} is not callable (expected a backend class or factory)")
    argv, said = sys.argv, io.StringIO()
    try:
        # a command-line `main` given as a factory (`nemoh.cli:main`) must not re-read this run's
        # arguments, and what a factory prints is held back until it has proven to be a backend
        sys.argv = [name]
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            backend = factory()
    except SystemExit as e:  # e.g. `builtins:exit`: a factory must not end the run (nor pass it)
        raise NemohError(f"backend '{name}': its factory {_name(factory)} exited (SystemExit {e.code!r}) "
                         "instead of returning a backend") from None
    except NemohError:
        raise
    except ModuleNotFoundError as e:
        hint = optional_hint(e.name)
        raise NemohError(f"backend '{name}': needs the module '{e.name}', which is not installed"
                         f"{f' ({hint})' if hint else ''}") from None
    except Exception as e:
        first = (str(e).splitlines() or [""])[0]
        raise NemohError(f"backend '{name}': its factory {_name(factory)} raised {type(e).__name__}: {first}") from None
    finally:
        sys.argv = argv
    if backend is None or isinstance(backend, (str, bytes, int, float, bool, list, tuple, dict)):
        raise NemohError(f"backend '{name}': its factory {_name(factory)} returned {type(backend).__name__}, "
                         "not a backend; see nemoh.runtime.backend.Backend")
    missing = [m for m in protocol_methods() if not callable(getattr(backend, m, None))]
    if missing or not isinstance(getattr(backend, "name", None), str):
        raise NemohError(f"backend '{name}' does not implement the nemoh backend protocol "
                         f"(missing: {', '.join(missing) or 'name'}); see nemoh.runtime.backend.Backend")
    sys.stderr.write(said.getvalue())
    return backend


def _name(factory) -> str:
    qual = factory.__qualname__ if isinstance(factory, type) or hasattr(factory, "__code__") else None
    return qual or f"(a {type(factory).__name__} object)"


#: optional packages (top-level module -> the pip extra that installs it); pyproject.toml's extras
OPTIONAL_MODULES = {
    "transformers": "ref", "tokenizers": "ref",
    "onnx": "onnx", "onnxruntime": "onnx",
    "cupy": "gpu", "cupy_backends": "gpu", "nvidia": "gpu",
    "lm_eval": "eval", "accelerate": "eval",
    "matplotlib": "bench",
    "hypothesis": "test", "jsonschema": "test",
}


def optional_hint(module: str | None) -> str:
    """"pip install 'nemoh[ref]'" for a missing optional module, "" when it is not one of nemoh's extras."""
    root = (module or "").split(".")[0]
    extra = OPTIONAL_MODULES.get(root)
    return f"pip install 'nemoh[{extra}]'" if extra else ""

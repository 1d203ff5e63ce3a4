"""Evaluations through lm-eval: `nemoh eval` (MMLU, GSM8K and nemoh's fixture tasks, offline only) and
`nemoh lm-eval` (lm-eval's own command line with the `nemoh` model registered).

Nothing here downloads: lm-eval runs with HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 (`nemoh lm-eval`
keeps values the caller set explicitly), and `nemoh eval` checks that every dataset a task reads is in
the local Hugging Face datasets cache before it starts.
lm_eval is imported only inside functions, so `import nemoh.eval.tasks` stays light.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

from nemoh import display
from nemoh.errors import NemohError, did_you_mean

SCHEMA = "nemoh-eval/1"

#: nemoh's own offline tasks (lm-eval YAMLs + JSON lines), for `--include_path`
FIXTURE_DIR = Path(str(files("nemoh.eval") / "fixtures"))
FIXTURE_TASKS = ("nemoh_mmlu_fixture", "nemoh_gsm8k_fixture")
#: lm-eval's standard tasks `nemoh eval` runs, and where their YAMLs are inside lm_eval/tasks
STANDARD_TASKS = {"mmlu": "mmlu/default", "gsm8k": "gsm8k/gsm8k.yaml"}
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def _need_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise NemohError("lm-eval is not installed: pip install 'nemoh[eval]'") from None


@contextlib.contextmanager
def offline(data_dir: Path | None = None, *, force: bool = True) -> Iterator[None]:
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE on for the duration (with force=False, only where the caller
    has not set them), and the datasets cache at `data_dir` if given. Libraries read these at import,
    so already-imported `datasets` and `huggingface_hub` get the same values on their config modules."""
    with contextlib.suppress(ImportError):  # imported first, with the caller's settings, so that the
        import datasets  # noqa: F401          # values set below are undone on the way out
        import huggingface_hub  # noqa: F401
    env = {k: "1" if force else os.environ.get(k, "1") for k in OFFLINE_ENV}
    if data_dir is not None:
        env["HF_DATASETS_CACHE"] = str(data_dir)
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    patched: list[tuple[Any, str, Any]] = []

    def patch(module: str, attr: str, value: Any) -> None:
        mod = sys.modules.get(module)
        if mod is not None and hasattr(mod, attr):
            patched.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, value)

    on = lambda k: os.environ[k].strip().upper() in ("1", "ON", "YES", "TRUE")  # noqa: E731
    patch("datasets.config", "HF_HUB_OFFLINE", on("HF_HUB_OFFLINE"))
    patch("datasets.config", "HF_DATASETS_OFFLINE", on("HF_DATASETS_OFFLINE"))
    patch("huggingface_hub.constants", "HF_HUB_OFFLINE", on("HF_HUB_OFFLINE"))
    if data_dir is not None:
        patch("datasets.config", "HF_DATASETS_CACHE", Path(data_dir))
    try:
        yield
    finally:
        for mod, attr, old in reversed(patched):
            setattr(mod, attr, old)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def quiet_lm_eval(progress: bool = False) -> Iterator[None]:
    """lm-eval's chatter off for the duration: its warnings about this setup (a model passed as an
    object, few-shot overridden, `pretrained` not a string), its progress bars unless `progress` and
    stderr is a terminal (it passes `disable=False` to tqdm explicitly, so only replacing its tqdm
    stops them), the datasets
    library's split-generation bars, and `git describe` printing "fatal: not a git repository"
    (lm-eval asks git for its own commit; nemoh records its commit in the report's environment)."""
    import tqdm as tqdm_mod

    from nemoh.environment import git_commit

    with contextlib.suppress(ImportError):  # the modules that draw bars, imported now so they can be patched
        import lm_eval.api.model  # noqa: F401
        import lm_eval.api.task  # noqa: F401
        import lm_eval.evaluator  # noqa: F401
        import lm_eval.models.huggingface  # noqa: F401

    def silent_tqdm(*args: Any, **kw: Any):
        kw["disable"] = True
        return tqdm_mod.tqdm(*args, **kw)

    loggers = [logging.getLogger(n) for n in ("lm-eval", "lm_eval", "datasets", "accelerate")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    patched: list[tuple[Any, str, Any]] = []
    bars = progress and sys.stderr.isatty()
    mods: list[tuple[str, Any]] = list(sys.modules.items())  # lm-eval's modules: attributes patched by name
    for name, mod in mods:
        if name.startswith("lm_eval") and mod is not None:
            if not bars and getattr(mod, "tqdm", None) is tqdm_mod.tqdm:
                patched.append((mod, "tqdm", mod.tqdm))
                mod.tqdm = silent_tqdm
            if hasattr(mod, "get_git_commit_hash"):
                patched.append((mod, "get_git_commit_hash", mod.get_git_commit_hash))
                mod.get_git_commit_hash = git_commit
    ds_bars = None
    with contextlib.suppress(ImportError):
        from datasets.utils import logging as ds_logging

        ds_bars = ds_logging.is_progress_bar_enabled()
        ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        for mod, attr, old in reversed(patched):
            setattr(mod, attr, old)
        for log, level in zip(loggers, levels):
            log.setLevel(level)
        if ds_bars:
            ds_logging.enable_progress_bar()


# ----------------------------------------------------------------------------------------------
# Which datasets a standard task reads, and whether they are here
# ----------------------------------------------------------------------------------------------

def _read_yaml(path: Path) -> dict[str, Any]:
    """A task YAML with `include:` followed and lm-eval's `!function` tags kept as strings."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: str(node.value))
    cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader) or {}
    inc = cfg.pop("include", None)
    if inc:
        base = _read_yaml(path.parent / inc)
        base.update(cfg)
        cfg = base
    return cfg


def task_datasets(task: str) -> list[tuple[str, str | None]]:
    """(dataset_path, dataset_name) of every leaf of lm-eval's standard `task`, from its own YAMLs."""
    import lm_eval

    root = Path(lm_eval.__file__).parent / "tasks" / STANDARD_TASKS[task]
    yamls = sorted(root.glob(f"{task}_*.yaml")) if root.is_dir() else [root] if root.is_file() else []
    out = []
    for y in yamls:
        cfg = _read_yaml(y)
        if cfg.get("dataset_path"):
            out.append((cfg["dataset_path"], cfg.get("dataset_name")))
    if not out:
        raise NemohError(f"cannot find lm-eval's task files for '{task}' under {root} "
                         f"(lm-eval {lm_eval.__version__}); nemoh eval knows lm-eval 0.4's layout")
    return out


def missing_datasets(task: str) -> tuple[list[tuple[str, str | None]], str]:
    """The datasets of `task` that cannot be loaded offline, and the first reason. Call inside offline()."""
    import datasets

    missing, reason = [], ""
    for path, name in task_datasets(task):
        try:
            datasets.load_dataset_builder(path, name)
        except Exception as e:  # noqa: BLE001 - whatever the cause, it cannot be read offline
            missing.append((path, name))
            reason = reason or f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return missing, reason


def check_available(tasks: Sequence[str], data_dir: Path | None) -> None:
    """Raise a NemohError naming the first standard task whose data are not in the local cache."""
    import datasets

    cache = Path(data_dir) if data_dir is not None else Path(datasets.config.HF_DATASETS_CACHE)
    for task in tasks:
        if task not in STANDARD_TASKS:
            continue
        missing, reason = missing_datasets(task)
        if missing:
            total = len(task_datasets(task))
            names = ", ".join(f"{p}:{n}" if n else p for p, n in missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise NemohError(
                f"the data of lm-eval task '{task}' are not available offline: {len(missing)} of {total} datasets "
                f"({names}) are not in the Hugging Face datasets cache {cache} ({reason}). nemoh never downloads: "
                f"run lm-eval's '{task}' once on a machine with network access and copy its datasets cache "
                f"(HF_DATASETS_CACHE, default ~/.cache/huggingface/datasets), then pass --data-dir DIR")


# ----------------------------------------------------------------------------------------------
# nemoh eval
# ----------------------------------------------------------------------------------------------

def task_manager(include_defaults: bool = True):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(FIXTURE_DIR), include_defaults=include_defaults)


def _leaves(name: str, group_subtasks: dict[str, list[str]]) -> list[str]:
    subs = group_subtasks.get(name) or []
    return [name] if not subs else [leaf for s in subs for leaf in _leaves(s, group_subtasks)]


def summarize(res: dict[str, Any], requested: Sequence[str], limit: float | None,
              max_gen_toks: int | None) -> dict[str, Any]:
    """lm-eval's results -> per requested task: version, samples evaluated / in the test set, few-shot
    count, every metric with its standard error, and whether it may be quoted as a benchmark result."""
    groups = res.get("group_subtasks", {})
    n_samples = res.get("n-samples", {})
    out = {}
    for task in requested:
        leaves = _leaves(task, groups)
        n = sum(int(n_samples.get(t, {}).get("effective", 0)) for t in leaves)
        n_total = sum(int(n_samples.get(t, {}).get("original", 0)) for t in leaves)
        row = res.get("results", {}).get(task, {})
        metrics = {}
        for key, value in row.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, filt = key.split(",", 1)
            stderr = row.get(f"{metric}_stderr,{filt}")
            label = metric if filt == "none" else f"{metric} ({filt})"
            metrics[label] = {"value": value, "stderr": stderr if isinstance(stderr, (int, float)) else None}
        fewshot = sorted({res.get("configs", {}).get(t, {}).get("num_fewshot") for t in leaves}, key=str)
        why = []
        if task in FIXTURE_TASKS:
            why.append("nemoh's fixture data")
        if limit is not None or n < n_total:
            why.append(f"n={n} of {n_total} (--limit {limit})")
        generates = any(res.get("configs", {}).get(t, {}).get("output_type") == "generate_until" for t in leaves)
        if max_gen_toks is not None and generates:
            why.append(f"--max-gen-toks {max_gen_toks} changes the task")
        out[task] = {
            "version": res.get("versions", {}).get(task),
            "subtasks": len(leaves) if task in groups else 0,
            "n": n, "n_test_set": n_total, "limit": limit,
            "num_fewshot": fewshot[0] if len(fewshot) == 1 else fewshot,
            "metrics": metrics,
            "benchmark_result": not why,
            "warning": f"{task}: {'; '.join(why)} - not a benchmark result" if why else "",
        }
    return out


def run_eval(model: str, backend: str, tasks: Sequence[str], *, dtype: str | None = None, device: str | None = None,
             limit: float | None = None, num_fewshot: int | None = None, data_dir: Path | None = None,
             batch_size: int = 8, max_gen_toks: int | None = None, argv: list[str] | None = None) -> dict[str, Any]:
    _need_lm_eval()
    known = (*STANDARD_TASKS, *FIXTURE_TASKS)
    for t in tasks:
        if t not in known:
            raise NemohError(did_you_mean("eval task", t, known) + " (any other lm-eval task: nemoh lm-eval)")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise NemohError(f"--data-dir {data_dir}: no such directory")
    if limit is not None and limit <= 0:
        raise NemohError(f"--limit {limit}: must be positive")
    if limit is not None and float(limit).is_integer():
        limit = int(limit)  # lm-eval reads a limit below 1.0 as a fraction of the test set
    with offline(data_dir):
        check_available(tasks, data_dir)
        import lm_eval

        from nemoh.environment import environment
        from nemoh.eval.lm_eval_model import NemohLM

        lm = NemohLM(pretrained=model, backend=backend, dtype=dtype, device=device, batch_size=batch_size)
        tm = task_manager(include_defaults=any(t in STANDARD_TASKS for t in tasks))
        with quiet_lm_eval(progress=True):  # a real MMLU run takes a while: its bars on a terminal
            res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                      task_manager=tm, log_samples=False,
                                      gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks else None)
    cfg = res.get("config", {})
    seeds = {k: cfg.get(k) for k in ("random_seed", "numpy_seed", "torch_seed", "fewshot_seed")}
    return {
        "schema": SCHEMA,
        "model": {"name": model, **lm.get_model_info()["nemoh"]},
        "lm_eval": {"version": lm_eval.__version__, "limit": limit, "num_fewshot": num_fewshot,
                    "max_gen_toks": max_gen_toks, "data_dir": str(data_dir) if data_dir else None,
                    "versions": res.get("versions", {}), "n-samples": res.get("n-samples", {}),
                    "results": res.get("results", {})},
        "seeds": seeds,
        "environment": environment(argv, seeds),
        "tasks": summarize(res, tasks, limit, max_gen_toks),
    }


def print_report(report: dict[str, Any]) -> None:
    m = report["model"]
    print(f"{m['name']}  backend={m['backend']}  dtype={m['dtype']}  lm-eval {report['lm_eval']['version']}")
    print(f"  {'task':<22} {'version':>7} {'n':>7} {'shots':>5}  {'metric':<30} {'value':>8} {'stderr':>8}")
    for task, t in report["tasks"].items():
        first = True
        for label, v in t["metrics"].items():
            head = (f"  {task:<22} {str(t['version']):>7} {t['n']:>7} {str(t['num_fewshot']):>5}" if first
                    else f"  {'':<22} {'':>7} {'':>7} {'':>5}")
            print(f"{head}  {label:<30} {display.num(v['value'], 4):>8} {display.num(v['stderr'], 4):>8}")
            first = False
    for t in report["tasks"].values():
        if t["warning"]:
            print(f"WARNING: {t['warning']}")


# ----------------------------------------------------------------------------------------------
# nemoh lm-eval: lm-eval's command line, unchanged, with `nemoh` registered
# ----------------------------------------------------------------------------------------------

def lm_eval_cli(args: Sequence[str]) -> int:
    """Run lm-eval's command line on `args`; its exit status (0, or what it exits with)."""
    _need_lm_eval()
    from lm_eval.__main__ import cli_evaluate

    import nemoh.eval.lm_eval_model  # noqa: F401  (registers the `nemoh` model: the import is the registration)
    saved = sys.argv
    sys.argv = ["lm-eval", *args]
    try:
        with offline(force=False):  # `HF_DATASETS_OFFLINE=0 nemoh lm-eval ...` lets lm-eval download
            cli_evaluate()
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return int(e.code or 0)
        print(e.code, file=sys.stderr)
        return 1
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":  # `python -m nemoh.eval.tasks`: the fixture tasks' folder, for --include_path
    print(FIXTURE_DIR)

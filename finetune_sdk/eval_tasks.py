"""lm-evaluation-harness tasks found offline: task files with local data, standard tasks from the datasets cache.

Every problem is one line before any model loads: lm-eval missing, a task file that is not one, a local data file
that does not exist (named with the task file and field), an unknown task name (with the closest names), or a
standard task whose dataset is not in the datasets cache while the Hub can't be reached (with how to fetch it).
"""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path
from typing import Any

from finetune_sdk.errors import ConfigError

#: Error class names of ``datasets``/``huggingface_hub``/``requests`` that mean "needs the network".
OFFLINE_ERRORS = ("ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError", "DatasetNotFoundError",
                  "HfHubHTTPError", "ConnectTimeout", "MaxRetryError", "OSError")


def require_lm_eval() -> str:
    """lm-eval's version, or a :class:`ConfigError` saying how to install it."""
    try:
        return metadata.version("lm_eval")
    except metadata.PackageNotFoundError:
        raise ConfigError("benchmarks need lm-evaluation-harness: pip install 'finetune-sdk[eval]'") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def read_task_file(path: Path) -> dict[str, Any]:
    """A task YAML as lm-eval reads it (``!function`` and ``include:`` resolved), with relative
    ``dataset_kwargs.data_files`` made absolute against the file's folder and checked to exist."""
    from lm_eval.tasks._yaml_loader import load_yaml

    if not path.is_file():
        raise ConfigError(f"{path}: no such task file")
    try:
        config = load_yaml(path)
    except Exception as exc:  # noqa: BLE001 - yaml, import and include errors alike: one line naming the file
        raise ConfigError(f"{path}: not a valid lm-eval task file ({_first_line(exc)})") from None
    if not isinstance(config.get("task"), str):
        raise ConfigError(f"{path}: no 'task:' name; an lm-eval task file names its task (task: my_task)")
    kwargs = dict(config.get("dataset_kwargs") or {})
    files = kwargs.get("data_files")
    if files is not None:
        def absolute(value: str) -> str:
            if "://" in value:
                return value
            target = Path(value) if Path(value).is_absolute() else (path.parent / value).resolve()
            if not target.exists():
                raise ConfigError(f"{path}: dataset_kwargs.data_files names {value}, which does not exist "
                                  f"(read relative to the task file: {target})")
            return str(target)

        if isinstance(files, str):
            files = absolute(files)
        elif isinstance(files, list):
            files = [absolute(f) for f in files]
        elif isinstance(files, dict):
            files = {split: absolute(f) if isinstance(f, str) else [absolute(x) for x in f]
                     for split, f in files.items()}
        config["dataset_kwargs"] = {**kwargs, "data_files": files}
    return config


def load_tasks(names: list[str], files: list[Path]) -> tuple[Any, dict[str, Any]]:
    """The ``TaskManager`` and ``{name: Task}`` of ``names`` (default: every task of ``files``), their data loaded.

    Raises:
        ConfigError: see the module docstring.
    """
    require_lm_eval()
    from finetune_sdk.eval_backend import quiet_lm_eval

    file_tasks = {}
    for path in files:
        config = read_task_file(Path(path))
        file_tasks[config["task"]] = config
    names = list(names) or list(file_tasks)
    if not names:
        raise ConfigError("no tasks to run: give task names (--tasks) or task files (--task-file)")
    with quiet_lm_eval():
        from lm_eval.tasks import TaskManager

        # lm-eval's own ~15,000 task files take ~15 s to index: only when a name is not one of the task files
        standard = any(name not in file_tasks for name in names)
        manager = TaskManager(include_path=sorted({str(Path(p).resolve().parent) for p in files}) or None,
                              include_defaults=standard)
        known = set(manager.all_tasks) | set(file_tasks)
        tasks: dict[str, Any] = {}
        for name in names:
            if name not in known:
                from finetune_sdk.errors import closest

                raise ConfigError(f"unknown task {name!r}{closest(name, sorted(known))}; give a task file "
                                  "(--task-file my_task.yaml) for your own task")
            spec = file_tasks.get(name, name)
            try:
                built = manager.load([spec])["tasks"]
            except ConfigError:
                raise
            except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; each becomes one line here
                raise dataset_error(name, spec, manager, exc) from None
            tasks.update(built)
    return manager, tasks


def dataset_error(name: str, spec: Any, manager: Any, exc: BaseException) -> ConfigError:
    """One line for a task whose data did not load: offline and not cached, or another cause."""
    path = spec.get("dataset_path") if isinstance(spec, dict) else _dataset_path(manager, name)
    config_name = spec.get("dataset_name") if isinstance(spec, dict) else _dataset_path(manager, name, "dataset_name")
    kinds = {cls.__name__ for cls in type(exc).__mro__}
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    if path and path not in ("json", "csv", "parquet", "text") and (offline or kinds & set(OFFLINE_ERRORS)):
        call = f"datasets.load_dataset('{path}'" + (f", '{config_name}'" if config_name else "") + ")"
        return ConfigError(f"task {name!r}: its dataset {path}" + (f" ({config_name})" if config_name else "")
                           + " is not in the datasets cache and the Hub can't be reached; fetch it once online "
                           f"(python -c \"import datasets; {call}\") or use a task file with local data "
                           "(dataset_path: json; see docs/evaluation.md)")
    return ConfigError(f"task {name!r}: its data did not load ({type(exc).__name__}: {_first_line(exc)})")


def _dataset_path(manager: Any, name: str, key: str = "dataset_path") -> str | None:
    """A builtin task's ``dataset_path`` (or another key) from its YAML, best effort."""
    try:
        from lm_eval.tasks._yaml_loader import load_yaml

        entry = manager.task_index.get(name)
        return load_yaml(entry.yaml_path, resolve_func=False).get(key) if entry and entry.yaml_path else None
    except Exception:  # noqa: BLE001 - only used to word an error better
        return None

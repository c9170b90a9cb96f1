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
    if isinstance(config.get("group"), str) and isinstance(config.get("task"), list):
        return config | {"_folder": str(path.resolve().parent)}  # a group file: subtasks resolved by read_group
    if not isinstance(config.get("task"), str):
        raise ConfigError(f"{path}: no 'task:' name; an lm-eval task file names its task (task: my_task), a group "
                          "file its group and subtasks (group: my_group, task: [a, b])")
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
    """The ``TaskManager`` and ``{name: [Task or Group, ...]}`` of ``names`` (default: every task and group of
    ``files``), their data loaded. A group (a group file's ``group:``, or one of lm-eval's) stays a ``Group``, so
    lm-eval reports its aggregate (``aggregate_metric_list``) beside its subtasks' scores.

    Raises:
        ConfigError: see the module docstring.
    """
    require_lm_eval()
    from finetune_sdk.evaluation.quiet import quiet_lm_eval

    file_tasks = {}
    for path in files:
        config = read_task_file(Path(path))
        file_tasks[config.get("group") if isinstance(config.get("group"), str) and "task" in config
                   and isinstance(config["task"], list) else config["task"]] = config
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
            if isinstance(spec, dict) and isinstance(spec.get("task"), list):
                tasks[name] = [build_group(spec, manager, file_tasks)]
            else:
                tasks[name] = load_one(name, spec, manager)
    return manager, tasks


def load_one(name: str, spec: Any, manager: Any) -> list[Any]:
    """``[Group]`` for a group's name, else the task(s) ``spec`` names, built by lm-eval with their data loaded."""
    try:
        loaded = manager.load([spec])
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; each becomes one line here
        raise dataset_error(name, spec, manager, exc) from None
    group = loaded["groups"].get(name)
    return [group] if group is not None else list(loaded["tasks"].values())


def build_group(config: dict[str, Any], manager: Any, file_tasks: dict[str, Any]) -> Any:
    """lm-eval's ``Group`` of a group file: its subtasks that are task files (given, or beside the group file)
    read as :func:`read_task_file` reads them, so their local data is found relative to their own files; other
    subtasks (lm-eval's own tasks and groups) by name. (lm-eval's loader would pass a top-level inline group's own
    keys on to its subtasks, so the group is assembled here from lm-eval's ``GroupConfig`` and ``Group``.)"""
    from dataclasses import fields

    from lm_eval.api.group import Group
    from lm_eval.config.group import GroupConfig

    names = {f.name for f in fields(GroupConfig)}
    group = Group.from_config(GroupConfig(**{k: v for k, v in config.items() if k in names}))
    for sub in config["task"]:
        spec = sub
        if isinstance(sub, str) and sub in file_tasks and isinstance(file_tasks[sub].get("task"), str):
            spec = file_tasks[sub]
        elif isinstance(sub, str) and getattr(manager.task_index.get(sub), "yaml_path", None):
            path = Path(manager.task_index[sub].yaml_path)
            if path.resolve().parent == Path(config["_folder"]):
                spec = read_task_file(path)
        label = sub if isinstance(sub, str) else str(sub.get("task") or sub.get("group"))
        for child in load_one(label, spec, manager):
            group.add(child)
    return group


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

"""``finetune_sdk.benchmark``: score a result, a registry version or a base model on lm-evaluation-harness tasks.

lm-evaluation-harness (``lm-eval``, the ``eval`` extra) is the engine: its tasks, metrics and standard errors are
used as they are; this module opens the model and proves the fine-tuned weights are applied
(:mod:`finetune_sdk.evaluation.opening`), finds the tasks offline (:mod:`finetune_sdk.evaluation.tasks`), and turns
lm-eval's results into score rows stored with the registry version (:mod:`finetune_sdk.registry.scores`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TYPE_CHECKING

from finetune_sdk.errors import ConfigError

if TYPE_CHECKING:
    from finetune_sdk.models.inference import LoadedModel

logger = logging.getLogger("finetune_sdk")


@dataclass
class BenchmarkResult:
    """Scores of one benchmark call.

    Attributes:
        model: the reference scored (result folder, ``name@N``, base model id).
        scores: one dict per task, metric and filter: ``task``, ``task_version``, ``num_fewshot``, ``limit``,
            ``metric``, ``filter``, ``value``, ``stderr`` (``None`` when lm-eval gives none), ``lm_eval_version``,
            ``seed``, ``date``, ``adapter_sha256``, ``model``.
        base_scores: the same for the base model (with ``with_base=True`` on a result), else empty.
        stored_as: the registry version the scores were stored with, or ``None``.
    """

    model: str
    scores: list[dict[str, Any]]
    base_scores: list[dict[str, Any]] = field(default_factory=list)
    stored_as: str | None = None

    def table(self) -> list[dict[str, Any]]:
        """The scores beside the base's: ``task``, ``metric``, ``value``, ``stderr``, ``base``, ``base_stderr``,
        ``vs_base``, ``significant`` (the difference exceeds twice the combined standard error)."""
        import math

        base = {(r["task"], r["metric"], r["filter"]): r for r in self.base_scores}
        out = []
        for row in self.scores:
            b = base.get((row["task"], row["metric"], row["filter"]))
            diff = significant = None
            if b is not None:
                diff = row["value"] - b["value"]
                if row["stderr"] is not None and b["stderr"] is not None:
                    significant = abs(diff) > 2 * math.sqrt(row["stderr"] ** 2 + b["stderr"] ** 2)
            out.append({"task": row["task"], "metric": row["metric"], "filter": row["filter"], "value": row["value"],
                        "stderr": row["stderr"], "base": b and b["value"], "base_stderr": b and b["stderr"],
                        "vs_base": diff, "significant": significant})
        return out


def task_inputs(tasks: Any, task_files: Any) -> tuple[list[str], list[Path]]:
    """``tasks`` and ``task_files`` as lists, as lm-eval's own ``--tasks`` reads them: one string is one entry
    (``"a,b"`` two names), and a task given by its YAML path (``tasks=["my_task.yaml"]``) is a task file.

    >>> task_inputs("arith,qa", "my.yaml")
    (['arith', 'qa'], [PosixPath('my.yaml')])
    """
    if isinstance(tasks, (str, os.PathLike)):
        tasks = [tasks]
    if isinstance(task_files, (str, os.PathLike)):
        task_files = [task_files]
    names: list[str] = []
    files = [Path(f) for f in task_files]
    for entry in tasks:
        for name in os.fspath(entry).split(","):
            name = name.strip()
            if name.endswith((".yaml", ".yml")):
                files.append(Path(name))
            elif name:
                names.append(name)
    return names, files


def check_batch_size(batch_size: Any) -> int | str:
    """``batch_size`` as lm-eval takes it: a whole number >= 1 (or its digits) or ``"auto"``.

    Raises:
        ConfigError: anything else (``0``, ``"zero"``), one line.

    >>> check_batch_size("8"), check_batch_size("auto")
    (8, 'auto')
    """
    if isinstance(batch_size, str) and batch_size.strip().isdigit():
        batch_size = int(batch_size)
    if batch_size == "auto" or (isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1):
        return batch_size
    raise ConfigError(f"batch_size is {batch_size!r}; give a whole number of at least 1, or 'auto' (the largest "
                      "that fits)")


def benchmark(ref: str | os.PathLike[str], tasks: str | list[str] | tuple[str, ...] = (), *,
              task_files: str | os.PathLike[str] | list[str | os.PathLike[str]] | tuple = (),
              num_fewshot: int | None = None,
              limit: int | float | None = None, batch_size: int | str = "auto", seed: int = 0,
              with_base: bool = True, store: bool = True, check: bool = True, chat: bool | None = None,
              registry: Any = None, trust_remote_code: bool = False) -> BenchmarkResult:
    """Score ``ref`` on lm-evaluation-harness tasks, offline, with the fine-tuned weights provably applied.

    Args:
        ref: a result folder, a registry reference (``bot@3``, ``bot@production``, ``hf://org/repo@v2``), a base
            model folder or Hub id, or a ``.gguf`` file; opened by :func:`finetune_sdk.load` (4-bit again after
            QLoRA, the recorded dtype, the formatter it was trained with).
        tasks: lm-eval task names (``hellaswag``, or the ``task:`` of a task file; one string may hold several,
            comma-separated; a ``.yaml`` path counts as a task file, as in lm-eval). Empty: every task of
            ``task_files``.
        task_files: lm-eval task YAML files (a list, or one path); ``dataset_kwargs.data_files`` paths are read
            relative to the file.
        num_fewshot: examples in each prompt (``None``: each task's own default, usually 0).
        limit: at most this many documents per task (an int), or this fraction of them (a float < 1).
        batch_size: an int >= 1, or ``"auto"`` (lm-eval finds the largest that fits, on the CPU and the GPU).
        seed: the seed of lm-eval's sampling of few-shot examples, and of Python, NumPy and torch (0 to 2**32 - 1).
        with_base: for a result, score its base model with the same settings too (the comparison's baseline).
        store: store the scores with the registry version (and the base's under version 0) when ``ref`` is one.
        check: refuse (:class:`FinetuneError`) when the result's logits on a probe equal the base's.
        chat: wrap each prompt in the model's chat format (its formatter); ``None``: when it has a formatter.
        registry: the :class:`~finetune_sdk.registry.Registry` (default ``Registry()``).
        trust_remote_code: let the model repository's code run (only this argument turns it on).

    Returns:
        A :class:`BenchmarkResult` (``scores``, ``base_scores``, ``table()``, ``stored_as``).

    Raises:
        ConfigError: lm-eval is not installed, a task is unknown, the batch size is not a whole number >= 1 or
            auto, the seed is outside 0..2**32 - 1, or a task's dataset is not available offline (one line naming
            the task and how to make it available).
        FinetuneError: the fine-tuned weights are not applied (see
            :func:`finetune_sdk.evaluation.opening.check_applied`).

    Example:
        >>> import finetune_sdk
        >>> r = finetune_sdk.benchmark("quill@2", task_files=["examples/tasks/quillfeather_qa.yaml"])  # doctest: +SKIP
        >>> r.table()[0]["vs_base"]  # doctest: +SKIP
        0.75
    """
    from finetune_sdk.evaluation.opening import open_models
    from finetune_sdk.evaluation.tasks import load_tasks, require_lm_eval
    from finetune_sdk.log import known_dependency_messages

    lm_eval_version = require_lm_eval()
    if num_fewshot is not None and num_fewshot < 0:
        raise ConfigError(f"num_fewshot is {num_fewshot}; give 0 or more examples per prompt")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ConfigError(f"seed is {seed!r}; give a whole number from 0 to 2**32 - 1 (NumPy's range)")
    if limit is not None and not limit > 0:
        raise ConfigError(f"limit is {limit}; give a positive number of documents (or a fraction below 1)")
    tasks, task_files = task_inputs(tasks, task_files)
    batch_size = check_batch_size(batch_size)
    task_manager, task_dict = load_tasks(tasks, task_files)  # before any model loads
    with known_dependency_messages():
        tuned, base, info = open_models(os.fspath(ref), with_base=with_base, check=check, registry=registry,
                                        trust_remote_code=trust_remote_code)
    settings = dict(num_fewshot=num_fewshot, limit=limit, batch_size=batch_size, seed=seed, chat=chat,
                    lm_eval_version=lm_eval_version)
    scores = score(tuned, task_manager, task_dict, model_name=os.fspath(ref), adapter=info["adapter_sha256"],
                   **settings)
    base_scores = []
    if base is not None:
        del tuned  # one model in memory at a time from here
        _, task_dict = load_tasks(tasks, task_files)
        base_scores = score(base, task_manager, task_dict, model_name=f"base of {os.fspath(ref)}", adapter=None,
                            **settings)
    result = BenchmarkResult(os.fspath(ref), scores, base_scores)
    version = info.get("version")
    if store and version is not None:
        from finetune_sdk.registry import Registry
        from finetune_sdk.registry.scores import store as store_scores

        registry = registry if registry is not None else Registry()
        store_scores(registry, version.ref, scores)
        if base_scores:
            store_scores(registry, version.ref, base_scores, base=True)
        result.stored_as = version.ref
    return result


def score(loaded: LoadedModel, task_manager: Any, task_dict: dict[str, Any], *, model_name: str, adapter: str | None,
          num_fewshot: int | None, limit: int | float | None, batch_size: int | str, seed: int,
          chat: bool | None, lm_eval_version: str) -> list[dict[str, Any]]:
    """Run lm-eval's ``evaluate`` on one loaded model and return its score rows (see :class:`BenchmarkResult`):
    each task's, and each group's aggregate (lm-eval's ``aggregate_metric_list``, e.g. the size-weighted mean) as a
    row named by the group."""
    from finetune_sdk.evaluation.lm_eval_backend import FinetuneSDKLM
    from finetune_sdk.evaluation.quiet import quiet_lm_eval
    from finetune_sdk.progress import activity

    random.seed(seed)
    lm = FinetuneSDKLM.from_loaded(loaded, batch_size=batch_size, chat=chat)
    printed = io.StringIO()  # lm-eval print()s the batch size it found: said once below, in the SDK's log
    results: dict[str, dict[str, Any]] = {"results": {}, "versions": {}, "n-shot": {}}
    with quiet_lm_eval(), activity(f"benchmarking {model_name} on {', '.join(task_dict)}", total=len(task_dict),
                                   unit="tasks") as step, contextlib.redirect_stdout(printed):
        from lm_eval import simple_evaluate

        for items in task_dict.values():  # one task (or group) at a time: the bar and its time left move per task
            one = simple_evaluate(model=lm, tasks=items, num_fewshot=num_fewshot, limit=limit, random_seed=seed,
                                  numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                                  task_manager=task_manager, log_samples=False, apply_chat_template=lm.chat,
                                  bootstrap_iters=1000)
            for key in results:
                results[key].update(one.get(key) or {})
            step.advance()
    found = [line for line in printed.getvalue().splitlines() if "largest batch size" in line.lower()]
    if found:
        logger.info("%s: batch size %s, found automatically", model_name, found[-1].rsplit(":", 1)[-1].strip())
    return score_rows(results, model_name=model_name, adapter=adapter, limit=limit, seed=seed,
                      lm_eval_version=lm_eval_version)


def score_rows(results: dict[str, Any], *, model_name: str, adapter: str | None, limit: int | float | None,
               seed: int, lm_eval_version: str) -> list[dict[str, Any]]:
    """lm-eval's ``results`` dict as flat score rows: one per task, metric and filter (``"acc,none"`` -> metric
    ``acc``, filter ``none``; its ``"acc_stderr,none"`` is the row's ``stderr``, ``None`` when ``"N/A"``)."""
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows = []
    for task, values in sorted(results["results"].items()):
        for key, value in sorted(values.items()):
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = values.get(f"{metric}_stderr,{filt}")
            rows.append({"task": task, "task_version": results.get("versions", {}).get(task),
                         "num_fewshot": int(results.get("n-shot", {}).get(task) or 0), "limit": limit,
                         "metric": metric, "filter": filt, "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                         "lm_eval_version": lm_eval_version, "seed": seed, "date": date,
                         "adapter_sha256": adapter, "model": model_name})
    return rows

"""lm-evaluation-harness kept quiet: its INFO lines, tqdm bars and git's complaints off the terminal while the SDK
scores (task loading in :mod:`finetune_sdk.evaluation.tasks`, the backend in
:mod:`finetune_sdk.evaluation.lm_eval_backend`, :func:`finetune_sdk.benchmark`). lm-eval and datasets are imported
only inside :func:`quiet_lm_eval`.

Example:
    >>> from finetune_sdk.evaluation.quiet import quiet_lm_eval
    >>> with quiet_lm_eval():  # doctest: +SKIP
    ...     results = lm_eval.simple_evaluate(model=lm, tasks=["quillfeather_qa"])
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

#: Loggers of lm-eval whose INFO lines (and the warning about an in-memory model) are not the SDK user's business.
LM_EVAL_LOGGERS = ("lm-eval", "lm_eval", "lm_eval.evaluator", "lm_eval.models.huggingface", "lm_eval.api.task",
                   "lm_eval.tasks", "lm_eval.evaluator_utils", "lm_eval.api.model")

#: lm-eval modules that draw tqdm bars while scoring.
TQDM_MODULES = ("lm_eval.api.model", "lm_eval.api.task", "lm_eval.api.metrics", "lm_eval.models.huggingface",
                "lm_eval.evaluator")


@contextlib.contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """lm-eval's INFO and WARNING lines, its tqdm bars and git's ``fatal: not a git repository`` (lm-eval runs
    ``git describe`` for its results' ``git_hash``) kept off the terminal inside the block; errors still show."""
    from lm_eval import evaluator

    saved = []
    for name in LM_EVAL_LOGGERS:
        log = logging.getLogger(name)
        saved.append((log, log.level))
        log.setLevel(logging.ERROR)
    import datasets

    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # "Generating test split" of local data files
    patched = [(evaluator, "get_git_commit_hash", _quiet_git_hash)]
    for name in TQDM_MODULES:  # lm-eval's bars: each module's own ``tqdm`` name, made silent
        module = sys.modules.get(name) or importlib.import_module(name)
        if hasattr(module, "tqdm"):
            patched.append((module, "tqdm", _silent(module.tqdm)))
    originals = [(module, attr, getattr(module, attr)) for module, attr, _ in patched]
    for module, attr, value in patched:
        setattr(module, attr, value)
    try:
        yield
    finally:
        for module, attr, value in originals:
            setattr(module, attr, value)
        for log, level in saved:
            log.setLevel(level)
        if bars_were_on:
            datasets.enable_progress_bars()


def _silent(bar: Any) -> Any:
    """``tqdm`` that never draws, whatever ``disable=`` its caller passes."""
    @functools.wraps(bar)
    def make(*args: Any, **kwargs: Any) -> Any:
        return bar(*args, **{**kwargs, "disable": True})

    return make


def _quiet_git_hash() -> str | None:
    """lm-eval's ``get_git_commit_hash`` with git's complaints sent to /dev/null and a timeout."""
    import subprocess

    try:
        out = subprocess.run(["git", "describe", "--always"], capture_output=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.decode().strip() or None if out.returncode == 0 else None

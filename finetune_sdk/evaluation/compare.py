"""Base model vs fine-tuned model on held-out data, with side-by-side generations and a saved report."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

from finetune_sdk.data.rows import Rows
from finetune_sdk.formatter import HEAD_TASKS


@contextmanager
def base_of(tuned: Any, load_base: Callable[[], Any]) -> Iterator[Any]:
    """The base model: the same model with its adapter disabled (no second copy), else ``load_base()``."""
    model = tuned.model
    if hasattr(model, "disable_adapter") and hasattr(model, "peft_config"):
        with model.disable_adapter():
            yield tuned
    else:
        yield load_base()


def compare_models(tuned: Any, load_base: Callable[[], Any], rows: Rows, prompts: Any = None, *,
                   max_new_tokens: int = 64, log_history: list[dict[str, Any]] | None = None,
                   info: dict[str, Any] | None = None,
                   report_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Evaluate (and generate with) the fine-tuned and the base model; optionally write the report files.

    Generative models compare ``eval_loss`` and ``perplexity``; classifiers ``eval_loss``, ``accuracy`` and
    ``macro_f1``; reward models ``eval_loss``, ``pairwise_accuracy`` and ``reward_margin``.
    """
    from finetune_sdk.training.output_paths import check_report_dir
    from finetune_sdk.progress import activity

    if report_dir is not None:  # before any model runs: the report folder must be writable without loss
        check_report_dir(report_dir)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts or [])
    generative = tuned.task not in HEAD_TASKS
    with activity("comparison: the fine-tuned model"):
        tuned_metrics = tuned.evaluate(rows)
        tuned_answers = tuned.generate(prompts, max_new_tokens=max_new_tokens) if prompts and generative else []
    with activity("comparison: the base model"), base_of(tuned, load_base) as base:
        if base.formatter is None:
            base.formatter = tuned.formatter
        base_metrics = base.evaluate(rows)
        base_answers = base.generate(prompts, max_new_tokens=max_new_tokens) if prompts and generative else []
    report: dict[str, Any] = {
        "task": tuned.task, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **(info or {}), "eval_data": rows.source, "base": base_metrics, "tuned": tuned_metrics,
        "generations": [{"prompt": p, "base": b, "tuned": t} for p, b, t in zip(prompts, base_answers,
                                                                              tuned_answers)],
        "log_history": list(log_history or []),
    }
    if report_dir is not None:
        from finetune_sdk.evaluation.report import write_report

        report["files"] = {k: str(v) for k, v in write_report(report_dir, report).items()}
    return report

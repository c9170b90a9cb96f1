"""finetune_sdk: fine-tune large language models with pluggable techniques, quantizers and formatters.

Example:
    >>> from finetune_sdk import Trainer
    >>> result = Trainer("path/or/hub-id", technique="qlora", formatter="llama2-chat").fit("train.jsonl")  # doctest: +SKIP

Importing this package is cheap: torch and transformers load only when a model is used. It sets
``OMP_WAIT_POLICY=PASSIVE`` when unset and torch is not loaded yet (see :mod:`finetune_sdk.speed.cpu_threads`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from finetune_sdk.speed.cpu_threads import prefer_passive_waits
from finetune_sdk.errors import FinetuneError
from finetune_sdk.markers import hookimpl

# OpenMP threads that sleep instead of spinning while they wait: on cores shared with other processes spinning made
# training 5-7x slower (finetune_sdk.speed.cpu_threads). Only when no policy is set and torch is not imported yet.
prefer_passive_waits()

__version__ = "0.1.0"
__all__ = ["BenchmarkResult", "FinetuneError", "FitResult", "Stage", "Task", "Trainer", "__version__", "advise",
           "benchmark", "collect_feedback", "export", "hookimpl", "load", "merge"]

if TYPE_CHECKING:
    from finetune_sdk.training.result import FitResult
    from finetune_sdk.trainer import Trainer


def load(ref: Any, **kwargs: Any) -> Any:
    """Load a fine-tuned result ready to ``generate``/``predict``/``evaluate``: a result folder or a registry
    reference (``"support-bot@production"``, ``"hf://org/repo@v3"``). See :func:`finetune_sdk.models.loading.load`.
    """
    from finetune_sdk.log import known_dependency_messages

    with known_dependency_messages():  # bitsandbytes' import chatter (see finetune_sdk.log)
        from finetune_sdk.models.loading import load as _load

        return _load(ref, **kwargs)


def merge(ref: Any, out: Any, **kwargs: Any) -> Any:
    """Merge an adapter into its base and save a standalone model folder; see :func:`finetune_sdk.models.merging.merge`."""
    from finetune_sdk.log import known_dependency_messages

    with known_dependency_messages():  # bitsandbytes' import chatter (see finetune_sdk.log)
        from finetune_sdk.models.merging import merge as _merge

        return _merge(ref, out, **kwargs)


def export(ref: Any, out: Any, **kwargs: Any) -> Any:
    """Merge a result and write it as a GGUF file with an Ollama Modelfile; see
    :func:`finetune_sdk.exporting.export`."""
    from finetune_sdk.log import known_dependency_messages

    with known_dependency_messages():  # bitsandbytes' import chatter (see finetune_sdk.log)
        from finetune_sdk.exporting import export as _export

        return _export(ref, out, **kwargs)


def advise(model: Any, **kwargs: Any) -> Any:
    """Recommend a technique, quantizer and batch settings; see :func:`finetune_sdk.advice.advisor.advise`."""
    from finetune_sdk.advice.advisor import advise as _advise

    return _advise(model, **kwargs)


def benchmark(ref: Any, tasks: Any = (), **kwargs: Any) -> Any:
    """Score a result, registry version or base model on lm-evaluation-harness tasks beside its base, the adapter
    checked to be applied, the scores stored with the version; see :func:`finetune_sdk.evaluation.benchmarking.benchmark`."""
    from finetune_sdk.evaluation.benchmarking import benchmark as _benchmark

    return _benchmark(ref, tasks, **kwargs)


def collect_feedback(model: Any, prompts: Any, out: Any, **kwargs: Any) -> Any:
    """Rate a model's sampled answers (thumbs up/down, or the better of two) into a ratings file that trains with
    KTO, DPO or SFT as it is; see :func:`finetune_sdk.feedback.session.collect_feedback`."""
    from finetune_sdk.feedback.session import collect_feedback as _collect_feedback

    return _collect_feedback(model, prompts, out, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "Trainer":
        from finetune_sdk.trainer import Trainer

        return Trainer
    if name in ("Stage", "Task"):
        from finetune_sdk.training import stages_and_tasks

        return getattr(stages_and_tasks, name)
    if name == "BenchmarkResult":
        from finetune_sdk.evaluation.benchmarking import BenchmarkResult

        return BenchmarkResult
    if name == "FitResult":
        from finetune_sdk.training.result import FitResult

        return FitResult
    raise AttributeError(f"module 'finetune_sdk' has no attribute {name!r}")

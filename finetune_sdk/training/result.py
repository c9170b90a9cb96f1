"""What ``Trainer.fit`` returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class FitResult:
    """The outcome of a training run.

    Attributes:
        output_dir: the folder holding the result (adapter, model or head), the tokenizer and the manifest.
        metrics: ``train_loss``, ``eval_loss`` (with eval data), ``train_runtime``, ``train_tokens_per_second``,
            ``trainable_parameters``, ``total_parameters`` and more.
        manifest: the manifest written into ``output_dir``.
        log_history: every log line of the training loop (loss per logging step...).

    Example:
        >>> result = Trainer("model-dir", technique="lora").fit("train.jsonl")  # doctest: +SKIP
        >>> result.metrics["train_loss"]  # doctest: +SKIP
    """

    output_dir: Path
    metrics: dict[str, Any]
    manifest: dict[str, Any]
    log_history: list[dict[str, Any]] = field(default_factory=list)
    #: The registry version this result was published as (``Trainer(publish_as=...)`` or :meth:`publish`).
    version: Any = None
    #: For sequential fine-tuning: the result of every stage, in order (this result is the last one).
    stages: list[Any] = field(default_factory=list)

    def publish(self, name: str, *, registry: Any = None, **kwargs: Any) -> Any:
        """Publish this result to the registry as the next version of ``name``; returns the ``AdapterVersion``.

        Keyword arguments go to :meth:`finetune_sdk.registry.Registry.publish` (``description``, ``aliases``,
        ``tags``, ``parent``).
        """
        from finetune_sdk.registry import Registry

        self.version = (registry or Registry()).publish(self.output_dir, name, **kwargs)
        return self.version

    def load(self, **kwargs: Any) -> Any:
        """Load this result back (same as ``finetune_sdk.load(result.output_dir)``)."""
        from finetune_sdk.models.loading import load

        return load(self.output_dir, **kwargs)

"""Full fine-tuning: every weight is trained and the result is a standalone model directory."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from finetune_sdk.technique import Technique


class FullTechnique(Technique):
    """Train all weights (needs the memory for weights, gradients and optimizer states)."""

    name: ClassVar[str] = "full"
    description: ClassVar[str] = "all weights trained; saves a standalone Hugging Face model directory"
    default_learning_rate: ClassVar[float] = 2e-5
    result_is_model: ClassVar[bool] = True
    trains: ClassVar[str | None] = "all weights"

    def prepare(self, model: Any, options: Mapping[str, Any], tokenizer: Any) -> Any:
        for param in model.parameters():
            param.requires_grad_(True)
        if options.get("gradient_checkpointing"):
            model.enable_input_require_grads()
        return model

    def load(self, base_model: Any, directory: Path, options: Mapping[str, Any]) -> Any:
        return base_model  # the result directory is itself the model: the loader reads it as the base

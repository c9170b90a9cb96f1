"""Repurposing: the pretrained model frozen, a new classification head trained on its hidden states."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from finetune_sdk.formatter import CLASSIFICATION
from finetune_sdk.advice.model_shape import ENCODER_TYPES
from finetune_sdk.options import Option
from finetune_sdk.quantizer import Quantizer
from finetune_sdk.technique import Technique

HEAD_WEIGHTS = "classifier_head.safetensors"
HEAD_CONFIG = "classifier_config.json"


class ClassifierTechnique(Technique):
    """Freeze the backbone; train a linear head on pooled hidden states.

    Pooling ``auto`` takes the last non-pad token for decoder models and the first token for encoders.
    """

    name: ClassVar[str] = "classifier"
    description: ClassVar[str] = "frozen pretrained backbone + new linear classification head on its hidden states"
    task: ClassVar[str] = CLASSIFICATION
    trains: ClassVar[str | None] = "head"
    default_learning_rate: ClassVar[float] = 1e-3
    options: ClassVar[tuple[Option, ...]] = (
        Option("labels", list, None, "class names, comma separated (default: the labels found in the data)",
               minimum=2),
        Option("num_labels", int, None, "number of classes when labels are integers 0..n-1", minimum=2),
        Option("pooling", str, "auto", "hidden-state pooling: auto, last, first or mean",
               choices=("auto", "last", "first", "mean")),
    )

    def accepts_quantizer(self, quantizer: Quantizer | None) -> bool:
        return True  # the backbone is frozen, so it may be stored in any precision

    def prepare(self, model: Any, options: Mapping[str, Any], tokenizer: Any) -> Any:
        from finetune_sdk.models.classifier_model import ClassifierModel

        if isinstance(model, ClassifierModel):
            return model
        labels = options["labels"]
        pooling = resolve_pooling(options["pooling"], model)
        classifier = ClassifierModel(model, len(labels), pooling, tokenizer.pad_token_id)
        classifier.labels = [str(label) for label in labels]
        return classifier

    def save(self, model: Any, directory: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.head.state_dict().items()}, str(directory / HEAD_WEIGHTS))
        config = {"labels": model.labels, "id2label": dict(enumerate(model.labels)), "pooling": model.pooling,
                  "hidden_size": model.head.in_features}
        (directory / HEAD_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    def load(self, base_model: Any, directory: Path, options: Mapping[str, Any]) -> Any:
        from safetensors.torch import load_file

        from finetune_sdk.models.classifier_model import ClassifierModel
        from finetune_sdk.errors import FinetuneError

        try:
            config = json.loads((directory / HEAD_CONFIG).read_text(encoding="utf-8"))
            labels, pooling = [str(label) for label in config["labels"]], str(config["pooling"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FinetuneError(f"{directory / HEAD_CONFIG}: unreadable classifier config ({type(exc).__name__}: "
                                f"{exc}); re-create the result") from None
        model = ClassifierModel(base_model, len(labels), pooling, options.get("pad_token_id"))
        model.labels = labels
        weights = load_file(str(directory / HEAD_WEIGHTS))
        expected = {name: tuple(t.shape) for name, t in model.head.state_dict().items()}
        found = {name: tuple(t.shape) for name, t in weights.items()}
        if found != expected:
            raise FinetuneError(
                f"{directory / HEAD_WEIGHTS}: head has shapes {found}, but {len(labels)} labels on a backbone of "
                f"hidden size {model.head.in_features} need {expected}; the head belongs to another model or labels")
        model.head.load_state_dict(weights)
        return model


def resolve_pooling(pooling: str, model: Any) -> str:
    """``auto`` -> ``last`` for decoder-only models, ``first`` for encoders."""
    if pooling != "auto":
        return pooling
    config = getattr(model, "config", None)
    is_encoder = not getattr(config, "is_decoder", False) and getattr(config, "model_type", "") in ENCODER_TYPES
    return "first" if is_encoder else "last"

"""Everything a plugin author imports, in one light module: it imports no torch, transformers or peft, not even
for type checking, so a plugin can annotate its hooks without slowing ``finetune --help``.

Example (an observer plugin that annotates its hook):
    >>> from finetune_sdk.plugin_api import TrainingContext, hookimpl
    >>> class LossPrinter:
    ...     @hookimpl
    ...     def on_log(self, context: TrainingContext, logs: dict) -> None:
    ...         print(context.technique, context.step, logs.get("loss"))
    >>> LossPrinter().on_log(TrainingContext("lora", None, "chatml", "m", Path("out"), {}, step=3), {"loss": 1.5})
    lora 3 1.5
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_sdk.errors import ConfigError, DataError, PluginError
from finetune_sdk.exporting.exporter import Exporter
from finetune_sdk.formatter import CAUSAL_LM, CLASSIFICATION, REWARD, Formatter, Segment
from finetune_sdk.markers import hookimpl
from finetune_sdk.objectives.base import Objective, TrainingInputs
from finetune_sdk.options import Option
from finetune_sdk.quantizer import Quantizer
from finetune_sdk.technique import Technique

__all__ = ["CAUSAL_LM", "CLASSIFICATION", "REWARD", "STOP_TRAINING", "ConfigError", "DataError", "Exporter",
           "Formatter", "Objective", "Option", "PluginError", "PluginWarning", "Quantizer", "Segment", "Technique",
           "TrainingContext", "TrainingInputs", "hookimpl"]

#: What an observer hook (``on_log``, ``on_evaluate``, ``on_save``) returns to ask training to stop after the
#: current step (as transformers' ``TrainerControl.should_training_stop``); the result is saved as usual.
STOP_TRAINING = "stop-training"


class PluginWarning(UserWarning):
    """A plugin could not be loaded or misbehaved; the SDK carries on without it."""


@dataclass
class TrainingContext:
    """What the observer hooks (``on_train_begin``, ``on_log``, ``on_evaluate``, ``on_save``, ``on_train_end``)
    receive: the run's settings and where it stands.

    Attributes:
        technique: the technique's registered name (``"lora"``...).
        quantizer: the quantizer's name, or ``None`` for a full-precision base.
        formatter: the formatter's name (``None`` only before one is picked).
        model_id: the base model as given (a Hub id or a local path).
        output_dir: the folder the result will be written to (it appears atomically at the end).
        options: every resolved option (a copy: changing it changes nothing).
        step: the optimizer step reached (updated as training goes).
        max_steps: the steps the run will take.
        epoch: the epoch reached, fractional.
        extra: free room for plugins to share state between hooks of one run.
        should_training_stop: set it to ``True`` in a hook (or return :data:`STOP_TRAINING`) to stop training
            after the current step; ``stopped_by`` then names the plugin that asked.
    """

    technique: str
    quantizer: str | None
    formatter: str | None
    model_id: str
    output_dir: Path
    options: dict[str, Any]
    step: int = 0
    max_steps: int = 0
    epoch: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    should_training_stop: bool = False
    stopped_by: str | None = None

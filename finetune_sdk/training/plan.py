"""What flows through one training run, as data: the :class:`TrainingPlan` planning makes (frozen from then on),
the :class:`RunSpec` the facade adds (plugins, options, where the result goes, resume) and the :class:`RunState`
the run engine fills in while it trains (packing, chunked loss, trainable dtypes, what an objective keeps between
its steps). Plan -> run -> save: :mod:`.planning` makes the plan, :mod:`.engine` trains with all three,
:mod:`.saving` writes the result from them.

This module holds data only: it imports no planner, engine or objective, so every part can name these types.

Example:
    >>> from finetune_sdk.data.encoding import Encoded
    >>> plan = TrainingPlan(train=Encoded(), formatter_name="chatml")
    >>> plan.objective, RunState().packed
    ('sft', False)
    >>> plan.objective = "dpo"
    Traceback (most recent call last):
    ...
    dataclasses.FrozenInstanceError: cannot assign to field 'objective'
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from finetune_sdk.data.encoding import Encoded
from finetune_sdk.data.rows import Rows
from finetune_sdk.formatter import Formatter

if TYPE_CHECKING:
    from finetune_sdk.models.sources import ModelSource
    from finetune_sdk.quantizer import Quantizer
    from finetune_sdk.speed.precision import Precision
    from finetune_sdk.technique import Technique


class PluginCalls(Protocol):
    """What a run asks of the plugin host (:class:`~finetune_sdk.plugin_manager.PluginHost`): send a hook to every
    plugin, and say which distribution registered a plugin (for the manifest)."""

    def notify(self, hook: str, **kwargs: Any) -> list[Any]: ...

    def registration(self, kind: str, name: str) -> Any: ...


@dataclass(frozen=True)
class EvalSet:
    """A held-out dataset with the formatter that renders it."""

    rows: Rows
    formatter: Formatter
    encoded: Encoded


@dataclass(frozen=True)
class TrainingPlan:
    """Everything one training run trains on, encoded and checked before the model is touched; frozen once
    planning made it (what the run decides later is in :class:`RunState`)."""

    train: Encoded
    formatter_name: str
    #: The objective's name (``sft``, ``dpo``, ``classification-head``; see :mod:`finetune_sdk.objectives`).
    objective: str = "sft"
    evals: dict[str, EvalSet] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    #: Metrics known from planning (a multi-task mixture's counts), reported with the run's.
    extra_metrics: dict[str, Any] = field(default_factory=dict)
    #: The formatter picked for the data (the Trainer keeps it for generate/evaluate).
    formatter: Formatter | None = None
    #: The formatter the Trainer's current model renders prompts with after this plan (None: leave it as it is).
    current_model_formatter: Formatter | None = None
    #: The classifier's labels, in class-id order (None for generative objectives).
    labels: list[str] | None = None
    #: The run's options: the Trainer's, with the objective's own resolved (its defaults, TRL's names) and no
    #: other objective's; the run engine trains with them.
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunState:
    """What the run engine decides once the model is prepared, and what objectives keep while it trains."""

    #: Each batch's examples packed into rows (see :mod:`finetune_sdk.data.packing`).
    packed: bool = False
    #: Packed rows attend per example (:mod:`finetune_sdk.speed.varlen_attention`): a batch is one row, no padding.
    varlen: bool = False
    #: The causal-LM loss computed in chunks (:mod:`finetune_sdk.speed.chunked_loss`).
    chunked_loss: bool = False
    #: The dtypes of the trainable parameters (recorded in the manifest's precision).
    trainable_dtypes: list[str] = field(default_factory=list)
    #: The classifier on cached features: each held-out set's features, so that the final metrics come from the
    #: trained head without running the backbone again.
    eval_features: dict[str, Any] = field(default_factory=dict)
    #: What the objective keeps between its steps of one run (GRPO: its rewards, the reward model loaded once).
    objective_state: dict[str, Any] = field(default_factory=dict)
    #: Metrics the run adds before training (the feature cache's seconds, GRPO's starting reward).
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunSpec:
    """What a run needs besides its plan and model: the plugins, the resolved options, where the result goes,
    whether to resume, and (:attr:`state`) what the engine decides while it runs."""

    technique: Technique
    quantizer: Quantizer | None
    options: dict[str, Any]
    output_dir: Path
    source: ModelSource
    host: PluginCalls
    progress: bool = True
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("finetune_sdk"))
    #: The run's precision (None: resolved from the options).
    precision: Precision | None = None
    #: Continue from the newest complete checkpoint of ``output_dir``, if there is one.
    resume: bool = False
    #: For a stage of ``fit([Stage, ...])``: where the trainable weights the stage ends with are kept for resume.
    state_path: Path | None = None
    #: The training-memory estimate in bytes, made before the model loaded (None: not estimated).
    estimated_memory: int | None = None
    state: RunState = field(default_factory=RunState)

    def resolved_precision(self) -> Precision:
        """The run's precision: :attr:`precision` when the facade chose it, else resolved from the options and
        plugins as the facade resolves them (:func:`finetune_sdk.speed.precision.choose_precision`)."""
        if self.precision is not None:
            return self.precision
        from finetune_sdk.speed.precision import choose_precision

        return choose_precision(self.options, self.technique, self.quantizer)


@dataclass
class TrainedRun:
    """What the run engine hands to saving: the trained model (unwrapped from DDP/FSDP), its metrics and log, and
    what the save step finishes (the hook context, the checkpoints folder, the run's event log)."""

    model: Any
    metrics: dict[str, Any]
    log_history: list[dict[str, Any]]
    context: Any
    checkpoint_root: Path
    #: The run's :class:`~finetune_sdk.training.run_events.EventLog` (None off the main process).
    events: Any = None

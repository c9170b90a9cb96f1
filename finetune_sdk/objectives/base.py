"""The :class:`Objective` base class every training objective subclasses, builtin or a plugin's.

An objective decides how rows are encoded, what happens to the model before training (DPO's reference), which
transformers ``Trainer`` class and collator train it, whether packing applies, how a held-out set is scored, which
options it takes (TRL's names) and what the memory estimate needs (sequences per example, reference copies). The
run engine asks the plan's objective and never branches on its name. Objectives register through the
``register_objectives`` hook (:mod:`finetune_sdk.objectives.builtin` for the SDK's own) and are chosen by
:func:`finetune_sdk.objectives.choice.objective_for`.

This module stays light (no torch, transformers...): :mod:`finetune_sdk.plugin_api` re-exports :class:`Objective`.

Example (a plugin objective: SFT with a label of its own):
    >>> from finetune_sdk.plugin_api import Objective, Option
    >>> class LoudSFT(Objective):
    ...     name = "loud-sft"
    ...     description = "sft, logged loudly"
    ...     options = (Option("loudness", float, 1.0, "how loud", minimum=0),)
    >>> LoudSFT.option_specs()["loudness"].default, LoudSFT.formatter_tasks
    (1.0, frozenset({'causal-lm'}))
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from finetune_sdk.data.encoding import Collator, Encoded, encode_causal
from finetune_sdk.formatter import CAUSAL_LM, Formatter
from finetune_sdk.options import Option

if TYPE_CHECKING:
    from finetune_sdk.models.inference import LoadedModel
    from finetune_sdk.data.rows import Rows
    from finetune_sdk.training.plan import RunSpec, TrainingPlan

logger = logging.getLogger("finetune_sdk")


class ListDataset:
    """A list of encoded examples as a map-style dataset."""

    def __init__(self, examples: list[dict[str, Any]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.examples[index]


@dataclass
class TrainingInputs:
    """What the transformers ``Trainer`` is built from: the module to train, the datasets, the collator, the class.

    ``eval_dataset`` is one dataset, a ``{name: dataset}`` dict (multi-task: ``eval_<name>_loss`` logs) or None.
    """

    model: Any
    train_dataset: Any
    eval_dataset: Any
    collator: Any
    trainer_class: type


class Objective:
    """Base class of objectives; the defaults are those of supervised causal-LM training.

    Subclasses set :attr:`name` and override what differs. What they declare:

    * ``formatter_tasks`` / ``technique_tasks``: the rows (a formatter's ``task``) and techniques (a technique's
      ``task``) it trains; ``default``: chosen for them when the caller names no ``objective=`` (one default per
      pair of tasks; the builtins hold them: ``sft``, ``dpo``, ``kto``, ``grpo``, ``classification-head``,
      ``reward-modeling``).
    * ``options``: its options (TRL's names: ``beta``...), checked and shown only when it is the run's objective;
      ``renamed_options`` maps older names to them (accepted with a warning).
    * ``sequences_per_example`` and :meth:`reference_copies`: what the memory estimate and the advisor count.
    * ``chunked_loss``: its loss is the causal-LM cross-entropy the chunked loss computes (``sft`` only).
    * ``metrics``: the keys :meth:`evaluate` returns on a held-out set.
    """

    name: ClassVar[str]
    #: One line for ``finetune plugins``.
    description: ClassVar[str] = ""
    #: Shown after the technique in the run's first log line (``lora + DPO on ...``).
    label: ClassVar[str] = ""
    #: Examples may be packed into rows (finetune_sdk.data.packing) and batches grouped by length.
    packs: ClassVar[bool] = False
    #: The formatter tasks (``causal-lm``, ``preference``, ``kto``, ``prompt``, ``classification``) it trains on.
    formatter_tasks: ClassVar[frozenset[str]] = frozenset({CAUSAL_LM})
    #: The technique tasks (``causal-lm``, ``classification``, ``reward``) it trains.
    technique_tasks: ClassVar[frozenset[str]] = frozenset({CAUSAL_LM})
    #: Chosen for those tasks when ``objective=`` is not given.
    default: ClassVar[bool] = False
    #: Its options; they become ``Trainer(**options)`` keywords and ``finetune train --kebab-name`` flags.
    options: ClassVar[tuple[Option, ...]] = ()
    #: Older option names -> their names in :attr:`options` (still accepted, with a deprecation warning).
    renamed_options: ClassVar[Mapping[str, str]] = {}
    #: Sequences per example that go through the model with gradient in a step (DPO's pairs: 2).
    sequences_per_example: ClassVar[int] = 1
    #: The loss is next-token cross-entropy on labelled tokens: the chunked loss may compute it.
    chunked_loss: ClassVar[bool] = False
    #: The metric keys :meth:`evaluate` returns (besides ``eval_rows_scored``/``eval_rows_dropped``).
    metrics: ClassVar[tuple[str, ...]] = ("eval_loss", "perplexity")
    #: A note the memory estimate shows for runs of this objective (empty: none).
    memory_note: ClassVar[str] = ""

    @classmethod
    def option_specs(cls) -> dict[str, Option]:
        """Its options by name."""
        return {option.name: option for option in cls.options}

    def loss_at_reference(self, options: Mapping[str, Any]) -> float | None:
        """The loss of a policy that equals its reference (DPO: log 2), for objectives whose reference is the
        policy as it stands when they start; the contract checks that after an SFT stage the reference is the SFT
        result. None: no reference (or no such constant)."""
        return None

    def reference_copies(self, options: Mapping[str, Any]) -> int:
        """Copies of the trainable weights a run keeps besides the policy (GRPO's reference with ``beta > 0``: 1;
        references whose log-probabilities are computed once before training: 0)."""
        return 0

    def encode(self, rows: Rows, formatter: Formatter, tokenizer: Any, options: Mapping[str, Any]) -> Encoded:
        """Rows as encoded examples (``input_ids``/``labels`` lists, or what :meth:`collator` stacks)."""
        return encode_causal(rows, formatter, tokenizer, options)

    def check_options(self, options: Mapping[str, Any], host: Any) -> None:
        """Refuse options this objective can't train with, before any model loads (e.g. GRPO without a reward).
        ``host`` is the :class:`~finetune_sdk.plugin_manager.PluginHost` (not named in the annotation: the plugin
        host imports this module for the plugin type's base class)."""

    def check_rows(self, rows: Rows) -> None:
        """Warn about (or refuse) training rows that can't teach this objective, before they are encoded."""

    def check_encoded(self, encoded: Encoded, options: Mapping[str, Any], source: str) -> None:
        """Warn about (or refuse) encoded training examples that can't teach this objective."""

    def before_prepare(self, model: Any, plan: TrainingPlan, tokenizer: Any, options: Mapping[str, Any]) -> None:
        """Run on the loaded model before the technique prepares it."""

    def after_prepare(self, model: Any, plan: TrainingPlan, tokenizer: Any, options: Mapping[str, Any]) -> None:
        """Run on the prepared model, as it stands before the first step (e.g. a reference model's scores)."""

    def while_training(self, model: Any) -> Any:
        """A context manager the training loop runs in (e.g. dropout off); by default nothing changes."""
        import contextlib

        return contextlib.nullcontext()

    def trainer_class(self, base: type, options: Mapping[str, Any]) -> type:
        """The transformers ``Trainer`` class to train with (``base`` is ``transformers.Trainer``)."""
        return base

    def collator(self, run: RunSpec, plan: TrainingPlan, tokenizer: Any) -> Any:
        """The data collator that stacks a batch of encoded examples."""
        return Collator(tokenizer.pad_token_id)

    def training_inputs(self, run: RunSpec, plan: TrainingPlan, model: Any, tokenizer: Any, args: Any) -> TrainingInputs:
        """The model, datasets, collator and ``Trainer`` class a run of this objective trains with."""
        from transformers import Trainer as HFTrainer

        evals = {name or "eval": ListDataset(s.encoded.examples) for name, s in plan.evals.items()}
        eval_dataset: Any = None
        if evals:
            eval_dataset = evals if len(evals) > 1 or "" not in plan.evals else next(iter(evals.values()))
        return TrainingInputs(model, ListDataset(plan.train.examples), eval_dataset,
                              self.collator(run, plan, tokenizer), self.trainer_class(HFTrainer, run.options))

    def evaluate(self, loaded: LoadedModel, plan: TrainingPlan, name: str, run: RunSpec) -> dict[str, Any]:
        """Final metrics of the trained model (a LoadedModel) on the held-out set ``plan.evals[name]``; ``run`` gives
        the options and what the run decided (``run.state``)."""
        eval_set = plan.evals[name]
        previous, loaded.formatter = loaded.formatter, eval_set.formatter
        try:
            return loaded.evaluate(eval_set.rows, batch_size=run.options["per_device_eval_batch_size"])
        finally:
            loaded.formatter = previous



"""Every hook a finetune_sdk plugin can implement.

Plugins implement these with ``@finetune_sdk.hookimpl`` and are found through the ``finetune_sdk`` entry-point
group. The ``register_*`` hooks receive a callback: call it once per class you provide. The ``on_*`` hooks
observe training; ``on_log``, ``on_evaluate`` and ``on_save`` may also steer it: returning
:data:`finetune_sdk.plugin_api.STOP_TRAINING` (or setting ``context.should_training_stop = True``) asks training to
stop after the current step, as transformers' ``TrainerControl.should_training_stop``; the result is saved as usual. Hooks are only ever extended with new arguments, so a
plugin written against an older version keeps working.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from finetune_sdk.markers import PROJECT, hookimpl, hookspec  # noqa: F401  (plugins import hookimpl from here too)

if TYPE_CHECKING:
    import click

    from finetune_sdk.plugin_api import TrainingContext



@hookspec
def register_techniques(register: Callable[[type], None]) -> None:
    """Called once when plugins load: call ``register(TechniqueClass)`` for each technique you provide.

    ``TechniqueClass`` subclasses :class:`finetune_sdk.technique.Technique` and has a unique ``name``.
    """


@hookspec
def register_quantizers(register: Callable[[type], None]) -> None:
    """Called once when plugins load: call ``register(QuantizerClass)`` for each quantizer you provide."""


@hookspec
def register_formatters(register: Callable[[type], None]) -> None:
    """Called once when plugins load: call ``register(FormatterClass)`` for each formatter you provide."""


@hookspec
def register_federated_strategies(register: Callable[[type], None]) -> None:
    """Called once when plugins load: call ``register(StrategyClass)`` for each federated strategy you provide.

    ``StrategyClass`` subclasses :class:`finetune_sdk.federated.FederatedStrategy`, has a unique ``name`` and
    builds a Flower strategy; ``Trainer.fit_federated(strategy=name)`` and ``finetune federated server
    --strategy name`` use it.
    """


@hookspec
def register_reward_functions(register: Callable[..., None]) -> None:
    """Called once when plugins load: call ``register(function)`` (or ``register(function, name="...")``) for each
    reward function you provide for GRPO.

    ``function(prompts: list[str], completions: list[str], **columns) -> list[float]`` returns one finite float
    per completion (higher is better; the other columns of the prompt rows arrive as keyword arguments, see
    :mod:`finetune_sdk.objectives.reward_functions`). Users pick it with ``reward_funcs=["name"]`` or ``finetune train --reward name``.
    """


@hookspec
def register_objectives(register: Callable[[type], None]) -> None:
    """Called once when plugins load: call ``register(ObjectiveClass)`` for each training objective you provide.

    ``ObjectiveClass`` subclasses :class:`finetune_sdk.plugin_api.Objective` and has a unique ``name``;
    ``Trainer(...).fit(rows, objective=name)`` and ``finetune train --objective name`` train with it. Its
    ``options`` are accepted (and shown by ``finetune train --objective name --help``) only when it is chosen.
    """


@hookspec
def register_exporters(register: Callable[[type], None]) -> None:
    """Called once when plugins load: call ``register(ExporterClass)`` for each export format you provide.

    ``ExporterClass`` subclasses :class:`finetune_sdk.plugin_api.Exporter` and has a unique ``name`` (the format);
    ``finetune_sdk.export(ref, out, format=name)`` and ``finetune export --format name`` use it.
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Called when the ``finetune`` CLI starts: add your commands with ``cli.add_command(...)``."""


@hookspec
def on_train_begin(context: TrainingContext) -> None:
    """Called after the model and data are ready, just before the first training step."""


@hookspec
def on_log(context: TrainingContext, logs: dict[str, Any]) -> str | None:
    """Called each time the trainer logs (``loss``, ``learning_rate``, ``epoch``... at ``context.step``).

    Return ``STOP_TRAINING`` to stop training after this step (early stopping); any other value is ignored."""


@hookspec
def on_evaluate(context: TrainingContext, metrics: dict[str, Any]) -> str | None:
    """Called after each evaluation with its metrics (``eval_loss``...); return ``STOP_TRAINING`` to stop."""


@hookspec
def on_save(context: TrainingContext, checkpoint_dir: str) -> str | None:
    """Called after a checkpoint has been written to ``checkpoint_dir``; return ``STOP_TRAINING`` to stop."""


@hookspec
def on_train_end(context: TrainingContext, metrics: dict[str, Any]) -> None:
    """Called once training has finished and the result is saved, with the final metrics."""

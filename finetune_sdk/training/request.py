"""Checking what a ``Trainer`` is asked to do, before any model loads: the plugins by name and whether they fit
together, the precision options, where the model comes from and where the result goes."""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, TYPE_CHECKING

from finetune_sdk.errors import ConfigError, closest
from finetune_sdk.formatter import Formatter
from finetune_sdk.options import TRAINING_OPTIONS, Option, option_table, resolve_options
from finetune_sdk.quantizer import Quantizer
from finetune_sdk.technique import Technique
from finetune_sdk.models.sources import ModelSource, resolve_source
from finetune_sdk.training.planning import formatter_fits

if TYPE_CHECKING:
    from finetune_sdk.plugin_manager import PluginHost

NO_QUANTIZER = ("none", "")


def resolve_plugins(host: PluginHost, technique: str, quantizer: str | None,
                    formatter: str | None) -> tuple[Any, Any, Formatter | None]:
    """(technique, quantizer or None, formatter or None) created by name, checked to fit together.

    ``quantizer=None`` is the technique's default (qlora: ``nf4``); ``"none"`` is full precision.
    """
    created = host.create("technique", technique)
    quantizer_name = created.default_quantizer if quantizer is None else quantizer
    if quantizer_name in NO_QUANTIZER:
        quantizer_name = None
    quantizer_obj = host.create("quantizer", quantizer_name) if quantizer_name else None
    if not created.accepts_quantizer(quantizer_obj):
        raise ConfigError(incompatible_quantizer(created.name, quantizer_name))
    formatter_obj: Formatter | None = host.create("formatter", formatter) if formatter else None
    if formatter_obj is not None and not formatter_fits(formatter_obj.task, created.task):
        raise ConfigError(
            f"formatter {formatter!r} makes {formatter_obj.task} data but technique {technique!r} trains "
            f"{created.task}; pick a matching formatter")
    return created, quantizer_obj, formatter_obj


def option_specs(technique: Technique, quantizer: Quantizer | None) -> dict[str, Option]:
    """The options a Trainer with these plugins takes, by name: the training options, then the technique's and the
    quantizer's own."""
    return option_table([TRAINING_OPTIONS, technique.options, quantizer.options if quantizer else ()])


def resolve_run_options(host: PluginHost, technique: Technique, given: Mapping[str, Any],
                        specs: Mapping[str, Option]) -> dict[str, Any]:
    """A Trainer's options: those of ``specs`` (training, technique, quantizer) coerced, range-checked and with
    their defaults, plus the objective options in ``given`` as given: they are resolved once the objective is
    chosen (:func:`finetune_sdk.objectives.run_options`). With ``objective=`` named they are checked against it
    now, and the objective against the technique.

    Raises:
        ConfigError: an unknown option (suggesting the closest, objective options included), an unknown
            objective or one that doesn't train this technique, an option of another objective.
    """
    from finetune_sdk.objectives.choice import get_objective, objective_option_owners, resolve_objective_options

    owners = objective_option_owners(host)
    for name in given:
        if name not in specs and name not in owners:
            raise ConfigError(f"unknown option {name!r}{closest(name, [*specs, *owners])}; see `finetune train "
                              "--help` for the options")
    options = resolve_options({k: v for k, v in given.items() if k in specs}, specs)
    objective_given = {k: v for k, v in given.items() if k not in specs}
    if options.get("objective"):
        objective = get_objective(options["objective"], host)
        if technique.task not in objective.technique_tasks:
            raise ConfigError(f"objective {objective.name!r} trains a {'/'.join(sorted(objective.technique_tasks))} "
                              f"technique, not {technique.name!r} ({technique.task}); pick another objective")
        resolve_objective_options(objective, objective_given, host)
    else:  # a value no objective that takes the option accepts is refused now, the others once one is chosen
        for name, value in objective_given.items():
            errors = []
            for owner in owners[name]:
                spec = get_objective(owner, host)
                try:
                    resolve_objective_options(spec, {name: value}, host)
                except ConfigError as exc:
                    errors.append(exc)
            if len(errors) == len(owners[name]):
                raise errors[0]
    return {**options, **objective_given}


def check_publish_name(publish_as: str | None) -> None:
    """Refuse a registry name ``publish_as`` the registry would refuse, before anything trains (None: no check)."""
    if publish_as is not None:
        from finetune_sdk.registry.refs import validate_name

        validate_name(publish_as)


def incompatible_quantizer(technique: str, quantizer: str | None) -> str:
    """Why ``technique`` can't train on a base quantized with ``quantizer`` (None: full precision), in one line."""
    if technique == "full" and quantizer:
        return (f"technique 'full' can't train a {quantizer}-quantized model (quantized weights have no gradients);"
                " use 'lora' or 'qlora' on a quantized base, or drop the quantizer")
    if quantizer is None:
        return f"technique {technique!r} needs a quantized base; pass quantizer='nf4' or use technique='lora'"
    return f"technique {technique!r} can't train on a base quantized with {quantizer!r}"


def check_precision(options: dict[str, Any]) -> None:
    """bf16 and fp16 exclude each other; fp16 mixed precision needs a CUDA GPU."""
    if options["bf16"] and options["fp16"]:
        raise ConfigError("options bf16 and fp16 are exclusive; pick one")
    if options["fp16"]:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("fp16 mixed precision needs a CUDA GPU; on CPU use bf16=True or neither")


def model_source(model: Any, tokenizer: Any, revision: str | None) -> tuple[ModelSource, Any, Any]:
    """(source, the loaded model or None, the tokenizer or None) for a path, Hub id, model or (model, tokenizer)."""
    if isinstance(model, (str, os.PathLike)):
        return resolve_source(model, revision), None, tokenizer
    if isinstance(model, tuple) and len(model) == 2:
        model, tokenizer = model
    if tokenizer is None:
        raise ConfigError("a model passed in already loaded needs its tokenizer: Trainer(model, tokenizer=...)")
    from finetune_sdk.models.sources import ensure_pad_token

    name = getattr(model, "name_or_path", "") or ""
    if name and Path(name).is_dir():
        source = ModelSource("local", str(Path(name).resolve()), str(Path(name).resolve()))
    else:
        source = ModelSource("object", name or type(model).__name__)
    return source, model, ensure_pad_token(tokenizer)


def default_output_dir(source: ModelSource, technique: str) -> Path:
    """``finetune-runs/<model>-<technique>-<local time>``."""
    stem = Path(source.id).name.removesuffix(".gguf") or "model"
    return Path("finetune-runs") / f"{stem}-{technique}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def check_output_dir(source: ModelSource, output_dir: Path, data: tuple[Any, ...] = (), probe: bool = True) -> None:
    """Refuse an output path that would overwrite something this SDK did not write, or an input (the base model's
    folder or file, a data file of ``data``: paths, ``Task`` lists or stages)."""
    from finetune_sdk.training.output_paths import check_output_path
    from finetune_sdk.training.stages_and_tasks import is_task_list

    base = {"local": source.path, "gguf": source.id}.get(source.kind)
    inputs: list[tuple[str, Any]] = [("base model", base)]
    for item in data:
        for task in item if is_task_list(item) else [item]:
            for path in (getattr(task, "data", task), getattr(task, "eval_data", None)):
                if isinstance(path, (str, os.PathLike)):
                    inputs.append(("data file", path))
    check_output_path(output_dir, inputs=inputs, probe=probe)

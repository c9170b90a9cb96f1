"""The start-a-run form: built from the options the SDK and its plugins declare, checked as the CLI checks them,
with a dataset preview (learnt and masked tokens) and the advisor's recommendation and memory estimate.

Every function here is the same call a Python user makes: :func:`option_schema` lists
:data:`~finetune_sdk.options.TRAINING_OPTIONS` and each registered technique's and quantizer's ``options``;
:func:`check_field` is :meth:`Option.coerce` (the message ``finetune train`` prints for the same value);
:func:`preview_rows` is the formatter's :meth:`~finetune_sdk.formatter.Formatter.segments` encoded by
:func:`~finetune_sdk.data.encoding.encode_segments`; :func:`advice_for` is :func:`finetune_sdk.advice.advisor.advise` and
:func:`finetune_sdk.advice.memory.estimate_for_options`.

Example:
    >>> check_field("r", "0")
    "option 'r' must be at least 1, got 0; LoRA rank"
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from finetune_sdk.errors import ConfigError, FinetuneError
from finetune_sdk.options import TRAINING_OPTIONS, Option

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
#: Options whose value is a file or folder the run reads: confined to the studio's folders like model and data.
PATH_OPTIONS = frozenset({"deepspeed", "fsdp_config", "reward_model"})
#: The options shown first on the form; the others sit under "more options".
COMMON = ("num_train_epochs", "max_steps", "learning_rate", "per_device_train_batch_size", "max_length",
          "logging_steps", "save_steps", "eval_steps", "seed")


def _field(option: Option, group: str) -> dict[str, Any]:
    kind = "bool" if option.type is bool else option.type.__name__
    return {"name": option.name, "type": kind, "default": option.default if not callable(option.default) else None,
            "help": option.help, "choices": list(option.choices) if option.choices else None,
            "range": option.range_text(), "group": group, "common": option.name in COMMON}


def all_specs() -> dict[str, Option]:
    """Every option by name: the training loop's, then each technique's and quantizer's (as ``finetune train``)."""
    from finetune_sdk.cli.option_flags import all_option_specs

    return all_option_specs()


def form_specs() -> dict[str, Option]:
    """:func:`all_specs` plus every objective's options (the first objective's spec of a shared name): every
    option a run form may send, as ``finetune train`` accepts them."""
    from finetune_sdk.objectives.choice import objective_option_specs

    specs = dict(all_specs())
    for name, (first, _) in objective_option_specs().items():
        specs.setdefault(name, first)
    return specs


def option_schema() -> dict[str, Any]:
    """The form: techniques, quantizers and formatters by name, and every option with its type, default, help,
    choices and range; a plugin's option names its plugin as its ``group``."""
    from finetune_sdk.plugin_manager import get_plugin_host

    host = get_plugin_host()
    fields = {o.name: _field(o, "training") for o in TRAINING_OPTIONS}
    owners: dict[str, list[str]] = {}
    for kind in ("technique", "quantizer"):
        for reg in host.registrations(kind):
            for option in getattr(reg.cls, "options", ()):
                fields.setdefault(option.name, _field(option, f"{kind} {reg.name}"))
                owners.setdefault(option.name, []).append(reg.name)
    from finetune_sdk.objectives.choice import registered_objectives

    for objective in registered_objectives(host).values():  # an objective's options apply when it is chosen
        for option in objective.options:
            fields.setdefault(option.name, _field(option, f"objective {objective.name}"))
            owners.setdefault(option.name, []).append(objective.name)
    for name, field in fields.items():
        field["plugins"] = owners.get(name, [])
    return {"techniques": host.names("technique"), "quantizers": host.names("quantizer"),
            "formatters": host.names("formatter"), "fields": list(fields.values())}


def check_field(name: str, value: Any) -> str | None:
    """The one-line error ``finetune train --<name> <value>`` gives for this value, or ``None`` when it's fine."""
    specs = all_specs()
    if name not in specs:
        from finetune_sdk.errors import closest
        from finetune_sdk.objectives.choice import get_objective, objective_option_owners, resolve_objective_options

        owners = objective_option_owners()
        if name not in owners:
            return f"unknown option {name!r}{closest(name, [*specs, *owners])}; see `finetune train --help` for the " \
                   "options"
        problems = []  # an objective's option: fine when one objective that takes it accepts the value
        for owner in owners[name]:
            try:
                resolve_objective_options(get_objective(owner), {name: value})
                return None
            except ConfigError as exc:
                problems.append(str(exc))
        return problems[0]
    try:
        specs[name].coerce(value)
    except ConfigError as exc:
        return str(exc)
    return None


def check_options(values: dict[str, Any]) -> dict[str, str]:
    """Field name -> error for every bad value (empty strings are "unset" and skipped)."""
    errors = {}
    for name, value in values.items():
        if value is None or value == "":
            continue
        problem = check_field(name, value)
        if problem:
            errors[name] = problem
    return errors


def _files(root: Path, visit: int = 20_000) -> list[Path]:
    """Files under ``root`` (hidden folders and run areas skipped), at most ``visit`` looked at: a studio
    started in a home folder stays quick."""
    found: list[Path] = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not d.endswith((".run", ".checkpoints")))
        found += [Path(folder) / n for n in sorted(names) if not n.startswith(".")]
        if len(found) >= visit:
            break
    return found


def data_files(root: Path, limit: int = 200) -> list[str]:
    """Data files (.jsonl, .json, .csv, .parquet) under ``root``, relative, hidden folders skipped."""
    return [str(p.relative_to(root)) for p in _files(root) if p.suffix in DATA_SUFFIXES][:limit]


def model_folders(root: Path, limit: int = 50) -> list[str]:
    """Model folders under ``root`` (a ``config.json`` beside a tokenizer), and ``.gguf`` files."""
    files = _files(root)
    found = [str(p.parent.relative_to(root)) for p in files if p.name == "config.json" and
             ((p.parent / "tokenizer.json").is_file() or (p.parent / "tokenizer_config.json").is_file())]
    found += [str(p.relative_to(root)) for p in files if p.suffix == ".gguf"]
    return found[:limit]


def preview_rows(model: Path, data: Path, formatter: str | None, technique: str = "lora",
                 options: dict[str, Any] | None = None, rows: int = 3) -> dict[str, Any]:
    """How the first ``rows`` rows will be trained: each row's tokens as ``[text, learnt]`` pairs (``learnt``:
    the token counts in the loss, its label is not -100) and the formatter chosen (detected from the columns when
    ``formatter`` is empty). Raises :class:`FinetuneError` for data or a formatter that can't be used."""
    from finetune_sdk.data.rows import load_rows
    from finetune_sdk.data.encoding import encode_segments
    from finetune_sdk.models.sources import load_tokenizer, resolve_source
    from finetune_sdk.options import resolve_options
    from finetune_sdk.training.planning import detect_formatter
    from finetune_sdk.plugin_manager import get_plugin_host

    host = get_plugin_host()
    given = {k: v for k, v in (options or {}).items() if v not in (None, "")}
    resolved = resolve_options({k: v for k, v in given.items() if k in all_specs()}, all_specs())
    loaded = load_rows(str(data))
    tokenizer = load_tokenizer(resolve_source(str(model)))
    task = host.registration("technique", technique).cls.task if technique in host.names("technique") else \
        "causal-lm"
    name = formatter or detect_formatter(loaded.columns, tokenizer, task, host)
    chosen = host.create("formatter", name)
    shown = []
    for index, row in enumerate(list(loaded.rows)[:rows]):
        chosen.validate(row, f"{data} row {index + 1}")
        encoded = encode_segments(chosen.segments(row, tokenizer, resolved), tokenizer, resolved["max_length"])
        shown.append([[tokenizer.decode([token]), label != -100]
                      for token, label in zip(encoded["input_ids"], encoded["labels"])])
    return {"formatter": name, "columns": loaded.columns, "rows": shown, "total_rows": len(loaded)}


def advice_for(model: Path, technique: str, quantizer: str | None, options: dict[str, Any],
               rows: int | None, data: str = "train.jsonl") -> dict[str, Any]:
    """The advisor's recommendation for ``model`` and the memory estimate of the chosen settings (bytes)."""
    from finetune_sdk.advice.advisor import advise
    from finetune_sdk.advice.memory import estimate_for_options, estimated_technique
    from finetune_sdk.advice.machine import format_bytes
    from finetune_sdk.advice.model_shape import load_config
    from finetune_sdk.options import resolve_options

    specs = all_specs()  # an objective's options don't change the estimate's inputs
    resolved = resolve_options({k: v for k, v in options.items() if v not in (None, "") and k in specs}, specs)
    advice = advise(str(model), dataset_rows=rows, seq_len=resolved["max_length"])
    chosen = None
    name = estimated_technique(technique)
    if name is not None:
        try:
            estimate = estimate_for_options(load_config(str(model)), name, quantizer or None, resolved,
                                            resolved["max_length"])
            chosen = {"total": estimate.total, "text": format_bytes(estimate.total), "device": estimate.device}
        except (FinetuneError, AttributeError, KeyError, TypeError, ValueError) as exc:
            chosen = {"error": str(exc)}
    return {"recommended": {"technique": advice.technique, "quantizer": advice.quantizer,
                            "options": advice.options, "fits": advice.fits,
                            "memory": format_bytes(advice.estimate.total), "reasons": advice.reasons,
                            "command": advice.command(str(model), data)},
            "chosen": chosen}

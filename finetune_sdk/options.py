"""Option specs and the parsing of ``Trainer(**options)``.

Techniques, quantizers and the training loop each declare their options as :class:`Option` records. The
``Trainer`` splits the user's keyword arguments among them and refuses an unknown name, suggesting the closest.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from finetune_sdk.errors import ConfigError, closest


@dataclass(frozen=True)
class Option:
    """One option a plugin or the training loop accepts.

    Example:
        >>> Option("r", int, 8, "LoRA rank").coerce("16")
        16
    """

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None

    def coerce(self, value: Any) -> Any:
        """Convert a value (possibly a string from the CLI or a config file) to this option's type."""
        if value is None:
            return None
        try:
            if self.type is bool:
                if isinstance(value, str):
                    lowered = value.strip().lower()
                    if lowered in {"1", "true", "yes", "on"}:
                        return True
                    if lowered in {"0", "false", "no", "off"}:
                        return False
                    raise ValueError(value)
                return bool(value)
            if self.type is list:
                if isinstance(value, str):
                    items = [v.strip() for v in value.split(",") if v.strip()]
                    return items[0] if items == ["all-linear"] else items
                return list(value) if not isinstance(value, str) else value
            if self.type is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            converted = self.type(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"option {self.name!r} must be {self.type.__name__}, got {value!r}; {self.help}"
            ) from None
        if self.choices is not None and converted not in self.choices:
            raise ConfigError(
                f"option {self.name!r} must be one of {', '.join(map(str, self.choices))}, got {converted!r}"
            )
        return converted


TRAINING_OPTIONS: tuple[Option, ...] = (
    Option("num_train_epochs", float, 3.0, "passes over the training data"),
    Option("max_steps", int, -1, "stop after this many optimizer steps (overrides epochs when > 0)"),
    Option("learning_rate", float, None, "peak learning rate (technique default when unset)"),
    Option("per_device_train_batch_size", int, 4, "examples per device per step"),
    Option("per_device_eval_batch_size", int, 8, "examples per device per evaluation step"),
    Option("gradient_accumulation_steps", int, 1, "micro-batches accumulated per optimizer step"),
    Option("max_length", int, 512, "tokens per example; longer ones are truncated"),
    Option("seed", int, 42, "random seed for initialisation, shuffling and dropout"),
    Option("warmup_steps", int, 0, "linear warm-up steps"),
    Option("weight_decay", float, 0.0, "AdamW weight decay"),
    Option("lr_scheduler_type", str, "linear", "learning-rate schedule (transformers names)"),
    Option("max_grad_norm", float, 1.0, "gradient clipping norm"),
    Option("optim", str, "adamw_torch", "optimizer (transformers names, e.g. adamw_torch, paged_adamw_8bit)"),
    Option("eval_steps", int, None, "evaluate every N steps (default: at the end of each epoch)"),
    Option("save_steps", int, 500, "write a checkpoint every N steps, to resume from after a crash (0: none)"),
    Option("logging_steps", int, 10, "log the loss every N steps"),
    Option("bf16", bool, False, "bfloat16 mixed precision"),
    Option("fp16", bool, False, "float16 mixed precision (CUDA only)"),
    Option("gradient_checkpointing", bool, False, "recompute activations in the backward pass to save memory"),
    Option("dtype", str, "auto", "dtype of the loaded weights: auto, float32, bfloat16, float16",
           choices=("auto", "float32", "bfloat16", "float16")),
    Option("revision", str, None, "Hub revision (branch, tag or commit) of the base model"),
    Option("trust_remote_code", bool, False, "allow code from the model repository to run (off unless asked)"),
    Option("system_prompt", str, None, "system prompt the chat formatters add when an example has none"),
    Option("report_to", str, "none", "experiment trackers for transformers (none, tensorboard, wandb...)"),
    Option("packing", bool, True, "pack several examples per row (no padding) where the model supports it; "
           "off: batches grouped by length"),
    Option("group_by_length", bool, True, "when not packing, batch examples of similar length (less padding)"),
    Option("cache_features", bool, True, "classifier: run the frozen backbone once and train the head on cached "
           "features (off: the backbone runs every epoch)"),
    Option("dpo_beta", float, 0.1, "DPO temperature: how far the policy may move from the reference"),
    Option("task_mixing", str, "proportional", "multi-task sampling: proportional, explicit or temperature",
           choices=("proportional", "explicit", "temperature")),
    Option("mixing_temperature", float, 2.0, "temperature T of task_mixing='temperature' (p ~ n^(1/T))"),
    Option("fsdp", str, None, "FSDP mode passed to transformers, e.g. 'full_shard auto_wrap'"),
    Option("fsdp_config", str, None, "FSDP config file (JSON) passed to transformers"),
    Option("deepspeed", str, None, "DeepSpeed config file (JSON) passed to transformers"),
)


def option_table(groups: Iterable[Iterable[Option]]) -> dict[str, Option]:
    """Merge option groups into one name -> Option table (later groups win a name)."""
    table: dict[str, Option] = {}
    for group in groups:
        for option in group:
            table[option.name] = option
    return table


def resolve_options(given: Mapping[str, Any], specs: Mapping[str, Option]) -> dict[str, Any]:
    """Return every option in ``specs`` with the user's value (coerced) or its default.

    An unknown name is an error naming it and its closest matches.

    >>> resolve_options({"r": "4"}, {"r": Option("r", int, 8, "rank")})
    {'r': 4}
    """
    for name in given:
        if name not in specs:
            raise ConfigError(
                f"unknown option {name!r}{closest(name, specs)}; see `finetune train --help` for the options"
            )
    return {name: spec.coerce(given[name]) if name in given else spec.default for name, spec in specs.items()}

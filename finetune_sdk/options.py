"""Option specs and the parsing of ``Trainer(**options)``.

Techniques, quantizers, objectives and the training loop each declare their options as :class:`Option` records. The
``Trainer`` splits the user's keyword arguments among them and refuses an unknown name, suggesting the closest.
"""

from __future__ import annotations

import math
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
    #: Range of a number option, in JSON Schema's terms (``None``: unbounded on that side). Float options also
    #: refuse ``nan`` and infinities. For a ``list`` option the bounds apply to its number of items.
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    exclusive_maximum: float | None = None

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
                    converted = items[0] if items == ["all-linear"] else items
                else:
                    converted = list(value)
            else:
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
        self.check_range(converted)
        return converted

    def check_range(self, value: Any) -> None:
        """Raise :class:`ConfigError` when ``value`` is outside this option's declared range (or not finite).

        >>> Option("r", int, 8, "LoRA rank", minimum=1).check_range(0)
        Traceback (most recent call last):
        finetune_sdk.errors.ConfigError: option 'r' must be at least 1, got 0; LoRA rank
        """
        if value is None or isinstance(value, bool):
            return
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"option {self.name!r} must be a finite number, got {value!r}; {self.help}")
        counted = isinstance(value, (list, tuple))
        number = len(value) if counted else value
        if not isinstance(number, (int, float)):
            return
        for bound, holds, words in ((self.minimum, number >= (self.minimum or 0), "at least"),
                                    (self.exclusive_minimum, number > (self.exclusive_minimum or 0), "greater than"),
                                    (self.maximum, number <= (self.maximum or 0), "at most"),
                                    (self.exclusive_maximum, number < (self.exclusive_maximum or 0), "less than")):
            if bound is not None and not holds:
                verb = f"have {words} {_number(bound)} items" if counted else f"be {words} {_number(bound)}"
                raise ConfigError(f"option {self.name!r} must {verb}, got {value!r}; {self.help}")

    def range_text(self) -> str:
        """The declared range for help screens, e.g. ``x >= 1`` or ``0 <= x < 1`` (empty when unbounded).

        >>> Option("lora_dropout", float, 0.05, "dropout", minimum=0, exclusive_maximum=1).range_text()
        '0 <= x < 1'
        """
        low = (f"{_number(self.minimum)} <= " if self.minimum is not None else
               f"{_number(self.exclusive_minimum)} < " if self.exclusive_minimum is not None else "")
        high = (f" <= {_number(self.maximum)}" if self.maximum is not None else
                f" < {_number(self.exclusive_maximum)}" if self.exclusive_maximum is not None else "")
        if low and not high:  # "1 <= x" reads better as "x >= 1"
            bound, sign = low.split()[0], ">=" if self.minimum is not None else ">"
            return f"x {sign} {bound}"
        return f"{low}x{high}" if low or high else ""


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


TRAINING_OPTIONS: tuple[Option, ...] = (
    Option("num_train_epochs", float, 3.0, "passes over the training data", exclusive_minimum=0),
    Option("max_steps", int, -1, "stop after this many optimizer steps (overrides epochs when > 0)", minimum=-1),
    Option("learning_rate", float, None, "peak learning rate (technique default when unset; 0 trains nothing)",
           minimum=0),
    Option("per_device_train_batch_size", int, 4, "examples per device per step", minimum=1),
    Option("per_device_eval_batch_size", int, 8, "examples per device per evaluation step", minimum=1),
    Option("gradient_accumulation_steps", int, 1, "micro-batches accumulated per optimizer step", minimum=1),
    Option("max_length", int, 512, "tokens per example; longer ones are truncated", minimum=2),
    Option("seed", int, 42, "random seed for initialisation, shuffling and dropout", minimum=0,
           maximum=2**32 - 1),
    Option("warmup_steps", int, 0, "linear warm-up steps", minimum=0),
    Option("weight_decay", float, 0.0, "AdamW weight decay", minimum=0),
    Option("lr_scheduler_type", str, "linear", "learning-rate schedule (transformers names)"),
    Option("max_grad_norm", float, 1.0, "gradient clipping norm (0: no clipping)", minimum=0),
    Option("optim", str, "adamw_torch", "optimizer (transformers names, e.g. adamw_torch, paged_adamw_8bit)"),
    Option("eval_steps", int, None, "evaluate every N steps (default: at the end of each epoch)", minimum=1),
    Option("save_steps", int, 500, "write a checkpoint every N steps, to resume from after a crash (0: none)",
           minimum=0),
    Option("logging_steps", int, 10, "log the loss every N steps", minimum=1),
    Option("bf16", bool, None, "bfloat16 autocast mixed precision; given (true or false) it overrides the "
           "automatic precision choice of dtype='auto'"),
    Option("fp16", bool, False, "float16 mixed precision (CUDA only)"),
    Option("gradient_checkpointing", bool, False, "recompute activations in the backward pass to save memory"),
    Option("dtype", str, "auto", "dtype of the loaded weights: auto (bfloat16 for an adapter's frozen base on a "
           "bf16 GPU or an AVX512-BF16/AMX CPU, else float32), float32, bfloat16, float16",
           choices=("auto", "float32", "bfloat16", "float16")),
    Option("revision", str, None, "Hub revision (branch, tag or commit) of the base model"),
    Option("trust_remote_code", bool, False, "allow code from the model repository to run (off unless asked)"),
    Option("system_prompt", str, None, "system prompt the chat formatters add when an example has none"),
    Option("report_to", str, "none", "experiment trackers for transformers (none, tensorboard, wandb...)"),
    Option("packing", bool, True, "pack several examples per row (no padding) where the model supports it; "
           "off: batches grouped by length"),
    Option("group_by_length", bool, True, "when not packing, batch examples of similar length (less padding)"),
    Option("objective", str, None, "what training optimises: sft, dpo, orpo, simpo, kto, grpo... or a plugin's "
           "(default: from the data's formatter, preference pairs: dpo); its options apply only to it"),
    Option("cache_features", bool, True, "classifier: run the frozen backbone once and train the head on cached "
           "features (off: the backbone runs every epoch)"),
    Option("task_mixing", str, "proportional", "multi-task sampling: proportional, explicit or temperature",
           choices=("proportional", "explicit", "temperature")),
    Option("mixing_temperature", float, 2.0, "temperature T of task_mixing='temperature' (p ~ n^(1/T))",
           exclusive_minimum=0),
    Option("chunked_loss", bool, True, "causal LM: compute the loss in chunks of tokens from the last hidden "
           "state, never holding the full logits (where the model supports it)"),
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

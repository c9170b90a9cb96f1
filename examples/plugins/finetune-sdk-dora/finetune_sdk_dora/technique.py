"""DoRA (Liu et al., 2024): LoRA with each adapted weight split into a magnitude vector and a direction."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from finetune_sdk.options import Option
from finetune_sdk.plugins.techniques.lora import LoraTechnique, lora_options


class DoraTechnique(LoraTechnique):
    """Weight-decomposed low-rank adaptation through PEFT (``LoraConfig(use_dora=True)``).

    Saving, loading and merging are LoRA's: PEFT records ``use_dora`` in ``adapter_config.json`` and rebuilds
    the magnitude vectors when the adapter is loaded.

    Example:
        >>> from finetune_sdk import Trainer
        >>> trainer = Trainer("path/to/model", technique="dora", r=16)  # doctest: +SKIP
    """

    name: ClassVar[str] = "dora"
    description: ClassVar[str] = (
        "DoRA: LoRA on the direction plus a trained magnitude per output (PEFT use_dora); r=8 by default")
    options: ClassVar[tuple[Option, ...]] = lora_options(8, 16, 0.05, None)

    def lora_config(self, options: Mapping[str, Any]) -> Any:
        """The PEFT config of the adapter: LoRA's, with ``use_dora=True``."""
        config = super().lora_config(options)
        config.use_dora = True
        return config

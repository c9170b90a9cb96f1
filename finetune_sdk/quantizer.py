"""The :class:`Quantizer` plugin type: how the base model's weights are stored while training."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from finetune_sdk.options import Option


class Quantizer:
    """Base class of weight quantizers.

    Example:
        >>> from finetune_sdk.quantizer import Quantizer
        >>> class NoOp(Quantizer):
        ...     name = "noop"
        ...     def quantization_config(self, options):
        ...         return None
        >>> NoOp().bits
        16
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    #: Bits per weight of the quantized linear layers (used by memory estimates and listings).
    bits: ClassVar[int] = 16
    options: ClassVar[tuple[Option, ...]] = ()

    def quantization_config(self, options: Mapping[str, Any]) -> Any:
        """Return the ``quantization_config`` passed to ``from_pretrained``."""
        raise NotImplementedError

    def after_load(self, model: Any) -> None:
        """Fix up a freshly loaded quantized model (called before any forward pass)."""

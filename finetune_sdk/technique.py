"""The :class:`Technique` plugin type: how a loaded model is made trainable, saved and loaded back."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from finetune_sdk.formatter import CAUSAL_LM
from finetune_sdk.options import Option
from finetune_sdk.quantizer import Quantizer


class Technique:
    """Base class of fine-tuning techniques.

    A technique names the task it trains (``"causal-lm"`` or ``"classification"``), the quantizers it works
    with (``None`` meaning full precision), its options, and three steps:

    * :meth:`prepare` turns the loaded (possibly quantized) model into the model to train;
    * :meth:`save` writes what was trained into a folder;
    * :meth:`load` puts what :meth:`save` wrote back onto a freshly loaded base model.

    Example (a technique that trains only the biases):
        >>> from finetune_sdk.technique import Technique
        >>> class BitFit(Technique):
        ...     name = "bitfit"
        ...     def prepare(self, model, options, tokenizer):
        ...         for pname, param in model.named_parameters():
        ...             param.requires_grad = pname.endswith("bias")
        ...         return model
        >>> BitFit().supported_quantizers
        frozenset({None})
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    task: ClassVar[str] = CAUSAL_LM
    default_quantizer: ClassVar[str | None] = None
    supported_quantizers: ClassVar[frozenset[str | None]] = frozenset({None})
    #: True when the result is a PEFT adapter that needs its base model to load.
    saves_adapter: ClassVar[bool] = False
    #: True when the saved result is a whole model directory that loads without the base model.
    result_is_model: ClassVar[bool] = False
    #: What it trains, for the memory estimate: ``"adapter"`` (adapters over a frozen base), ``"all weights"`` or
    #: ``"head"`` (a classifier head over a frozen backbone); ``None``: the estimate doesn't cover it.
    trains: ClassVar[str | None] = None
    default_learning_rate: ClassVar[float] = 2e-4
    options: ClassVar[tuple[Option, ...]] = ()

    def accepts_quantizer(self, quantizer: Quantizer | None) -> bool:
        """True when this technique can train on a base quantized by ``quantizer`` (None: full precision)."""
        return (quantizer.name if quantizer is not None else None) in self.supported_quantizers

    def prepare(self, model: Any, options: Mapping[str, Any], tokenizer: Any) -> Any:
        """Return the model to train (freeze, wrap or add modules here)."""
        raise NotImplementedError

    def save(self, model: Any, directory: Path) -> None:
        """Write the trained weights (safetensors) into ``directory``."""
        model.save_pretrained(directory, safe_serialization=True)

    def load(self, base_model: Any, directory: Path, options: Mapping[str, Any]) -> Any:
        """Return ``base_model`` with the weights :meth:`save` wrote in ``directory`` applied."""
        raise NotImplementedError

    def merge(self, model: Any) -> Any:
        """Return a plain model with the trained weights folded in (adapters merged)."""
        return model

"""LoRA (Hu et al., 2021) and QLoRA (Dettmers et al., 2023) through PEFT."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from finetune_sdk.log import known_dependency_warnings
from finetune_sdk.options import Option
from finetune_sdk.quantizer import Quantizer
from finetune_sdk.technique import Technique


def lora_options(r: int, alpha: int, dropout: float, targets: str | None) -> tuple[Option, ...]:
    return (
        Option("r", int, r, "LoRA rank", minimum=1),
        Option("lora_alpha", int, alpha, "LoRA scaling numerator (scale = lora_alpha / r)", minimum=1),
        Option("lora_dropout", float, dropout, "dropout on the LoRA input", minimum=0, exclusive_maximum=1),
        Option("target_modules", list, targets,
               "module names to adapt, comma separated, or 'all-linear' (default: PEFT's per-architecture choice)",
               minimum=1),
        Option("bias", str, "none", "train biases too: none, all or lora_only", choices=("none", "all", "lora_only")),
        Option("use_rslora", bool, False, "rank-stabilised scaling lora_alpha / sqrt(r)"),
    )


LINEAR_TYPES = ("Linear", "Linear4bit", "Linear8bitLt", "Conv1D")


def check_target_modules(model: Any, targets: Any) -> None:
    """Refuse ``target_modules`` names that match no module of ``model`` (PEFT's rule: the full name, or its last
    dotted parts), naming the linear layers the model does have. ``None`` and a single string (``all-linear`` or
    a regular expression) are left to PEFT."""
    from finetune_sdk.errors import ConfigError

    if targets is None or isinstance(targets, str):
        return
    names = [name for name, _ in model.named_modules()]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if type(m).__name__ in LINEAR_TYPES and n} - {"lm_head"})
        raise ConfigError(f"option 'target_modules': {', '.join(map(repr, unmatched))} match no module of "
                          f"{type(model).__name__}; its linear layers are {', '.join(linear) or 'none'}")


class LoraTechnique(Technique):
    """Low-rank adapters on the attention (or chosen) layers; the base weights stay frozen.

    Example:
        >>> from finetune_sdk import Trainer
        >>> trainer = Trainer("path/to/model", technique="lora", r=16)  # doctest: +SKIP
    """

    name: ClassVar[str] = "lora"
    description: ClassVar[str] = "LoRA adapters (PEFT) on a frozen base; r=8 by default, as in the LoRA paper"
    saves_adapter: ClassVar[bool] = True
    trains: ClassVar[str | None] = "adapter"
    default_learning_rate: ClassVar[float] = 2e-4
    options: ClassVar[tuple[Option, ...]] = lora_options(8, 16, 0.05, None)

    def accepts_quantizer(self, quantizer: Quantizer | None) -> bool:
        return True

    def prepare(self, model: Any, options: Mapping[str, Any], tokenizer: Any) -> Any:
        with known_dependency_warnings():
            from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

            if isinstance(model, PeftModel):  # a second fit() continues training the same adapter
                return model
            if getattr(model, "is_quantized", False) or getattr(model, "is_loaded_in_4bit", False):
                model = prepare_model_for_kbit_training(
                    model, use_gradient_checkpointing=bool(options.get("gradient_checkpointing"))
                )
            elif options.get("gradient_checkpointing"):
                model.enable_input_require_grads()
            check_target_modules(model, options.get("target_modules"))
            return get_peft_model(model, self.lora_config(options))

    def lora_config(self, options: Mapping[str, Any]) -> Any:
        """The PEFT ``LoraConfig`` for ``options``; override it to make a LoRA variant (DoRA, rsLoRA...)."""
        from peft import LoraConfig

        return LoraConfig(
            r=options["r"],
            lora_alpha=options["lora_alpha"],
            lora_dropout=options["lora_dropout"],
            target_modules=options["target_modules"],
            bias=options["bias"],
            use_rslora=options["use_rslora"],
            task_type="CAUSAL_LM",
        )

    def save(self, model: Any, directory: Path) -> None:
        model.save_pretrained(directory, safe_serialization=True)

    def load(self, base_model: Any, directory: Path, options: Mapping[str, Any]) -> Any:
        with known_dependency_warnings():
            from peft import PeftModel

            return PeftModel.from_pretrained(base_model, directory, is_trainable=False)

    def merge(self, model: Any) -> Any:
        return model.merge_and_unload()


class QLoraTechnique(LoraTechnique):
    """LoRA on a base loaded in 4-bit NF4 with double quantization, as in the QLoRA paper (r=64, all linear)."""

    name: ClassVar[str] = "qlora"
    description: ClassVar[str] = "LoRA on a 4-bit NF4 double-quantized base (bitsandbytes); r=64 on all linear layers"
    default_quantizer: ClassVar[str | None] = "nf4"
    options: ClassVar[tuple[Option, ...]] = lora_options(64, 16, 0.05, "all-linear")

    def accepts_quantizer(self, quantizer: Quantizer | None) -> bool:
        return quantizer is not None and quantizer.bits <= 4

"""The pairwise reward model (InstructGPT's, Ouyang et al., 2022): a scalar head on a frozen or LoRA-tuned backbone,
trained with the Bradley-Terry loss on ``preference`` pairs (see :mod:`finetune_sdk.models.reward_model`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from finetune_sdk.formatter import REWARD
from finetune_sdk.options import Option
from finetune_sdk.plugins.techniques.classifier import resolve_pooling
from finetune_sdk.plugins.techniques.lora import check_target_modules, lora_options
from finetune_sdk.quantizer import Quantizer
from finetune_sdk.technique import Technique

HEAD_WEIGHTS = "reward_head.safetensors"
HEAD_CONFIG = "reward_config.json"
BACKBONES = ("frozen", "lora")


class RewardModelTechnique(Technique):
    """A reward model: ``score(prompts, completions)`` gives one float per answer, higher = better.

    ``backbone="frozen"`` (default) trains only the linear head on the backbone's pooled hidden states (features
    cached, as for the classifier); ``backbone="lora"`` also trains LoRA adapters on the backbone (LoRA options
    as for the ``lora`` technique). Trained on ``preference`` rows (prompt, chosen, rejected).

    Example:
        >>> from finetune_sdk import Trainer
        >>> trainer = Trainer("path/to/model", technique="reward-model", formatter="preference")  # doctest: +SKIP
        >>> trainer.fit("pairs.jsonl").metrics["pairwise_accuracy"]  # doctest: +SKIP
    """

    name: ClassVar[str] = "reward-model"
    description: ClassVar[str] = ("pairwise reward model: scalar head (Bradley-Terry loss) on a frozen or "
                                  "LoRA-tuned backbone, trained on preference pairs")
    task: ClassVar[str] = REWARD
    trains: ClassVar[str | None] = "head"
    default_learning_rate: ClassVar[float] = 1e-3
    options: ClassVar[tuple[Option, ...]] = (
        Option("backbone", str, "frozen", "reward model: frozen (train the head only) or lora (head + LoRA "
               "adapters on the backbone)", choices=BACKBONES),
        Option("pooling", str, "auto", "hidden-state pooling: auto, last, first or mean",
               choices=("auto", "last", "first", "mean")),
        Option("center_rewards_coefficient", float, None, "reward model: weight of mean((r_chosen + r_rejected)^2) "
               "added to the loss to keep rewards near 0 (TRL's name; default: none)", minimum=0),
        *lora_options(8, 16, 0.05, None),
    )

    def accepts_quantizer(self, quantizer: Quantizer | None) -> bool:
        return True  # a frozen backbone may be stored in any precision; LoRA trains on a quantized one as QLoRA

    def prepare(self, model: Any, options: Mapping[str, Any], tokenizer: Any) -> Any:
        from finetune_sdk.models.reward_model import RewardModel

        if isinstance(model, RewardModel):  # a second fit() continues training the same model
            return model
        train_backbone = options["backbone"] == "lora"
        if train_backbone and (getattr(model, "is_quantized", False) or getattr(model, "is_loaded_in_4bit", False)):
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        reward = RewardModel(model, resolve_pooling(options["pooling"], model), tokenizer.pad_token_id,
                             train_backbone)
        if train_backbone:
            reward.backbone = self.lora_backbone(model, options)
        return reward

    def lora_backbone(self, model: Any, options: Mapping[str, Any]) -> Any:
        """``model`` with LoRA adapters (PEFT); the options are the ``lora`` technique's."""
        from peft import LoraConfig, get_peft_model

        from finetune_sdk.log import known_dependency_warnings

        check_target_modules(model, options.get("target_modules"))
        config = LoraConfig(r=options["r"], lora_alpha=options["lora_alpha"], lora_dropout=options["lora_dropout"],
                            target_modules=options["target_modules"], bias=options["bias"],
                            use_rslora=options["use_rslora"], task_type="FEATURE_EXTRACTION")
        with known_dependency_warnings():
            return get_peft_model(model, config)

    def save(self, model: Any, directory: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.head.state_dict().items()}, str(directory / HEAD_WEIGHTS))
        backbone = "lora" if model.train_backbone else "frozen"
        if model.train_backbone:
            model.backbone.save_pretrained(directory, safe_serialization=True)
        config = {"backbone": backbone, "pooling": model.pooling, "hidden_size": model.head.in_features}
        (directory / HEAD_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    def load(self, base_model: Any, directory: Path, options: Mapping[str, Any]) -> Any:
        from safetensors.torch import load_file

        from finetune_sdk.errors import FinetuneError
        from finetune_sdk.models.reward_model import RewardModel

        try:
            config = json.loads((directory / HEAD_CONFIG).read_text(encoding="utf-8"))
            backbone, pooling = str(config["backbone"]), str(config["pooling"])
            if backbone not in BACKBONES:
                raise ValueError(f"backbone {backbone!r} is not one of {', '.join(BACKBONES)}")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FinetuneError(f"{directory / HEAD_CONFIG}: unreadable reward model config "
                                f"({type(exc).__name__}: {exc}); re-create the result") from None
        if backbone == "lora":
            from peft import PeftModel

            from finetune_sdk.log import known_dependency_warnings

            with known_dependency_warnings():
                base_model = PeftModel.from_pretrained(base_model, directory, is_trainable=False)
        model = RewardModel(base_model, pooling, options.get("pad_token_id"))
        model.train_backbone = backbone == "lora"  # saved again as it was trained; its adapter is not trainable
        weights = load_file(str(directory / HEAD_WEIGHTS))
        expected = {name: tuple(t.shape) for name, t in model.head.state_dict().items()}
        found = {name: tuple(t.shape) for name, t in weights.items()}
        if found != expected:
            raise FinetuneError(f"{directory / HEAD_WEIGHTS}: head has shapes {found}, but a backbone of hidden size "
                                f"{model.head.in_features} needs {expected}; the head belongs to another model")
        model.head.load_state_dict(weights)
        return model

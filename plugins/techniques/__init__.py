"""Builtin techniques: lora, qlora, full, classifier and reward-model."""

from finetune_sdk.hookspecs import hookimpl
from finetune_sdk.plugins.techniques.classifier import ClassifierTechnique
from finetune_sdk.plugins.techniques.full import FullTechnique
from finetune_sdk.plugins.techniques.lora import LoraTechnique, QLoraTechnique
from finetune_sdk.plugins.techniques.reward_model import RewardModelTechnique

TECHNIQUES = (LoraTechnique, QLoraTechnique, FullTechnique, ClassifierTechnique, RewardModelTechnique)


@hookimpl
def register_techniques(register):
    for technique in TECHNIQUES:
        register(technique)

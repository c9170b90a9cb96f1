"""Builtin techniques: lora, qlora, full and classifier."""

from finetune_sdk.hookspecs import hookimpl
from finetune_sdk.plugins.techniques.classifier import ClassifierTechnique
from finetune_sdk.plugins.techniques.full import FullTechnique
from finetune_sdk.plugins.techniques.lora import LoraTechnique, QLoraTechnique

TECHNIQUES = (LoraTechnique, QLoraTechnique, FullTechnique, ClassifierTechnique)


@hookimpl
def register_techniques(register):
    for technique in TECHNIQUES:
        register(technique)

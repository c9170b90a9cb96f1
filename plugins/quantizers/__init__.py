"""Builtin quantizers: nf4 (4-bit NF4 with double quantization) and int8 (LLM.int8), both via bitsandbytes."""

from finetune_sdk.hookspecs import hookimpl
from finetune_sdk.plugins.quantizers.bnb import Int8Quantizer, NF4Quantizer


@hookimpl
def register_quantizers(register):
    register(NF4Quantizer)
    register(Int8Quantizer)

"""bitsandbytes quantizers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from finetune_sdk.options import Option
from finetune_sdk.quantizer import Quantizer


def compute_dtype(name: str) -> Any:
    """Map ``auto``/``bfloat16``/``float16``/``float32`` to a torch dtype (auto: bf16 on a bf16 GPU, else fp32)."""
    import torch

    if name == "auto":
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return getattr(torch, name)


def disable_cpu_repack(model: Any) -> int:
    """Turn off bitsandbytes' AVX512-BF16 weight repacking on every ``Linear4bit``; return how many.

    bitsandbytes 0.50 repacks a ``Linear4bit``'s weights the first time it runs in eval mode without grad on a
    CPU with AVX512-BF16; afterwards gradients through the layer are silently wrong and layers whose
    in_features is not a multiple of 64 crash. Training after ``generate()`` must stay correct.
    """
    import bitsandbytes as bnb

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


class NF4Quantizer(Quantizer):
    """4-bit NormalFloat weights with double quantization (QLoRA's storage format)."""

    name: ClassVar[str] = "nf4"
    description: ClassVar[str] = "4-bit NormalFloat with double quantization (bitsandbytes)"
    bits: ClassVar[int] = 4
    options: ClassVar[tuple[Option, ...]] = (
        Option("compute_dtype", str, "auto", "dtype of the 4-bit matmuls: auto, bfloat16, float16 or float32",
               choices=("auto", "bfloat16", "float16", "float32")),
        Option("double_quant", bool, True, "quantize the quantization constants too (saves ~0.4 bit/weight)"),
    )

    def quantization_config(self, options: Mapping[str, Any]) -> Any:
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=options.get("double_quant", True),
            bnb_4bit_compute_dtype=compute_dtype(options.get("compute_dtype", "auto")),
            bnb_4bit_quant_storage="uint8",
        )

    def after_load(self, model: Any) -> None:
        disable_cpu_repack(model)


class Int8Quantizer(Quantizer):
    """8-bit weights with outlier decomposition (LLM.int8())."""

    name: ClassVar[str] = "int8"
    description: ClassVar[str] = "8-bit weights, LLM.int8() outlier decomposition (bitsandbytes)"
    bits: ClassVar[int] = 8
    options: ClassVar[tuple[Option, ...]] = (
        Option("int8_threshold", float, 6.0, "outlier threshold of LLM.int8()", minimum=0),
    )

    def quantization_config(self, options: Mapping[str, Any]) -> Any:
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=options.get("int8_threshold", 6.0))

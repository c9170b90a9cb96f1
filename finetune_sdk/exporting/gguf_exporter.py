"""The builtin ``gguf`` export format (llama.cpp, Ollama, LM Studio), registered through ``register_exporters``.

Example:
    >>> GGUFExporter().check({"quantization": ["q4_k_m", "q8_0"]})
    >>> GGUFExporter().check({"quantization": "q9"})
    Traceback (most recent call last):
    finetune_sdk.errors.ConfigError: unknown GGUF quantization 'q9'; use one of f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0, q6_k, q5_k_m, q5_k_s, q4_k_m, q4_k_s, q3_k_l, q3_k_m, q3_k_s, q2_k
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from finetune_sdk.errors import ConfigError
from finetune_sdk.exporting.exporter import Exporter
from finetune_sdk.exporting.quantization import check_quantizations
from finetune_sdk.hookspecs import hookimpl


class GGUFExporter(Exporter):
    """One GGUF file (merged, or a LoRA adapter plus its base) and an Ollama ``Modelfile``; see
    :func:`finetune_sdk.exporting.export` for the settings."""

    name = "gguf"
    description = "GGUF for llama.cpp, Ollama and LM Studio, with an Ollama Modelfile"
    settings = ("quantization", "attach", "adapter_only")

    def check(self, settings: Mapping[str, Any]) -> None:
        super().check(settings)
        quantizations = check_quantizations(settings.get("quantization", "q8_0"))
        if settings.get("adapter_only") and len(quantizations) > 1:
            raise ConfigError("adapter_only writes one base file; give one quantization for it")

    def export(self, ref: str, out: Path, *, name: str | None = None, registry: Any = None,
               **settings: Any) -> Any:
        from finetune_sdk.exporting.pipeline import attach_to_registry, run_export

        quantizations = check_quantizations(settings.get("quantization", "q8_0"))
        attach = bool(settings.get("attach"))
        if attach and Path(ref).is_dir():
            raise ConfigError(f"attach: {ref} is a result folder; publish it first and export the registry version "
                              "(e.g. name@1) to attach the GGUF file to it")
        done = run_export(ref, Path(out), quantization=quantizations if len(quantizations) > 1 else quantizations[0],
                          name=name, registry=registry, adapter_only=bool(settings.get("adapter_only")))
        if attach:
            attach_to_registry(done, ref, registry)
        return done


@hookimpl
def register_exporters(register: Callable[[type], None]) -> None:
    """Register the builtin ``gguf`` format."""
    register(GGUFExporter)

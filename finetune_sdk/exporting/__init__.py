"""``finetune_sdk.export``: a fine-tuned result as one GGUF file for llama.cpp, Ollama and LM Studio.

The adapter is merged into the base loaded in float32 (never into 4-bit weights, also after qlora), the merged model
is written with :func:`~finetune_sdk.exporting.gguf_file.write_gguf`, and an Ollama ``Modelfile`` is written beside
it. The folder appears atomically.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


EXPORT_KIND = "gguf-export"


@dataclass(frozen=True)
class GGUFExport:
    """What :func:`export` wrote."""

    directory: Path
    gguf_path: Path
    modelfile_path: Path
    quantization: str
    ollama_name: str
    chat_format: str | None
    summary: dict[str, Any] = field(default_factory=dict)
    #: every file written, by quantization (several with ``quantization=[...]``); for an adapter-only export
    #: ``{"adapter": path}``
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def ollama_command(self) -> str:
        """The one command that registers the model with Ollama and starts a chat."""
        from finetune_sdk.exporting.modelfile import ollama_command

        return ollama_command(self.ollama_name, self.directory)


def export(ref: str | os.PathLike[str], out: str | os.PathLike[str], *, format: str = "gguf",
           quantization: str | list[str] | None = None, name: str | None = None, attach: bool = False,
           registry: Any = None, adapter_only: bool = False, **settings: Any) -> Any:
    """Merge the result ``ref`` and write it to the folder ``out`` as a GGUF file plus an Ollama ``Modelfile``.

    Args:
        ref: a result folder written by ``Trainer.fit`` (LoRA, QLoRA or a full fine-tune) or a registry reference
            (``"bot@production"``, ``"hf://org/repo@v3"``).
        out: the folder to write: ``<name>-<quantization>.gguf``, ``Modelfile`` and ``finetune_manifest.json``.
            It must not exist, be empty, or hold an earlier export (which is replaced); anything else is refused.
        format: the export format: ``"gguf"`` (builtin) or one a plugin registers (``register_exporters``; the
            installed ones: :func:`exporter_names`). ``quantization``, ``attach`` and ``adapter_only`` are GGUF's
            settings; another format takes its own as ``**settings``.
        quantization: GGUF: ``f16``, ``bf16``, ``f32``, ``q8_0`` (default), the 4/5-bit ``q4_0``, ``q4_1``, ``q5_0``,
            ``q5_1`` (ggml's block-32 types; the output matrix stays at q8_0 with them), or llama.cpp's K-quant
            mixes ``q6_k``, ``q5_k_m``, ``q5_k_s``, ``q4_k_m``, ``q4_k_s``, ``q3_k_l``, ``q3_k_m``, ``q3_k_s``, ``q2_k``
            (see ``docs/export.md``). A list
            (``["q4_k_m", "q8_0"]``) writes one file per entry from one merge; the first gets ``Modelfile``, the
            others ``<name>-<q>.Modelfile``.
        name: the model's name in the file and for Ollama (default: the registry name or the folder's name).
        attach: also store the GGUF file and its Modelfile as artifacts of the registry version ``ref`` names
            (pushed to the Hub with it and listed in its model card); ``ref`` must then be a registry reference.
        registry: the :class:`~finetune_sdk.registry.Registry` to resolve names in.
        adapter_only: write the LoRA adapter alone as a GGUF adapter (llama.cpp's ``convert_lora_to_gguf.py``
            format: ``--lora`` in llama.cpp, ``ADAPTER`` in an Ollama Modelfile), plus the base model as a GGUF
            file for the Modelfile's ``FROM``; ``quantization`` is then the base file's.

    Returns:
        A :class:`GGUFExport` with the paths, the quantization, the chat format and ``ollama_command``.

    Raises:
        ConfigError: an unknown format (naming the installed ones), setting or quantization, an output path that holds something else, an unsupported
            model family or RoPE scaling, ``adapter_only`` for a result that isn't a LoRA adapter, or a classifier
            result; all before the model loads where possible.

    Supported families: Llama (also SmolLM2, TinyLlama, Llama 3.x with ``llama3``/``linear``/``yarn`` RoPE scaling),
    Mistral (written as ``llama``, as llama.cpp does), Qwen2, Qwen3, Gemma 2, Gemma 3 (text), Phi-3, GPT-2. The chat template in the file is the format the model was trained in (the tokenizer's own template with
    the ``chat-template`` formatter; ChatML, Llama 2 or Alpaca with those formatters).

    Example:
        >>> import finetune_sdk
        >>> done = finetune_sdk.export("support-bot@production", "exports/bot", quantization="q8_0")  # doctest: +SKIP
        >>> print(done.ollama_command)  # doctest: +SKIP
        ollama create support-bot -f exports/bot/Modelfile && ollama run support-bot
    """
    from finetune_sdk.errors import ConfigError, closest
    from finetune_sdk.plugin_manager import get_plugin_host

    installed = get_plugin_host().names("exporter")
    if format not in installed:
        raise ConfigError(f"export format {format!r} is not installed{closest(format, installed)}; installed: "
                          f"{', '.join(installed)} (a plugin adds one through register_exporters)")
    exporter = get_plugin_host().create("exporter", format)
    given = {key: value for key, value in (("quantization", quantization), ("attach", attach),
                                            ("adapter_only", adapter_only)) if value not in (None, False)}
    given.update(settings)
    exporter.check(given)
    return exporter.export(str(ref), Path(out), name=name, registry=registry, **given)


def exporter_names() -> list[str]:
    """The installed export formats (registered through ``register_exporters``), without importing torch.

    >>> "gguf" in exporter_names()
    True
    """
    from finetune_sdk.plugin_manager import get_plugin_host

    return get_plugin_host().names("exporter")


def ollama_name(text: str) -> str:
    """A valid Ollama model name from ``text``: lower case letters, digits, ``-``, ``_`` and ``.``.

    >>> ollama_name("Support Bot@3")
    'support-bot-3'
    """
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")
    return cleaned or "finetuned"


__all__ = ["GGUFExport", "export", "exporter_names", "ollama_name"]

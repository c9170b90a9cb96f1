"""The Ollama ``Modelfile`` written beside an exported GGUF file."""

from __future__ import annotations

import json
from typing import Any

from finetune_sdk.exporting.chat_formats import ChatFormat


def _quoted(text: str) -> str:
    """A Modelfile string in JSON-style double quotes (backslashes and quotes escaped)."""
    return json.dumps(text, ensure_ascii=False)


def _block(text: str) -> str:
    """A multi-line Modelfile value in triple quotes; text holding triple quotes falls back to one quoted line."""
    return f'"""{text}"""' if '"""' not in text and not text.endswith('"') else _quoted(text)


def modelfile(gguf_name: str, chat_format: ChatFormat | None, *, eos_token: str | None,
              system_prompt: str | None = None, raw_prompt: bool = False) -> str:
    """The text of a Modelfile for ``./gguf_name``.

    Args:
        gguf_name: the GGUF file's name, in the same folder as the Modelfile (``FROM ./name``).
        chat_format: the format the model was trained in, specialised to its tokenizer and default system prompt
            (its Go template becomes ``TEMPLATE``, its end markers ``stop`` parameters); None leaves the template to
            Ollama, which reads the GGUF's chat template.
        eos_token: always a stop token.
        system_prompt: the ``system_prompt`` the training used, written as ``SYSTEM`` (Ollama adds it as the first
            message when a request has no system message; the Go template also holds it as its default).
        raw_prompt: the model was trained on plain text: ``TEMPLATE {{ .Prompt }}``.

    Example:
        >>> from finetune_sdk.exporting.chat_formats import CHATML
        >>> print(modelfile("bot-q8_0.gguf", CHATML, eos_token="</s>"))  # doctest: +ELLIPSIS
        FROM ./bot-q8_0.gguf
        TEMPLATE \"\"\"{{- range .Messages }}<|im_start|>{{ .Role }}
        {{ .Content }}<|im_end|>{{ if eq .Role "assistant" }}</s>{{ end }}
        ...
        PARAMETER stop "<|im_end|>"
        PARAMETER stop "<|im_start|>"
        PARAMETER stop "</s>"
        <BLANKLINE>
    """
    lines = [f"FROM ./{gguf_name}"]
    if raw_prompt:
        lines.append('TEMPLATE "{{ .Prompt }}"')
    elif chat_format is not None:
        lines.append(f"TEMPLATE {_block(chat_format.ollama())}")
    if system_prompt:
        lines.append(f"SYSTEM {_block(system_prompt)}")
    stops: list[str] = list(chat_format.stop_strings()) if chat_format is not None and not raw_prompt else []
    if eos_token and eos_token not in stops:
        stops.append(eos_token)
    lines += [f"PARAMETER stop {_quoted(stop)}" for stop in stops]
    return "\n".join(lines) + "\n"


def ollama_command(name: str, folder: Any) -> str:
    """The one shell command that registers the export with Ollama and chats with it (the path shell-quoted).

    >>> ollama_command("bot", "exports/my bot")
    "ollama create bot -f 'exports/my bot/Modelfile' && ollama run bot"
    """
    import shlex
    from pathlib import Path

    return f"ollama create {name} -f {shlex.quote(str(Path(folder) / 'Modelfile'))} && ollama run {name}"

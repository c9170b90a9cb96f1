"""The Ollama ``Modelfile`` written beside an exported GGUF file."""

from __future__ import annotations

import logging
from typing import Any

from finetune_sdk.exporting.chat_formats import ChatFormat

logger = logging.getLogger("finetune_sdk")


def _ollama_unquote(text: str) -> str | None:
    """``unquote`` of Ollama's ``parser/parser.go``: a ``\"\"\"`` block or a ``"`` string, else the text as is;
    None when a quote is still open."""
    if text.startswith('"""'):
        return text[3:-3] if len(text) >= 6 and text.endswith('"""') else None
    if text.startswith('"'):
        return text[1:-1] if len(text) >= 2 and text.endswith('"') else None
    return text


def ollama_reads(quoted: str) -> str | None:
    """The value Ollama's Modelfile parser reads from ``quoted`` at the end of a line, or None when it would stop
    earlier. Its parser has no escapes: a value ends at the first space, tab or newline after which the text read so
    far (trimmed) is a whole quoted string, and it drops characters that aren't printable.

    >>> ollama_reads('"say hi"')
    'say hi'
    >>> print(ollama_reads('"say "hi" now"'))  # stops after `"hi"`: the rest is a parse error
    None
    """
    for index, char in enumerate(quoted + "\n"):
        if char in " \t\r\n":
            value = _ollama_unquote(quoted[:index].strip())
            if value is not None:
                return value if index == len(quoted) else None
    return None


def _faithful(text: str, quotes: tuple[str, ...]) -> str | None:
    """``text`` in the first of ``quotes`` that Ollama reads back exactly, or None when none does."""
    if not all(char.isprintable() or char in "\t\r\n" for char in text):
        return None
    for quote in quotes:
        if ollama_reads(f"{quote}{text}{quote}") == text:
            return f"{quote}{text}{quote}"
    return None


def _quoted(text: str) -> str | None:
    """A one-line Modelfile string (``"..."``, or a ``\"\"\"`` block when that reads back and this doesn't)."""
    return _faithful(text, ('"', '"""'))


def _block(text: str) -> str | None:
    """A multi-line Modelfile value in triple quotes (or ``"..."`` when only that reads back); None when Ollama's
    parser, which has no escapes, can't read ``text`` back exactly either way."""
    return _faithful(text, ('"""', '"'))


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

    def add(command: str, value: str | None, what: str) -> None:
        if value is None:  # Ollama's parser has no escapes: better left out than read back wrong
            logger.warning("the Modelfile leaves out the %s: Ollama's Modelfile parser can't read it back exactly "
                           "(it has no escapes for quotes followed by a space); the GGUF file carries it", what)
        else:
            lines.append(f"{command} {value}")

    if raw_prompt:
        lines.append('TEMPLATE "{{ .Prompt }}"')
    elif chat_format is not None:
        add("TEMPLATE", _block(chat_format.ollama()), "chat template")
    if system_prompt:
        add("SYSTEM", _block(system_prompt), "system prompt")
    stops: list[str] = list(chat_format.stop_strings()) if chat_format is not None and not raw_prompt else []
    if eos_token and eos_token not in stops:
        stops.append(eos_token)
    for stop in stops:
        add("PARAMETER stop", _quoted(stop), f"stop string {stop!r}")
    return "\n".join(lines) + "\n"


def ollama_command(name: str, folder: Any) -> str:
    """The one shell command that registers the export with Ollama and chats with it (the path shell-quoted).

    >>> ollama_command("bot", "exports/my bot")
    "ollama create bot -f 'exports/my bot/Modelfile' && ollama run bot"
    """
    import shlex
    from pathlib import Path

    return f"ollama create {name} -f {shlex.quote(str(Path(folder) / 'Modelfile'))} && ollama run {name}"

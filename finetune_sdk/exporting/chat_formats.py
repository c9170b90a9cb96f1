"""Chat formats an exported model can be prompted in: a Jinja template for the GGUF file (what llama.cpp and LM
Studio read), the Go template Ollama's ``Modelfile`` needs, the stop strings, and a reference rendering used to tell
which format a tokenizer's own Jinja template is.

Ollama's templates are Go ``text/template`` over ``.Messages``; llama.cpp adds BOS itself (``add_bos_token``), so
neither the Go templates nor the reference renderings start with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Messages = list[dict[str, str]]

ALPACA_HEADER = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                 "request.\n\n")


@dataclass(frozen=True)
class ChatFormat:
    """One prompt format: its Jinja template, Ollama Go template, stop strings and reference rendering."""

    name: str
    jinja: str
    ollama: str
    stops: tuple[str, ...]
    render: Callable[[Messages, Any], str]
    supports_system: bool = True


def _chatml(messages: Messages, tokenizer: Any) -> str:
    body = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return body + "<|im_start|>assistant\n"


def _llama3(messages: Messages, tokenizer: Any) -> str:
    body = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
                   for m in messages)
    return body + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def _llama2(messages: Messages, tokenizer: Any) -> str:
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    system, out, first = "", "", True
    for m in messages:
        if m["role"] == "system":
            system = f"<<SYS>>\n{m['content']}\n<</SYS>>\n\n"
        elif m["role"] == "user":
            out += ("" if first else bos) + f"[INST] {system}{m['content'].strip()} [/INST]"
            system, first = "", False
        else:
            out += f" {m['content'].strip()} {eos}"
    return out


def _alpaca(messages: Messages, tokenizer: Any) -> str:
    user = [m["content"] for m in messages if m["role"] == "user"][-1]
    return f"{ALPACA_HEADER}### Instruction:\n{user}\n\n### Response:\n"


CHATML = ChatFormat(
    "chatml",
    jinja=("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
           "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
           "{% endif %}"),
    ollama=("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
            "<|im_start|>assistant\n"),
    stops=("<|im_end|>", "<|im_start|>"), render=_chatml)

LLAMA3 = ChatFormat(
    "llama3",
    jinja=("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
           "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
    ollama=("{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
            "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"),
    stops=("<|eot_id|>", "<|start_header_id|>"), render=_llama3)

LLAMA2 = ChatFormat(
    "llama2-chat",
    jinja=("{% if messages[0]['role'] == 'system' %}{% set system = '<<SYS>>\\n' + messages[0]['content'] + "
           "'\\n<</SYS>>\\n\\n' %}{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
           "{% for message in messages %}{% if message['role'] == 'user' %}"
           "{{ bos_token + '[INST] ' + (system if loop.first else '') + message['content'] | trim + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
           "{% endif %}{% endfor %}"),
    ollama=('{{- $system := "" }}{{- $first := true }}{{- range .Messages }}'
            '{{- if eq .Role "system" }}{{ $system = .Content }}'
            '{{- else if eq .Role "user" }}{{ if not $first }}<s>{{ end }}[INST] '
            '{{ if $system }}<<SYS>>\n{{ $system }}\n<</SYS>>\n\n{{ end }}{{ .Content }} [/INST]'
            '{{ $system = "" }}{{ $first = false }}'
            '{{- else }} {{ .Content }} </s>{{ end }}{{ end }}'),
    stops=("[INST]", "</s>"), render=_llama2)

ALPACA = ChatFormat(
    "alpaca",
    jinja=("{% for message in messages %}{% if message['role'] == 'user' %}{{ '" + ALPACA_HEADER.replace("\n", "\\n")
           + "### Instruction:\\n' + message['content'] + '\\n\\n### Response:\\n' }}{% elif message['role'] == "
           "'assistant' %}{{ message['content'] + eos_token + '\\n\\n' }}{% endif %}{% endfor %}"),
    ollama=('{{- range .Messages }}{{- if eq .Role "user" }}' + ALPACA_HEADER
            + '### Instruction:\n{{ .Content }}\n\n### Response:\n'
            '{{ else if eq .Role "assistant" }}{{ .Content }}\n\n{{ end }}{{ end }}'),
    stops=("### Instruction:",), render=_alpaca, supports_system=False)

#: Formats recognised in a tokenizer's own template, and the one each builtin formatter trains in.
KNOWN_FORMATS = (CHATML, LLAMA3, LLAMA2)
FORMATTER_FORMATS = {"chatml": CHATML, "llama2-chat": LLAMA2, "alpaca": ALPACA}

PROBES: tuple[Messages, ...] = (
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "How are you?"}],
)


def render_jinja(template: str, messages: Messages, tokenizer: Any, add_generation_prompt: bool = True) -> str:
    """``template`` rendered as transformers renders chat templates (its sandboxed Jinja environment)."""
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def detect_format(template: str | None, tokenizer: Any) -> ChatFormat | None:
    """The known format ``template`` renders (every probe conversation it accepts matches), or None."""
    if not template:
        return None
    bos = tokenizer.bos_token or ""
    for candidate in KNOWN_FORMATS:
        matched = 0
        for messages in PROBES:
            try:
                text = render_jinja(template, messages, tokenizer)
            except Exception:  # noqa: BLE001 - a template may refuse a system message; that probe then says nothing
                continue
            if bos and text.startswith(bos):
                text = text[len(bos):]
            if text != candidate.render(messages, tokenizer):
                matched = -1
                break
            matched += 1
        if matched > 0:
            return candidate
    return None

"""Chat formats an exported model can be prompted in: a Jinja template for the GGUF file (what llama.cpp and LM
Studio read), the Go template Ollama's ``Modelfile`` needs, the stop strings, and a reference rendering used to tell
which format a tokenizer's own Jinja template is.

A :class:`ChatFormat` is specialised to one tokenizer (its BOS and EOS strings, written into both templates as
text) and to a default system prompt (the training ``system_prompt``, or the one a template adds by itself, as
SmolLM2's does), used when the messages carry no system message. Ollama's templates are Go ``text/template`` over
``.Messages``; llama.cpp adds BOS itself (``add_bos_token``), so neither the Go templates nor the reference
renderings start with it. Which format a model was trained in is the formatter's answer to
:meth:`finetune_sdk.formatter.Formatter.chat_format`; :func:`export_chat` turns it into the templates.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar

Messages = list[dict[str, str]]

ALPACA_HEADER = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                 "request.\n\n")


def _jinja_string(text: str) -> str:
    """``text`` as a Jinja (and llama.cpp minja) string literal."""
    return json.dumps(text, ensure_ascii=False)


def _go_text(text: str) -> str:
    """``text`` written verbatim by a Go template (a quoted action when it holds the action delimiters)."""
    return text if "{{" not in text and "}}" not in text else "{{ " + json.dumps(text, ensure_ascii=False) + " }}"


def with_default_system(template: str, system: str | None) -> str:
    """``template`` preceded by a statement that adds ``system`` as the first message when there is none."""
    if not system:
        return template
    message = "{'role': 'system', 'content': " + _jinja_string(system) + "}"
    return ("{%- set messages = messages if (messages and messages[0]['role'] == 'system') else [" + message
            + "] + messages %}" + template)


@dataclass(frozen=True)
class ChatFormat:
    r"""One prompt format for one tokenizer: its Jinja template, Ollama Go template, stops and reference rendering.

    Attributes:
        bos, eos: the tokenizer's BOS and EOS strings ("" when it has none), written as text into the templates.
        adds_bos: the tokenizer (and so llama.cpp and Ollama) puts BOS before a prompt by itself; when it doesn't,
            the Go template of a format that starts with BOS writes it.
        answer_end: text after each assistant turn's end marker (ChatML trained by finetune-sdk on a tokenizer whose
            EOS is not ``<|im_end|>`` learns ``<|im_end|>`` + EOS).
        default_system: the system prompt used when the messages have none (None: no system message).

    Example:
        >>> chatml = ChatML(eos="</s>", answer_end="</s>", default_system="Be brief.")
        >>> chatml.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
        ...                {"role": "user", "content": "Bye"}])
        '<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|></s>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n'
    """

    name: ClassVar[str] = ""
    stops: ClassVar[tuple[str, ...]] = ()
    supports_system: ClassVar[bool] = True
    #: The Jinja template starts with ``bos_token`` (llama.cpp drops it when it adds BOS itself).
    starts_with_bos: ClassVar[bool] = False

    bos: str = ""
    eos: str = ""
    answer_end: str = ""
    default_system: str | None = None
    adds_bos: bool = True

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, default_system: str | None = None, **fields: Any) -> ChatFormat:
        """The format with ``tokenizer``'s BOS/EOS strings (and the answer end finetune-sdk trains in)."""
        eos = getattr(tokenizer, "eos_token", None) or ""
        fields.setdefault("answer_end", cls.trained_answer_end(eos))
        return cls(bos=getattr(tokenizer, "bos_token", None) or "", eos=eos, adds_bos=_adds_bos(tokenizer),
                   default_system=(default_system or None) if cls.supports_system else None, **fields)

    @staticmethod
    def trained_answer_end(eos: str) -> str:
        return ""

    def replace(self, **fields: Any) -> ChatFormat:
        return dataclasses.replace(self, **fields)

    def jinja(self) -> str:
        """The Jinja chat template (``tokenizer.chat_template`` of the GGUF file), default system prompt included."""
        return with_default_system(self._jinja(), self.default_system)

    def ollama(self) -> str:
        """The Go template for the Modelfile's ``TEMPLATE``, default system prompt included."""
        raise NotImplementedError

    def stop_strings(self) -> tuple[str, ...]:
        """The format's end markers and EOS: Ollama's ``PARAMETER stop`` values."""
        return tuple(dict.fromkeys([*self.stops, *([self.eos] if self.eos else [])]))

    def render(self, messages: Messages) -> str:
        """The prompt for ``messages`` with the generation prompt, as the templates render it (no leading BOS)."""
        if self.default_system and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system}, *messages]
        return self._render(messages)

    def _jinja(self) -> str:
        raise NotImplementedError

    def _render(self, messages: Messages) -> str:
        raise NotImplementedError

    def _go_start(self, system_turn: str = "") -> str:
        """The Go template's start: BOS when the format starts with it and the tokenizer doesn't add it, then
        ``system_turn`` (the default system turn) when the first message isn't a system one."""
        start = _go_text(self.bos) if self.starts_with_bos and self.bos and not self.adds_bos else ""
        if not self.default_system or not system_turn:
            return start
        return (start + '{{- if not (and .Messages (eq (index .Messages 0).Role "system")) }}' + _go_text(system_turn)
                + "{{ end }}")


def _adds_bos(tokenizer: Any) -> bool:
    """Whether encoding a text puts BOS before it (what the GGUF file's ``add_bos_token`` says)."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None or not hasattr(tokenizer, "encode"):
        return False
    plain, marked = tokenizer.encode("a", add_special_tokens=False), tokenizer.encode("a", add_special_tokens=True)
    return len(marked) > len(plain) and marked[0] == bos_id


class ChatML(ChatFormat):
    """``<|im_start|>role\\ncontent<|im_end|>\\n`` turns, then ``<|im_start|>assistant\\n``."""

    name = "chatml"
    stops = ("<|im_end|>", "<|im_start|>")

    @staticmethod
    def trained_answer_end(eos: str) -> str:
        return eos if eos and eos != "<|im_end|>" else ""

    def _jinja(self) -> str:
        end = (f"{{% if message['role'] == 'assistant' %}}{{{{ {_jinja_string(self.answer_end)} }}}}{{% endif %}}"
               if self.answer_end else "")
        return ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                "'<|im_end|>' }}" + end + "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|im_start|>assistant\\n' }}{% endif %}")

    def ollama(self) -> str:
        end = '{{ if eq .Role "assistant" }}' + _go_text(self.answer_end) + "{{ end }}" if self.answer_end else ""
        return (self._go_start(f"<|im_start|>system\n{self.default_system}<|im_end|>\n")
                + "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>" + end
                + "\n{{ end }}<|im_start|>assistant\n")

    def _render(self, messages: Messages) -> str:
        body = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>"
                       f"{self.answer_end if m['role'] == 'assistant' else ''}\n" for m in messages)
        return body + "<|im_start|>assistant\n"


class Llama3(ChatFormat):
    """``<|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>`` turns (contents trimmed)."""

    name = "llama3"
    stops = ("<|eot_id|>", "<|start_header_id|>")
    starts_with_bos = True

    def _jinja(self) -> str:
        return ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
                "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")

    def ollama(self) -> str:
        system = f"<|start_header_id|>system<|end_header_id|>\n\n{(self.default_system or '').strip()}<|eot_id|>"
        return (self._go_start(system)
                + "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
                "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n")

    def _render(self, messages: Messages) -> str:
        body = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
                       for m in messages)
        return body + "<|start_header_id|>assistant<|end_header_id|>\n\n"


class Llama2(ChatFormat):
    """``<s>[INST] <<SYS>>\\nsystem\\n<</SYS>>\\n\\nuser [/INST] answer </s>``, BOS before every later turn."""

    name = "llama2-chat"
    stops = ("[INST]",)
    starts_with_bos = True

    def _jinja(self) -> str:
        return ("{% if messages[0]['role'] == 'system' %}{% set system = '<<SYS>>\\n' + messages[0]['content'] + "
                "'\\n<</SYS>>\\n\\n' %}{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
                "{% for message in messages %}{% if message['role'] == 'user' %}"
                "{{ bos_token + '[INST] ' + (system if loop.first else '') + message['content'] | trim + ' [/INST]' }}"
                "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
                "{% endif %}{% endfor %}")

    def ollama(self) -> str:
        system = json.dumps(self.default_system or "", ensure_ascii=False)
        return (self._go_start() + "{{- $system := " + system + " }}{{- $first := true }}{{- range .Messages }}"
                '{{- if eq .Role "system" }}{{ $system = .Content }}'
                '{{- else if eq .Role "user" }}{{ if not $first }}' + _go_text(self.bos) + "{{ end }}[INST] "
                "{{ if $system }}<<SYS>>\n{{ $system }}\n<</SYS>>\n\n{{ end }}{{ .Content }} [/INST]"
                '{{ $system = "" }}{{ $first = false }}'
                "{{- else }} {{ .Content }} " + _go_text(self.eos) + "{{ end }}{{ end }}")

    def _render(self, messages: Messages) -> str:
        system, out, first = "", "", True
        for m in messages:
            if m["role"] == "system":
                system = f"<<SYS>>\n{m['content']}\n<</SYS>>\n\n"
            elif m["role"] == "user":
                out += ("" if first else self.bos) + f"[INST] {system}{m['content'].strip()} [/INST]"
                system, first = "", False
            else:
                out += f" {m['content'].strip()} {self.eos}"
        return out


class Alpaca(ChatFormat):
    """The Stanford Alpaca prompt (one instruction, no system message)."""

    name = "alpaca"
    stops = ("### Instruction:",)
    supports_system = False

    def _jinja(self) -> str:
        return ("{% for message in messages %}{% if message['role'] == 'user' %}{{ '"
                + ALPACA_HEADER.replace("\n", "\\n") + "### Instruction:\\n' + message['content'] + "
                "'\\n\\n### Response:\\n' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + "
                "eos_token + '\\n\\n' }}{% endif %}{% endfor %}")

    def ollama(self) -> str:
        return (self._go_start() + '{{- range .Messages }}{{- if eq .Role "user" }}' + ALPACA_HEADER
                + '### Instruction:\n{{ .Content }}\n\n### Response:\n{{ else if eq .Role "assistant" }}'
                "{{ .Content }}" + _go_text(self.eos) + "\n\n{{ end }}{{ end }}")

    def _render(self, messages: Messages) -> str:
        out = ""
        for m in messages:
            if m["role"] == "user":
                out += f"{ALPACA_HEADER}### Instruction:\n{m['content']}\n\n### Response:\n"
            elif m["role"] == "assistant":
                out += f"{m['content']}{self.eos}\n\n"
        return out


#: Every format by name: the names a formatter's ``chat_format`` may answer with.
FORMATS: dict[str, type[ChatFormat]] = {f.name: f for f in (ChatML, Llama3, Llama2, Alpaca)}
#: Formats recognised in a tokenizer's own template.
KNOWN_FORMATS = (ChatML, Llama3, Llama2)
#: What a formatter's ``chat_format`` answers for the tokenizer's own template and for plain text.
TOKENIZER_TEMPLATE, RAW_TEXT = "tokenizer", "raw"
#: The formats with the tiny test tokenizer's ``<s>``/``</s>``, as finetune-sdk trains them (docs and tests).
CHATML, LLAMA3 = ChatML(eos="</s>", answer_end="</s>"), Llama3(eos="</s>")
LLAMA2, ALPACA = Llama2(bos="<s>", eos="</s>"), Alpaca(bos="<s>", eos="</s>")

#: Conversations a tokenizer's template is rendered with to tell its format: with and without a system message,
#: one and two turns.
PROBES: tuple[Messages, ...] = (
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "How are you?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "How are you?"}],
)
_SYSTEM_MARK = "\ue000system\ue001"


def render_jinja(template: str, messages: Messages, tokenizer: Any, add_generation_prompt: bool = True) -> str:
    """``template`` rendered as transformers renders chat templates (its sandboxed Jinja environment)."""
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def detect_format(template: str | None, tokenizer: Any) -> ChatFormat | None:
    """The known format ``template`` renders, told by rendering it, or None.

    Each candidate (ChatML, with or without EOS after answers; Llama 3; Llama 2) is specialised to ``tokenizer``;
    a template that adds a system message of its own when there is none (SmolLM2's) gives the candidate that
    default. The candidate must render every probe conversation the template accepts exactly as the template does.

    Example:
        >>> from finetune_sdk.testing.tiny import tiny_tokenizer
        >>> detect_format(ChatML(default_system="Be kind.").jinja(), tiny_tokenizer()).default_system
        'Be kind.'
    """
    if not template:
        return None
    rendered = [_render_or_none(template, messages, tokenizer) for messages in PROBES]
    if not any(text is not None for text in rendered):
        return None
    eos = getattr(tokenizer, "eos_token", None) or ""
    for family in KNOWN_FORMATS:
        for answer_end in dict.fromkeys(["", family.trained_answer_end(eos)]):
            candidate = family.for_tokenizer(tokenizer, answer_end=answer_end)
            candidate = candidate.replace(default_system=_default_system(template, candidate, tokenizer))
            if all(text is None or _same(text, candidate, messages) for messages, text in zip(PROBES, rendered)):
                return candidate
    return None


def _render_or_none(template: str, messages: Messages, tokenizer: Any) -> str | None:
    """The template's rendering, or None when the template refuses the conversation."""
    try:
        return render_jinja(template, messages, tokenizer)
    except Exception:  # noqa: BLE001 - a template may refuse a system message; that probe then says nothing
        return None


def _same(text: str, candidate: ChatFormat, messages: Messages) -> bool:
    """``text`` is ``candidate``'s rendering (after BOS, for a format that starts with it)."""
    expected = candidate.render(messages)
    return text == expected or (candidate.starts_with_bos and text == candidate.bos + expected)


def _default_system(template: str, candidate: ChatFormat, tokenizer: Any) -> str | None:
    """The system prompt ``template`` adds when there is none, read as ``candidate`` renders system messages."""
    if not candidate.supports_system:
        return None
    alone = [{"role": "user", "content": "Hi there"}]
    plain = _render_or_none(template, alone, tokenizer)
    marked = _render_or_none(template, [{"role": "system", "content": _SYSTEM_MARK}, *alone], tokenizer)
    if plain is None or marked is None or _same(plain, candidate, alone) or marked.count(_SYSTEM_MARK) != 1:
        return None
    before, after = marked.split(_SYSTEM_MARK)
    if plain.startswith(before) and plain.endswith(after) and len(plain) > len(before) + len(after):
        return plain[len(before):len(plain) - len(after)]
    return None


@dataclass(frozen=True)
class ExportChat:
    """What an export writes about the chat format.

    Attributes:
        jinja: the GGUF file's ``tokenizer.chat_template`` (the default system prompt baked in), or None.
        ollama: the format whose Go template, stops and default system prompt go in the Modelfile, or None (Ollama
            then reads the GGUF file's template).
        raw_prompt: the model was trained on plain text: the Modelfile's template is ``{{ .Prompt }}``.
    """

    jinja: str | None
    ollama: ChatFormat | None
    raw_prompt: bool = False


def export_chat(trained: str | ChatFormat | None, tokenizer: Any, system_prompt: str | None = None) -> ExportChat:
    """The templates for a model trained in ``trained`` (a formatter's ``chat_format`` answer) with ``tokenizer``.

    ``trained`` is a name of :data:`FORMATS`, ``"tokenizer"`` (the tokenizer's own template), ``"raw"`` (plain
    text), a :class:`ChatFormat` a plugin defines, or None (not told: the tokenizer's own template). The training
    ``system_prompt`` becomes the default system prompt of both templates.

    Raises:
        ConfigError: ``trained`` is a name no format has.

    Example:
        >>> from finetune_sdk.testing.tiny import tiny_tokenizer
        >>> chat = export_chat("chatml", tiny_tokenizer(), system_prompt="Be brief.")
        >>> chat.ollama.name, chat.ollama.answer_end, chat.ollama.default_system
        ('chatml', '</s>', 'Be brief.')
    """
    own = getattr(tokenizer, "chat_template", None) or None
    if trained == RAW_TEXT:
        return ExportChat(own, None, raw_prompt=True)
    if isinstance(trained, str) and trained != TOKENIZER_TEMPLATE:
        if trained not in FORMATS:
            from finetune_sdk.errors import ConfigError

            raise ConfigError(f"the formatter says it trains in chat format {trained!r}; known formats: "
                              f"{', '.join([*FORMATS, TOKENIZER_TEMPLATE, RAW_TEXT])}")
        trained = FORMATS[trained].for_tokenizer(tokenizer)
    if isinstance(trained, ChatFormat):
        if system_prompt and trained.supports_system:
            trained = trained.replace(default_system=system_prompt)
        return ExportChat(trained.jinja(), trained)
    detected = detect_format(own, tokenizer)
    if detected is not None and system_prompt:
        detected = detected.replace(default_system=system_prompt)
    return ExportChat(with_default_system(own, system_prompt) if own else None, detected)

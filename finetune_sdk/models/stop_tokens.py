"""Where generation stops: the token ids that end the model's turn, for every path that generates.

``generate()`` (inference, comparisons, rating sessions) and GRPO's sampling all stop at :func:`stop_token_ids`:

1. the model's ``generation_config.eos_token_id``, an int or a list (Llama 3 Instruct's
   ``[<|end_of_text|>, <|eom_id|>, <|eot_id|>]``, Qwen2.5-Instruct's ``[<|im_end|>, <|endoftext|>]``);
2. the tokenizer's EOS;
3. the chat format's end of turn: the formatter's :meth:`~finetune_sdk.formatter.Formatter.end_of_turn` (ChatML's
   ``<|im_end|>``, the chat template's own marker found by :func:`template_end_of_turn`: Llama 3's ``<|eot_id|>``,
   Gemma's ``<end_of_turn>``, Phi-3's ``<|end|>``); without a formatter, the tokenizer's chat template's.

A marker that is not a single token of the vocabulary is left out (generation still stops at EOS).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TYPE_CHECKING

if TYPE_CHECKING:
    from finetune_sdk.formatter import Formatter

#: Private-use characters around the probe answer: no template rewrites them and no tokenizer treats them specially.
_PROBE_USER, _PROBE_ANSWER = "\ue000u\ue001", "\ue000a\ue001"


def stop_token_ids(tokenizer: Any, model: Any = None, formatter: Formatter | None = None) -> list[int]:
    """The ids generation stops at (see the module docstring), in that order, without duplicates.

    Args:
        tokenizer: the model's tokenizer.
        model: the model (a PEFT wrapper too); its ``generation_config.eos_token_id`` (or ``config.eos_token_id``
            when it has no generation config) is read. ``None``: not read.
        formatter: the formatter prompts are rendered with; ``None``: the tokenizer's chat template's end of turn.

    Returns:
        A list of token ids (ints), possibly empty for a tokenizer with no EOS and no chat format.

    Example:
        >>> from finetune_sdk.testing.tiny import tiny_tokenizer
        >>> tok = tiny_tokenizer()  # EOS </s>, a ChatML chat template
        >>> tok.convert_ids_to_tokens(stop_token_ids(tok))
        ['</s>', '<|im_end|>']
    """
    ids: list[int] = []
    config = getattr(model, "generation_config", None) if model is not None else None
    if model is not None:
        source = config if config is not None else getattr(model, "config", None)
        ids += _as_ids(getattr(source, "eos_token_id", None))
    ids += _as_ids(tokenizer.eos_token_id)
    markers = formatter.end_of_turn(tokenizer) if formatter is not None else template_end_of_turn(tokenizer)
    ids += [i for i in (single_token_id(tokenizer, marker) for marker in markers) if i is not None]
    return list(dict.fromkeys(ids))


def single_token_id(tokenizer: Any, token: str | None) -> int | None:
    """The id of ``token`` when it is one token of the vocabulary (a special or added token, or a vocabulary entry),
    else ``None``.

    >>> from finetune_sdk.testing.tiny import tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> single_token_id(tok, "<|im_end|>") == tok.convert_tokens_to_ids("<|im_end|>"), single_token_id(tok, "<eot>")
    (True, None)
    """
    if not token:
        return None
    found = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(found, int) or found < 0:
        return None
    if found == tokenizer.unk_token_id and token != tokenizer.unk_token:
        return None
    return found


def template_end_of_turn(tokenizer: Any) -> list[str]:
    """The token that closes an assistant turn in the tokenizer's chat template, as a one-item list (``[]`` when the
    tokenizer has no template, the template can't render a user/assistant exchange, or no special token follows the
    answer).

    The template renders a probe exchange; the text right after the assistant's answer (leading spaces and newlines
    aside) starts with the end-of-turn marker: the longest of the tokenizer's special and added tokens it starts
    with (``<|eot_id|>`` for Llama 3, ``<end_of_turn>`` for Gemma, ``<|end|>`` for Phi-3, ``</s>`` for Mistral).

    >>> from finetune_sdk.testing.tiny import tiny_tokenizer
    >>> template_end_of_turn(tiny_tokenizer()), template_end_of_turn(tiny_tokenizer(chat_template=False))
    (['<|im_end|>'], [])
    """
    if not getattr(tokenizer, "chat_template", None):
        return []
    messages = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_ANSWER}]
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that refuses the probe (e.g. one that needs a system message)
        return []
    at = rendered.rfind(_PROBE_ANSWER) if isinstance(rendered, str) else -1
    if at < 0:
        return []
    after = rendered[at + len(_PROBE_ANSWER):].lstrip(" \n")
    found = [t for t in _marker_tokens(tokenizer) if after.startswith(t)]
    return [max(found, key=len)] if found else []


def _marker_tokens(tokenizer: Any) -> Iterable[str]:
    tokens = set(getattr(tokenizer, "all_special_tokens", None) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    tokens.update(str(getattr(t, "content", t)) for t in decoder.values())
    return sorted(t for t in tokens if t)


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if hasattr(value, "tolist"):
        value = value.tolist()
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else []

"""Tokenizing formatted rows into ``input_ids`` and ``labels`` with prompt tokens masked (-100)."""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from finetune_sdk.data.rows import Rows
from finetune_sdk.errors import DataError
from finetune_sdk.formatter import Formatter, Segment
from finetune_sdk.data.labels import label_key

IGNORE_INDEX = -100
logger = logging.getLogger("finetune_sdk")


@dataclass
class Encoded:
    """Tokenized examples ready for the collator."""

    examples: list[dict[str, Any]] = field(default_factory=list)
    dropped: int = 0
    tokens: int = 0


def encode_segments(segments: Sequence[Segment], tokenizer: Any, max_length: int | None) -> dict[str, list[int]]:
    """Tokenize segments, concatenate, and label the ``train=True`` ones (prompt tokens get -100).

    Consecutive segments with the same ``train`` flag are tokenized as one text, so marking a piece literal never
    changes how ordinary text is split into tokens. Only special-token strings in template segments
    (``literal=False``) become special ids; literal segments (user content) are encoded as plain text.

    Returns ``{"input_ids": [...], "labels": [...]}``: two lists of ints of the same length, cut to ``max_length``.

    Example:
        >>> from finetune_sdk.testing.tiny import tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> enc = encode_segments([Segment("hello"), Segment(" world</s>", train=True)], tok, None)
        >>> enc["labels"][0], enc["labels"][-1] == tok.eos_token_id
        (-100, True)
    """
    input_ids: list[int] = []
    labels: list[int] = []
    for train, run in _runs(segments):
        ids = encode_run(run, tokenizer)
        input_ids += ids
        labels += ids if train else [IGNORE_INDEX] * len(ids)
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def encode_run(segments: Sequence[Segment], tokenizer: Any) -> list[int]:
    """Token ids of segments joined: template markers become their special id, every other character (template
    text and literal content alike) is tokenized with special-token parsing off."""
    special = special_token_ids(tokenizer)
    marker = _marker_pattern(tuple(special))
    strips = _strips(tokenizer)
    ids: list[int] = []
    text = ""
    strip_next = False  # the previous marker eats the whitespace after it (AddedToken rstrip), as HF does
    for segment in segments:
        if segment.literal or marker is None:
            text += segment.text
            continue
        pos = 0
        for match in marker.finditer(segment.text):
            text += segment.text[pos:match.start()]
            lstrip, rstrip = strips.get(match.group(), (False, False))
            ids += _plain(_strip(text, strip_next, lstrip), tokenizer)
            ids.append(special[match.group()])
            text, pos, strip_next = "", match.end(), rstrip
        text += segment.text[pos:]
    return ids + _plain(_strip(text, strip_next, False), tokenizer)


def _strip(text: str, left: bool, right: bool) -> str:
    text = text.lstrip() if left else text
    return text.rstrip() if right else text


def _strips(tokenizer: Any) -> dict[str, tuple[bool, bool]]:
    """Special tokens declared to eat the whitespace before (``lstrip``) or after (``rstrip``) them."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return {str(t): (bool(getattr(t, "lstrip", False)), bool(getattr(t, "rstrip", False))) for t in added.values()
            if getattr(t, "lstrip", False) or getattr(t, "rstrip", False)}


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    """The tokenizer's special-token strings and their ids (BOS, EOS, PAD, UNK and the additional ones)."""
    tokens = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
    ids = tokenizer.convert_tokens_to_ids(tokens) if tokens else []
    return {token: int(i) for token, i in zip(tokens, ids) if i is not None}


def encode_plain(text: str, tokenizer: Any, **kwargs: Any) -> Any:
    """``tokenizer(text, ...)`` with special-token strings in ``text`` kept as plain text (user content)."""
    return tokenizer(text, split_special_tokens=True, **kwargs)


def _plain(text: str, tokenizer: Any) -> list[int]:
    return list(encode_plain(text, tokenizer, add_special_tokens=False)["input_ids"]) if text else []


@functools.lru_cache(maxsize=32)
def _marker_pattern(tokens: tuple[str, ...]) -> re.Pattern[str] | None:
    if not tokens:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


def _runs(segments: Sequence[Segment]) -> list[tuple[bool, list[Segment]]]:
    runs: list[tuple[bool, list[Segment]]] = []
    for segment in segments:
        if not segment.text:
            continue
        if runs and runs[-1][0] == segment.train:
            runs[-1][1].append(segment)
        else:
            runs.append((segment.train, [segment]))
    return runs


def encode_causal(rows: Rows, formatter: Formatter, tokenizer: Any, options: Mapping[str, Any],
                  *, strict: bool = True) -> Encoded:
    """Encode rows for causal-LM training; count (and refuse when most are) examples with nothing to learn.

    A formatter with ``concatenates = True`` (``text``) has its documents joined and cut into blocks of
    ``max_length`` tokens instead, as in continued pretraining.
    """
    if getattr(formatter, "concatenates", False):
        return encode_blocks(rows, formatter, tokenizer, options)
    out = Encoded()
    for row, where in zip(rows.rows, rows.where):
        formatter.validate(row, where)
        example = encode_segments(formatter.segments(row, tokenizer, options), tokenizer, options["max_length"])
        if all(label == IGNORE_INDEX for label in example["labels"]):
            out.dropped += 1
            continue
        out.tokens += len(example["input_ids"])
        out.examples.append(example)
    _check_dropped(out, len(rows), rows.source, options["max_length"], strict)
    return out


def encode_blocks(rows: Rows, formatter: Formatter, tokenizer: Any, options: Mapping[str, Any]) -> Encoded:
    """Concatenate every document (each ending with EOS) and cut the stream into ``max_length`` blocks; the last,
    shorter block is kept."""
    ids: list[int] = []
    labels: list[int] = []
    for row, where in zip(rows.rows, rows.where):
        formatter.validate(row, where)
        example = encode_segments(formatter.segments(row, tokenizer, options), tokenizer, None)
        ids += example["input_ids"]
        labels += example["labels"]
    size = options["max_length"]
    out = Encoded(tokens=len(ids))
    for start in range(0, len(ids), size):
        block_labels = labels[start:start + size]
        if len(block_labels) > 1 and any(label != IGNORE_INDEX for label in block_labels):
            out.examples.append({"input_ids": ids[start:start + size], "labels": block_labels})
    return out


def encode_classification(rows: Rows, formatter: Formatter, tokenizer: Any, options: Mapping[str, Any],
                          label_ids: Mapping[str, int]) -> Encoded:
    """Encode (text, label) rows; a label outside ``label_ids`` is an error naming the row. A row whose text
    encodes to no tokens at all is skipped (counted in ``dropped``)."""
    out = Encoded()
    known = ", ".join(label_ids)
    for row, where in zip(rows.rows, rows.where):
        formatter.validate(row, where)
        text, label = formatter.text_and_label(row)
        key = label_key(label)
        if key not in label_ids:
            raise DataError(f"{where}: label {label!r} is not one of the classifier's labels ({known})")
        ids = encode_plain(text, tokenizer, truncation=True, max_length=options["max_length"])["input_ids"]
        if not ids:  # an empty text: nothing to classify
            out.dropped += 1
            continue
        out.tokens += len(ids)
        out.examples.append({"input_ids": ids, "labels": label_ids[key]})
    return out


def _check_dropped(out: Encoded, total: int, source: str, max_length: int, strict: bool) -> None:
    if not out.dropped:
        return
    message = (f"{source}: {out.dropped} of {total} examples have no answer tokens left after truncation to "
               f"max_length={max_length}")
    if strict and out.dropped * 2 > total:
        raise DataError(message + "; raise max_length or shorten the prompts")
    logger.warning("%s; they are skipped", message)


class Collator:
    """Right-pads a batch: ``input_ids`` with the pad id, ``labels`` with -100, and builds the attention mask.

    Padding is decided by length, never by token id, so an EOS equal to the pad token stays in the loss.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, batch: list[Mapping[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(ex["input_ids"]) for ex in batch)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        sequence_labels = not isinstance(batch[0]["labels"], int)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long) if sequence_labels else \
            torch.tensor([ex["labels"] for ex in batch], dtype=torch.long)
        for i, ex in enumerate(batch):
            n = len(ex["input_ids"])
            input_ids[i, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
            attention[i, :n] = 1
            if sequence_labels:
                labels[i, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}

"""Sequence packing: a batch's examples in one row, positions restarting per example, attention kept inside each.

transformers builds a block-diagonal causal mask when it gets ``position_ids`` that restart, no attention mask and
no cache (``masking_utils.find_packed_sequence_indices``), so a packed batch computes the same per-token loss as
the same examples padded, without computing on padding.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from finetune_sdk.data.encoding import IGNORE_INDEX

#: Model types whose attention honours restarting position_ids (block-diagonal masks); checked in tests.
PACKABLE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2", "gemma", "gemma2", "gemma3_text",
                                  "phi3", "olmo", "olmo2", "granite", "smollm3"})


def packing_supported(model: Any) -> bool:
    """True when ``model`` (possibly PEFT-wrapped) is of a type known to build block-diagonal masks."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(getattr(base, "config", None), "model_type", None) in PACKABLE_MODEL_TYPES


class PackingCollator:
    """Packs a batch's examples into as few rows of at most ``row_length`` tokens as fit (first-fit decreasing),
    with ``position_ids`` restarting per example and no attention mask.

    Rows are padded only at their ends (to the longest row), and the padding forms a segment of its own, so it is
    never attended to by real tokens. The first token of every example gets label -100: unpacked, nothing precedes
    it, so it is never predicted. The batch's examples and per-token losses are those of the padded batch.

    Example:
        >>> batch = PackingCollator(row_length=8, pad_token_id=0)([
        ...     {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}])
        >>> batch["position_ids"].tolist(), batch["labels"].tolist()
        ([[0, 1, 2, 0, 1]], [[-100, 6, 7, -100, 9]])
    """

    def __init__(self, row_length: int | None = None, pad_token_id: int = 0, varlen_kwargs: bool = False) -> None:
        self.row_length = row_length
        self.pad_token_id = pad_token_id
        #: Also return flash-attention's varlen arguments (``cu_seq_lens_q``...): the spans of the examples and of
        #: each row's padding over the flattened batch, for :mod:`finetune_sdk.speed.varlen_attention`.
        self.varlen_kwargs = varlen_kwargs

    def rows(self, batch: list[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
        """First-fit decreasing: the longest examples first, each into the first row with room."""
        capacity = self.row_length or sum(len(ex["input_ids"]) for ex in batch)
        rows: list[list[Mapping[str, Any]]] = []
        room: list[int] = []
        for example in sorted(batch, key=lambda ex: -len(ex["input_ids"])):
            n = len(example["input_ids"])
            for i, free in enumerate(room):
                if n <= free:
                    rows[i].append(example)
                    room[i] -= n
                    break
            else:
                rows.append([example])
                room.append(capacity - n)
        return rows

    def __call__(self, batch: list[Mapping[str, Any]]) -> dict[str, Any]:
        import torch

        rows = self.rows(batch)
        width = max(sum(len(ex["input_ids"]) for ex in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        spans: list[int] = []  # lengths of the examples and of each row's padding, in order
        for r, row in enumerate(rows):
            at = 0
            for example in row:
                n = len(example["input_ids"])
                input_ids[r, at:at + n] = torch.tensor(list(example["input_ids"]))
                labels[r, at + 1:at + n] = torch.tensor(list(example["labels"][1:]), dtype=torch.long)
                positions[r, at:at + n] = torch.arange(n)
                spans.append(n)
                at += n
            if at < width:
                positions[r, at:] = torch.arange(width - at)  # the padding is a segment of its own
                spans.append(width - at)
        packed = {"input_ids": input_ids, "labels": labels, "position_ids": positions, "use_cache": False}
        if self.varlen_kwargs:
            cumulative = torch.tensor([0] + spans).cumsum(0).to(torch.int32)
            packed.update(cu_seq_lens_q=cumulative, cu_seq_lens_k=cumulative, max_length_q=max(spans),
                          max_length_k=max(spans))
        return packed

"""Sequence packing: a batch's examples in one row, positions restarting per example, attention kept inside each.

transformers builds a block-diagonal causal mask when it gets ``position_ids`` that restart, no attention mask and
no cache (``masking_utils.find_packed_sequence_indices``), so a packed batch computes the same per-token loss as
the same examples padded, without computing on padding.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from finetune_sdk.encoding import IGNORE_INDEX

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

    def __init__(self, row_length: int | None = None, pad_token_id: int = 0) -> None:
        self.row_length = row_length
        self.pad_token_id = pad_token_id

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

        packed = []
        for row in self.rows(batch):
            input_ids: list[int] = []
            labels: list[int] = []
            positions: list[int] = []
            for example in row:
                ids = list(example["input_ids"])
                input_ids += ids
                labels += [IGNORE_INDEX] + list(example["labels"][1:])
                positions += list(range(len(ids)))
            packed.append((input_ids, labels, positions))
        width = max(len(ids) for ids, _, _ in packed)
        out_ids = torch.full((len(packed), width), self.pad_token_id, dtype=torch.long)
        out_labels = torch.full((len(packed), width), IGNORE_INDEX, dtype=torch.long)
        out_positions = torch.zeros((len(packed), width), dtype=torch.long)
        for r, (ids, labels, positions) in enumerate(packed):
            n = len(ids)
            out_ids[r, :n] = torch.tensor(ids)
            out_labels[r, :n] = torch.tensor(labels)
            out_positions[r, :n] = torch.tensor(positions)
            out_positions[r, n:] = torch.arange(width - n)  # the padding is a segment of its own
        return {"input_ids": out_ids, "labels": out_labels, "position_ids": out_positions, "use_cache": False}

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
    """Concatenates a batch into one row with restarting ``position_ids`` and no padding.

    The first token of every example gets label -100: unpacked, nothing precedes it, so it is never predicted.

    Example:
        >>> batch = PackingCollator()([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        ...                            {"input_ids": [8, 9], "labels": [8, 9]}])
        >>> batch["position_ids"].tolist(), batch["labels"].tolist()
        ([[0, 1, 2, 0, 1]], [[-100, 6, 7, -100, 9]])
    """

    def __call__(self, batch: list[Mapping[str, Any]]) -> dict[str, Any]:
        import torch

        input_ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for example in batch:
            ids = list(example["input_ids"])
            input_ids += ids
            labels += [IGNORE_INDEX] + list(example["labels"][1:])
            positions += list(range(len(ids)))
        return {"input_ids": torch.tensor([input_ids]), "labels": torch.tensor([labels]),
                "position_ids": torch.tensor([positions]), "use_cache": False}

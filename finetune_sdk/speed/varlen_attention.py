"""Variable-length attention for packed rows on models that use PyTorch's SDPA.

transformers keeps attention inside the examples of a packed row by building a dense block-diagonal mask, and SDPA
then computes every query against every key of the row: for a 1,024-token row of eight examples that is about eight
times the work of attending within each example, and the causal shortcut is lost too. On the CPU this attention
function runs SDPA on each example's span with ``is_causal=True`` instead, reading the spans from the
flash-attention varlen arguments (``cu_seq_lens_q``...) that :class:`finetune_sdk.data.packing.PackingCollator` adds
when asked. Batches without those arguments (padded evaluation batches, generation) go through transformers' own
SDPA path unchanged.

Example:
    >>> import torch
    >>> from finetune_sdk.speed.varlen_attention import row_spans
    >>> row_spans(torch.tensor([0, 3, 4, 5, 8]), row_length=4)
    [[3, 1], [1, 3]]
"""

from __future__ import annotations

from typing import Any

#: The name the attention function is registered under in transformers' attention and mask interfaces.
ATTENTION_NAME = "finetune_sdk_varlen_sdpa"


def row_spans(cu_seq_lens: Any, row_length: int) -> list[list[int]]:
    """The span lengths of each row, from cumulative lengths over the flattened ``[rows, row_length]`` batch (a span
    never crosses a row)."""
    bounds = [int(x) for x in cu_seq_lens.tolist()]
    rows: list[list[int]] = [[] for _ in range(bounds[-1] // row_length)]
    for start, end in zip(bounds, bounds[1:]):
        if end > start:
            rows[start // row_length].append(end - start)
    return rows


def varlen_sdpa_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                          dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers attention function: causal SDPA within each span when ``cu_seq_lens_q`` is given, else SDPA."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_seq_lens = kwargs.pop("cu_seq_lens_q", None)
    for name in ("cu_seq_lens_k", "max_length_q", "max_length_k"):
        kwargs.pop(name, None)
    if cu_seq_lens is None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    rows = []
    # unbind and split are views whose backward concatenates: no full-size zero gradients per span
    for spans, q, k, v in zip(row_spans(cu_seq_lens, query.shape[2]), query.unbind(0), key.unbind(0),
                              value.unbind(0)):
        parts = [sdpa_attention_forward(module, qs[None], ks[None], vs[None], None, dropout=dropout,
                                        scaling=scaling, is_causal=True, **kwargs)[0]
                 for qs, ks, vs in zip(q.split(spans, dim=1), k.split(spans, dim=1), v.split(spans, dim=1))]
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows, dim=0), None


def register() -> None:
    """Make :data:`ATTENTION_NAME` a valid ``attn_implementation`` (masks are built as for SDPA)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, varlen_sdpa_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def applicable(model: Any, row_length: int | None, device_type: str | None = None) -> bool:
    """True when ``model`` (possibly PEFT-wrapped) trains on the CPU and attends with SDPA, causally, without logit
    soft-capping and without a sliding window shorter than ``row_length``: then attending within each span computes
    exactly what the block-diagonal mask does, for less.

    ``device_type`` is where training runs: by default ``"cuda"`` when a GPU is visible (transformers' Trainer
    moves the model there), else the device of the model's weights. On GPUs the per-span loop costs more in kernel
    launches than the attention it saves (on an H100, SmolLM2-135M trained at half the speed of the masked rows),
    so packed rows keep transformers' block-diagonal masks there.
    """
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if device_type is None:
        parameter = next(base.parameters(), None)
        device_type = "cuda" if torch.cuda.is_available() else parameter.device.type if parameter is not None \
            else "cpu"
    if device_type != "cpu":
        return False
    config = getattr(base, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", ATTENTION_NAME):
        return False
    if getattr(config, "attn_logit_softcapping", None) or getattr(config, "layer_types", None) and any(
            kind != "full_attention" for kind in config.layer_types):
        return False
    window = getattr(config, "sliding_window", None)
    windowed = window and getattr(config, "use_sliding_window", True)
    return not (windowed and (row_length is None or window < row_length))


def use(model: Any, attn_implementation: str) -> str:
    """Switch ``model``'s attention implementation; returns the previous one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    previous = base.config._attn_implementation
    if attn_implementation == ATTENTION_NAME:
        register()
    base.set_attn_implementation(attn_implementation)
    return previous

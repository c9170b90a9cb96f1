"""LoRA-aware aggregation: what averaging the factors does to the update, and FFA-LoRA, which makes it exact.

A LoRA layer's update is ``delta_W = s * B @ A`` (``B``: ``out x r``, ``A``: ``r x in``, ``s = lora_alpha / r``).
FedAvg averages ``A`` and ``B`` separately, so the global update is ``s * mean(B) @ mean(A)``, not the clients'
average update ``s * mean(B @ A)``: the cross terms make it wrong by an amount that grows with how far the clients
moved apart (:func:`aggregation_error` measures it every round).

``aggregation="ffa"`` is FFA-LoRA (Sun et al., 2024, "Improving LoRA in Privacy-preserving Federated Learning"):
every ``A`` is initialised from one shared seed (the server's and every client's the same, :func:`freeze_lora_a`)
and frozen; only ``B`` trains and travels. Then ``mean(B) @ A = mean(B @ A)``: the average of the factors is the
average of the updates, exactly, and each message carries ``B`` alone (half a square layer's adapter).
"""

from __future__ import annotations

import math
from typing import Any

from finetune_sdk.errors import ConfigError

#: ``aggregation=`` values: how the clients' LoRA factors become the global adapter.
AGGREGATIONS = ("fedavg", "ffa", "fedex")
LORA_A, LORA_B = ".lora_A.", ".lora_B."


def freeze_lora_a(model: Any, seed: int) -> int:
    """Initialise every ``lora_A`` weight from ``seed`` (PEFT's Kaiming-uniform init, ``a = sqrt(5)``, drawn in
    parameter order from one ``torch.Generator``) and freeze it; returns how many matrices were frozen.

    Server and clients call it on the same prepared model with the same seed, so all hold the same ``A`` without
    sending it (FFA-LoRA, Sun et al., 2024).

    Raises:
        ConfigError: the model has no LoRA ``A`` matrices (the technique isn't LoRA-like).

    Example:
        >>> import torch
        >>> class Layer(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(4, 2, bias=False)})
        >>> first, second = Layer(), Layer()
        >>> freeze_lora_a(first, 3), freeze_lora_a(second, 3)
        (1, 1)
        >>> torch.equal(first.lora_A["default"].weight, second.lora_A["default"].weight)
        True
        >>> first.lora_A["default"].weight.requires_grad
        False
    """
    import torch

    generator = torch.Generator().manual_seed(int(seed))
    frozen = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if LORA_A in f".{name}":
                values = torch.empty(param.shape, dtype=torch.float32)
                torch.nn.init.kaiming_uniform_(values, a=math.sqrt(5), generator=generator)
                param.copy_(values.to(param.device, param.dtype))
                param.requires_grad_(False)
                frozen += 1
    if not frozen:
        raise ConfigError("aggregation='ffa' needs a LoRA technique (lora, qlora): this model has no lora_A "
                          "matrices to freeze; use aggregation='fedavg'")
    return frozen


def shared_seed(settings: Any, options: dict[str, Any]) -> int:
    """The seed of FFA-LoRA's frozen ``A``: ``settings.seed`` (the server's initial adapter), else the job's."""
    return int(settings.seed if settings.seed is not None else options.get("seed", 42))


def lora_pairs(names: list[str]) -> list[tuple[str, str]]:
    """``(A name, B name)`` of every LoRA layer among parameter ``names``."""
    return [(name.replace(LORA_B, LORA_A), name) for name in names if LORA_B in f".{name}"]


def aggregation_error(old: Any, new: Any, clients: list[Any], weights: list[float],
                      frozen: dict[str, Any] | None = None, residual: dict[str, Any] | None = None) -> float | None:
    """Relative distance of the global LoRA update to the clients' weighted average update.

    ``|| sum_l (dW_global_l - sum_i w_i dW_i_l) ||_F / || sum_i w_i dW_i ||_F`` over all LoRA layers ``l``, with
    ``dW = B @ A - B_old @ A_old`` (the scaling ``s`` cancels), ``w_i`` the normalised weights the strategy used.
    0 for an exact aggregation; FedAvg of the factors is not. ``old``/``new``/``clients`` map names to arrays
    (Flower ``ArrayRecord`` or dicts of numpy arrays); ``frozen`` gives the ``A`` matrices that don't travel
    (FFA-LoRA); ``residual`` maps ``B`` names to the part of the global update folded into the base weight
    (FedEx-LoRA, without the scaling), added to ``dW_global``. ``None`` when there is no LoRA layer or no update.

    Example:
        >>> import numpy as np
        >>> a0, b0 = np.ones((1, 2)), np.zeros((2, 1))
        >>> old = {"x.lora_A.w": a0, "x.lora_B.w": b0}
        >>> one = {"x.lora_A.w": a0 * 2, "x.lora_B.w": b0 + 1}
        >>> two = {"x.lora_A.w": a0 * 0, "x.lora_B.w": b0 + 3}
        >>> avg = {k: (one[k] + two[k]) / 2 for k in old}  # FedAvg of the factors: mean(B) @ mean(A) = 2, not 1
        >>> round(aggregation_error(old, avg, [one, two], [0.5, 0.5]), 4)
        1.0
    """
    import numpy as np

    def array(record: Any, name: str) -> Any:
        if name in record.keys():
            value = record[name]
            return np.asarray(value.numpy() if hasattr(value, "numpy") else value, dtype=np.float64)
        return np.asarray(frozen[name], dtype=np.float64) if frozen and name in frozen else None

    total = sum(weights) or 1.0
    diff_sq = target_sq = 0.0
    for a_name, b_name in lora_pairs(list(old.keys())):
        a_old, b_old = array(old, a_name), array(old, b_name)
        if a_old is None:
            continue
        before = b_old @ a_old
        target = sum((w / total) * (array(c, b_name) @ array(c, a_name) - before) for c, w in zip(clients, weights))
        actual = array(new, b_name) @ array(new, a_name) - before
        if residual and b_name in residual:
            actual = actual + np.asarray(residual[b_name], dtype=np.float64)
        diff_sq += float(np.sum((actual - target) ** 2))
        target_sq += float(np.sum(target ** 2))
    return math.sqrt(diff_sq / target_sq) if target_sq > 0 else None

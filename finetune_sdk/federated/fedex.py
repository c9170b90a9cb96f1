"""FedEx-LoRA: exact aggregation of LoRA updates with the residual folded into the frozen base weight.

Singhal et al., 2024, "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning of Foundation Models".
The strategy averages ``A`` and ``B`` as FedAvg does (the adapter keeps its rank and PEFT format); the server then
computes, for every LoRA layer ``l``, the residual that averaging the factors leaves out::

    R_l = s_l * (sum_i w_i B_i A_i - mean(B) mean(A))          (dense, out x in, float32)

and adds it to an accumulated dense delta ``D_l`` of the layer's frozen base weight. The global model is
``W_l + D_l + s_l * mean(B) mean(A)``, which equals the clients' weighted average model exactly (up to float32
rounding): :func:`~finetune_sdk.federated.lora_aggregation.aggregation_error` counts the residual in.

Traffic: clients keep no state between rounds (Flower starts a ClientApp per message), so every message from the
server carries the whole accumulated ``D`` (one dense float32 matrix per adapted layer, ``out * in * 4`` bytes,
metered in ``bytes_received``) beside the adapter; replies are the adapter as with FedAvg. The result folder holds
the adapter as usual plus ``base_delta.safetensors`` (``D`` keyed by the base model's weight names, e.g.
``model.layers.0.self_attn.q_proj.weight``), named in the manifest's ``base_delta``; ``finetune_sdk.load`` (and so
``merge`` and ``export``) adds it to the base weights before the adapter loads. A plain PEFT loader that ignores
it gets the averaged factors alone (FedAvg's model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune_sdk.errors import ConfigError

#: The message record carrying the accumulated base delta, and the result folder's file holding it.
RESIDUAL_KEY = "fedex-base-delta"
BASE_DELTA_FILE = "base_delta.safetensors"


def lora_layers(model: Any) -> dict[str, tuple[str, Any, float]]:
    """``{lora_B parameter name: (base weight name, LoRA module, scaling)}`` of every LoRA layer of a PEFT model.

    The base weight name is the plain model's (``model.layers.0.mlp.up_proj.weight``), what ``load`` sees before
    the adapter is attached.

    Raises:
        ConfigError: no LoRA layer, a DoRA layer (its magnitude renormalises ``W + BA``, so a base delta isn't
            additive) or a base weight that isn't float32 (bfloat16 or 4-bit can't hold the residual exactly:
            measured, a bfloat16 base put the loaded model 0.08% off the clients' average instead of 3e-8).
    """
    import torch

    layers: dict[str, tuple[str, Any, float]] = {}
    for name, module in model.named_modules():
        lora_b = getattr(module, "lora_B", None)
        if not isinstance(lora_b, torch.nn.ModuleDict) or not hasattr(module, "get_base_layer"):
            continue
        for adapter in lora_b.keys():
            if getattr(module, "use_dora", {}).get(adapter):
                raise ConfigError("aggregation='fedex' can't be used with DoRA (use_dora): DoRA renormalises the "
                                  "base weight plus the update; use aggregation='fedavg' or 'ffa'")
            weight = module.get_base_layer().weight
            if weight.dtype != torch.float32:
                raise ConfigError(f"aggregation='fedex' folds a dense residual into the frozen base weight, which "
                                  f"must be float32 to hold it exactly (this base is {weight.dtype}; a bfloat16 "
                                  "weight keeps 8 bits, a 4-bit one less): pass dtype='float32' with technique "
                                  "'lora', or use aggregation='ffa'")
            base_name = name.removeprefix("base_model.model.") + ".weight"
            layers[f"{name}.lora_B.{adapter}.weight"] = (base_name, module, float(module.scaling[adapter]))
    if not layers:
        raise ConfigError("aggregation='fedex' needs a LoRA technique (lora): this model has no LoRA layers; use "
                          "aggregation='fedavg'")
    return layers


def residual(new: Any, clients: list[Any], weights: list[float]) -> dict[str, Any]:
    """``{lora_B name: sum_i w_i B_i A_i - B_new A_new}`` (float64, ``out x in``, without the scaling ``s``).

    ``new`` is the strategy's aggregate, ``clients`` the replies (name -> array maps), ``weights`` the strategy's
    weights (normalised here).

    Example:
        >>> import numpy as np
        >>> one = {"x.lora_A.w": np.ones((1, 2)), "x.lora_B.w": np.ones((2, 1))}
        >>> two = {"x.lora_A.w": np.zeros((1, 2)), "x.lora_B.w": 3 * np.ones((2, 1))}
        >>> mean = {k: (one[k] + two[k]) / 2 for k in one}  # mean(B) mean(A) = 1, mean(B A) = 0.5
        >>> residual(mean, [one, two], [1, 1])["x.lora_B.w"].tolist()
        [[-0.5, -0.5], [-0.5, -0.5]]
    """
    import numpy as np

    from finetune_sdk.federated.lora_aggregation import lora_pairs

    def array(record: Any, name: str) -> Any:
        value = record[name]
        return np.asarray(value.numpy() if hasattr(value, "numpy") else value, dtype=np.float64)

    total = sum(weights) or 1.0
    out = {}
    for a_name, b_name in lora_pairs(list(new.keys())):
        average = sum((w / total) * (array(c, b_name) @ array(c, a_name)) for c, w in zip(clients, weights))
        out[b_name] = average - array(new, b_name) @ array(new, a_name)
    return out


def accumulate(base_delta: dict[str, Any], layers: dict[str, tuple[str, Any, float]],
               round_residual: dict[str, Any]) -> dict[str, Any]:
    """``base_delta`` plus ``s * residual`` per layer (float32 arrays keyed by base weight name); returns the
    residual as applied (float32, without ``s``) for :func:`aggregation_error`."""
    import numpy as np

    applied = {}
    for b_name, values in round_residual.items():
        base_name, _, scaling = layers[b_name]
        delta = (scaling * values).astype(np.float32)
        base_delta[base_name] = base_delta[base_name] + delta if base_name in base_delta else delta
        applied[b_name] = delta.astype(np.float64) / scaling
    return applied


def fold_into_peft(model: Any, base_delta: Any) -> None:
    """Add ``base_delta`` (an ``ArrayRecord`` or dict of arrays keyed by base weight name) to the frozen base
    weights of a PEFT model's LoRA layers (a client's model before it trains or evaluates)."""
    by_base = {base_name: module for base_name, module, _ in lora_layers(model).values()}
    _add(base_delta, lambda name: by_base[name].get_base_layer().weight if name in by_base else None, model)


def fold_into_base(model: Any, path: Path) -> None:
    """Add a result folder's ``base_delta.safetensors`` to a plain (not yet adapted) model's weights.

    Raises:
        FinetuneError: a weight named in the file isn't in the model (another base model was given).
    """
    from safetensors.numpy import load_file

    params = dict(model.named_parameters())
    _add(load_file(str(path)), params.get, model)


def _add(delta: Any, weight_of: Any, model: Any) -> None:
    import torch

    from finetune_sdk.errors import FinetuneError

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embedding = base.get_input_embeddings().weight if hasattr(base, "get_input_embeddings") else None
    with torch.no_grad():
        for name in delta.keys():
            weight = weight_of(name)
            if weight is None:
                raise FinetuneError(f"the FedEx-LoRA base delta names {name!r}, which this model doesn't have: "
                                    "load the result with the base model it was trained on")
            if weight is embedding:
                raise ConfigError(f"{name} is tied to the input embedding: FedEx-LoRA can't fold a residual into "
                                  "one side of a tied matrix; leave lm_head out of target_modules")
            values = delta[name]
            values = values.numpy() if hasattr(values, "numpy") else values
            weight.add_(torch.from_numpy(values).to(weight.device, weight.dtype).reshape(weight.shape))


def as_record(base_delta: dict[str, Any]) -> Any:
    """The accumulated delta as the ``ArrayRecord`` every message of the next round carries."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({name: Array(values) for name, values in base_delta.items()})

"""Clients of different LoRA ranks (HetLoRA-style, Cho et al., 2024, "Heterogeneous LoRA for Federated
Fine-tuning of On-Device Foundation Models").

The global adapter has the Trainer's rank ``R``; a client given a smaller rank ``r`` (``clients={"phone": {"train":
..., "r": 4}}``, or ``finetune federated client --lora-r 4``) receives the global adapter *truncated* to its rank
(the first ``r`` rows of every ``A``, the first ``r`` columns of every ``B``), trains it with
``lora_alpha * r / R`` (``* sqrt(r / R)`` with rsLoRA) so that its scaling ``s`` equals the global one, and sends
back rank-``r`` matrices (``r / R`` of the upload; the server's message is the full adapter). The server pads each reply back to rank ``R`` with the global values in the rows the client doesn't hold (its update
there is zero: HetLoRA's zero-padding applied to the update) before its strategy aggregates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from finetune_sdk.errors import ConfigError
from finetune_sdk.federated.lora_aggregation import LORA_A, LORA_B


def check_rank(client: str, rank: Any, global_rank: int) -> int:
    """``rank`` as an int in ``[1, global_rank]``, else a one-line :class:`ConfigError` naming the client."""
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= global_rank:
        raise ConfigError(f"client {client!r}: r must be an integer from 1 to the global rank {global_rank} "
                          f"(the Trainer's r), got {rank!r}")
    return rank


def client_lora_options(options: Mapping[str, Any], rank: int) -> dict[str, Any]:
    """``r`` and ``lora_alpha`` for a client of ``rank`` whose scaling equals the global adapter's.

    >>> client_lora_options({"r": 8, "lora_alpha": 16, "use_rslora": False}, 4)
    {'r': 4, 'lora_alpha': 8.0}
    """
    ratio = rank / int(options["r"])
    alpha = float(options["lora_alpha"]) * (math.sqrt(ratio) if options.get("use_rslora") else ratio)
    return {"r": rank, "lora_alpha": alpha}


def truncate(record: Any, rank: int) -> Any:
    """The ``ArrayRecord`` with every LoRA ``A`` cut to its first ``rank`` rows and ``B`` to its first columns."""
    from flwr.app import Array, ArrayRecord

    out = {}
    for name, array in record.items():
        values = array.numpy()
        if LORA_A in f".{name}":
            values = values[:rank]
        elif LORA_B in f".{name}":
            values = values[:, :rank]
        out[name] = Array(values.copy())
    return ArrayRecord(out)


def pad(record: Any, global_record: Any) -> Any:
    """A client's lower-rank reply padded to the global rank with ``global_record``'s values (a zero update there);
    a reply of the global shapes is returned as it is."""
    from flwr.app import Array, ArrayRecord

    if all(record[name].shape == global_record[name].shape for name in record.keys() if name in global_record):
        return record
    out = {}
    for name, array in record.items():
        values, full = array.numpy(), global_record[name].numpy().copy()
        if LORA_A in f".{name}":
            full[:values.shape[0]] = values
        elif LORA_B in f".{name}":
            full[:, :values.shape[1]] = values
        else:
            full = values
        out[name] = Array(full)
    return ArrayRecord(out)

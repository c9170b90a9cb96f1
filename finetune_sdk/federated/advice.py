"""Why, and at what cost, the advisor recommends federated fine-tuning (``finetune advise --private-data``)."""

from __future__ import annotations

from typing import Any

from finetune_sdk.advice.machine import format_bytes


def federated_reasons(owners: int, est: Any, shape: Any) -> list[str]:
    """The reasons behind a federated recommendation for data split among ``owners`` who can't share it.

    >>> from types import SimpleNamespace
    >>> reasons = federated_reasons(3, SimpleNamespace(technique="qlora", adapter=40 * 2**20), None)
    >>> reasons[0][:60]
    "the data can't leave its 3 owners: federated fine-tuning tra"
    """
    trained = getattr(est, "adapter", 0) if est.technique != "full" else getattr(est, "trainable_parameters", 0) * 4
    travelling = format_bytes(max(int(trained or 0), 1))  # float32 values, as they travel
    what = "the adapter" if est.technique in ("lora", "qlora") else "the trained weights"
    return [
        f"the data can't leave its {owners} owners: federated fine-tuning trains where the data is - each owner "
        "runs `finetune federated client` on its own rows, and a server (`finetune federated server`, on Flower) "
        f"averages the updates (FedAvg); only {what} travel, never rows or tokens",
        f"{est.technique} keeps the traffic small: about {travelling} per owner per round each way instead of the "
        "whole model; every round is logged with the bytes each owner sent and received",
        "model updates can still leak training examples to the server or other owners: add differential privacy "
        "(--dp client/server with --noise-multiplier and --clipping-norm; epsilon is recorded in the manifest) at "
        "some cost in accuracy, or secure aggregation (--secure-aggregation: Flower's SecAgg+, the server sees "
        "only the sum of the updates) at some cost in traffic",
        "costs: several rounds of local training and traffic, and owners with very different data (non-IID) "
        "converge slower than pooled data would - FedProx (--strategy fedprox --proximal-mu 0.01) keeps local "
        "models close to the global one; if the data could be pooled legally, centralised training is simpler "
        "and better",
    ]

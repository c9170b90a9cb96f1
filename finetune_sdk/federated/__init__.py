"""Federated fine-tuning on Flower: each client trains on its own data, only trainable parameters travel.

``Trainer(...).fit_federated(clients={...})`` runs a federation on this machine (a Flower SuperLink and one
SuperNode per client, as local processes on loopback); ``finetune federated server`` / ``client`` run the same
Flower apps with each client on its own machine. See docs/federated.md.

Flower (``flwr``) is an optional dependency: ``pip install finetune-sdk[federated]``.
"""

from __future__ import annotations

from finetune_sdk.federated.settings import FederatedSettings, require_flower
from finetune_sdk.federated.strategy import FederatedStrategy

__all__ = ["FederatedSettings", "FederatedStrategy", "require_flower"]

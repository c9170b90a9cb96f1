"""The :class:`FederatedStrategy` plugin type: how the server samples clients and aggregates their updates.

A strategy plugin wraps a Flower strategy (``flwr.serverapp.strategy``); plugins register theirs with the
``register_federated_strategies`` hook, as techniques are registered with ``register_techniques``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from finetune_sdk.federated.settings import FederatedSettings


class FederatedStrategy:
    """Base class of federated strategies.

    Subclasses set ``name`` and ``description`` and implement :meth:`build`, which returns a Flower
    message-API strategy (``flwr.serverapp.strategy.Strategy``). The server drives it round by round
    (``configure_train`` / ``aggregate_train`` / ``configure_evaluate`` / ``aggregate_evaluate``); clients reply
    with one ``ArrayRecord`` (the trainable parameters) and one ``MetricRecord`` holding ``num-examples``. A
    ``"proximal-mu"`` entry in the train config (Flower's FedProx sends one) makes clients add the proximal term.

    Example (FedAvg with unweighted averaging):
        >>> from finetune_sdk.federated import FederatedStrategy
        >>> class FedAvgUnweighted(FederatedStrategy):
        ...     name = "fedavg-unweighted"
        ...     description = "FedAvg with every client weighted equally"
        ...     def build(self, settings):
        ...         from flwr.serverapp.strategy import FedAvg
        ...         return FedAvg(**self.sampling(settings), weighted_by_key="one")
        >>> FedAvgUnweighted().name
        'fedavg-unweighted'
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""

    def build(self, settings: FederatedSettings) -> Any:
        """Return the Flower strategy for ``settings`` (import ``flwr`` inside this method)."""
        raise NotImplementedError

    @staticmethod
    def sampling(settings: FederatedSettings) -> dict[str, Any]:
        """Flower's sampling arguments (``fraction_train``, ``min_train_nodes``...) from ``settings``."""
        min_fit = settings.min_fit_clients or 1
        return {
            "fraction_train": settings.fraction_fit,
            "fraction_evaluate": settings.fraction_evaluate,
            "min_train_nodes": min_fit,
            "min_evaluate_nodes": min_fit if settings.fraction_evaluate else 0,
            "min_available_nodes": min_fit,
        }

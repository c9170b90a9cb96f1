"""The builtin federated strategies: FedAvg and FedProx, Flower's implementations."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from finetune_sdk.federated.strategy import FederatedStrategy
from finetune_sdk.hookspecs import hookimpl

if TYPE_CHECKING:
    from finetune_sdk.federated.settings import FederatedSettings


class FedAvgStrategy(FederatedStrategy):
    """FedAvg (McMahan et al., 2017): the average of the clients' parameters weighted by their example counts."""

    name: ClassVar[str] = "fedavg"
    description: ClassVar[str] = "FedAvg: parameters averaged, weighted by each client's number of examples"

    def build(self, settings: FederatedSettings) -> Any:
        from flwr.serverapp.strategy import FedAvg

        return FedAvg(**self.sampling(settings))


class FedProxStrategy(FederatedStrategy):
    """FedProx (Li et al., 2020): FedAvg aggregation; each client adds ``mu/2 * ||w - w_global||^2`` to its loss,
    which keeps local models of clients with different data close to the global one."""

    name: ClassVar[str] = "fedprox"
    description: ClassVar[str] = "FedProx: FedAvg with a proximal term (proximal_mu) in each client's local loss"

    def build(self, settings: FederatedSettings) -> Any:
        from flwr.serverapp.strategy import FedProx

        return FedProx(**self.sampling(settings), proximal_mu=settings.proximal_mu)


@hookimpl
def register_federated_strategies(register: Callable[[type], None]) -> None:
    register(FedAvgStrategy)
    register(FedProxStrategy)

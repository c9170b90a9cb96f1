"""The builtin federated strategies, each Flower's implementation: FedAvg and FedProx; the server optimizers
FedAdam and FedYogi (Reddi et al., 2021, "Adaptive Federated Optimization"); the robust aggregators FedMedian
(Yin et al., 2018) and trimmed mean (``fedtrimmedavg``, same paper).

The server optimizers and robust aggregators take their hyper-parameters from ``strategy_options`` under Flower's
names (``eta``, ``eta_l``, ``beta_1``, ``beta_2``, ``tau``; ``beta`` for the trimmed mean); an unknown name is a
one-line :class:`~finetune_sdk.errors.ConfigError`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from finetune_sdk.errors import ConfigError
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


class _FlowerOptionsStrategy(FederatedStrategy):
    """A Flower strategy built with the sampling arguments plus ``settings.strategy_options`` (Flower's names)."""

    flower_class: ClassVar[str]
    options: ClassVar[tuple[str, ...]] = ()

    def build(self, settings: FederatedSettings) -> Any:
        import flwr.serverapp.strategy as flower

        unknown = sorted(set(settings.strategy_options) - set(self.options))
        if unknown:
            raise ConfigError(f"strategy {self.name!r} has no option {unknown[0]!r}; its options (Flower's "
                              f"{self.flower_class}): {', '.join(self.options) or 'none'}")
        return getattr(flower, self.flower_class)(**self.sampling(settings), **settings.strategy_options)


class FedAdamStrategy(_FlowerOptionsStrategy):
    """FedAdam (Reddi et al., 2021): the clients' average update is a pseudo-gradient for an Adam step on the
    server (Flower's ``FedAdam``: ``eta`` server learning rate, ``beta_1``, ``beta_2``, ``tau``)."""

    name: ClassVar[str] = "fedadam"
    description: ClassVar[str] = "FedAdam: server-side Adam on the clients' average update (Flower's FedAdam)"
    flower_class: ClassVar[str] = "FedAdam"
    options: ClassVar[tuple[str, ...]] = ("eta", "eta_l", "beta_1", "beta_2", "tau")


class FedYogiStrategy(_FlowerOptionsStrategy):
    """FedYogi (Reddi et al., 2021): FedAdam with Yogi's additive second-moment update (Flower's ``FedYogi``)."""

    name: ClassVar[str] = "fedyogi"
    description: ClassVar[str] = "FedYogi: server-side Yogi on the clients' average update (Flower's FedYogi)"
    flower_class: ClassVar[str] = "FedYogi"
    options: ClassVar[tuple[str, ...]] = ("eta", "eta_l", "beta_1", "beta_2", "tau")


class FedMedianStrategy(_FlowerOptionsStrategy):
    """FedMedian (Yin et al., 2018): the coordinate-wise median of the clients' parameters, robust to a minority
    of bad updates (Flower's ``FedMedian``; unweighted)."""

    name: ClassVar[str] = "fedmedian"
    description: ClassVar[str] = "FedMedian: coordinate-wise median of the clients' parameters (Flower's FedMedian)"
    flower_class: ClassVar[str] = "FedMedian"


class FedTrimmedAvgStrategy(_FlowerOptionsStrategy):
    """Trimmed mean (Yin et al., 2018): per coordinate, the mean after dropping the ``beta`` fraction of lowest
    and of highest values (Flower's ``FedTrimmedAvg``, ``beta`` 0.2 by default)."""

    name: ClassVar[str] = "fedtrimmedavg"
    description: ClassVar[str] = "trimmed mean: per coordinate, the beta-trimmed mean (Flower's FedTrimmedAvg)"
    flower_class: ClassVar[str] = "FedTrimmedAvg"
    options: ClassVar[tuple[str, ...]] = ("beta",)


@hookimpl
def register_federated_strategies(register: Callable[[type], None]) -> None:
    register(FedAvgStrategy)
    register(FedProxStrategy)
    for strategy in (FedAdamStrategy, FedYogiStrategy, FedMedianStrategy, FedTrimmedAvgStrategy):
        register(strategy)

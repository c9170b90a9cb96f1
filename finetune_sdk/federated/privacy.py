"""Differential privacy on client updates with Flower's fixed-clipping wrappers and RDP accountant.

``dp="server"``: the server clips each client's update (the change of the trainable parameters in a round) to
``clipping_norm`` in L2 and adds Gaussian noise of standard deviation ``noise_multiplier * clipping_norm /
sampled clients`` to the average (Flower's ``DifferentialPrivacyServerSideFixedClipping``; the server sees the
unclipped updates). ``dp="client"``: each client clips its own update before sending it and the server adds the
noise (``DifferentialPrivacyClientSideFixedClipping`` with ``fixedclipping_mod``). Both give client-level DP
(McMahan et al., 2018, "Learning Differentially Private Recurrent Language Models") of the released global
models; epsilon at ``target_delta`` comes from Flower's RDP accountant (dp-accounting), without amplification by
sampling, which requires every client to weigh the same in the average.
"""

from __future__ import annotations

import math
from typing import Any

from finetune_sdk.federated.settings import FederatedSettings

#: The metric every client reports as 1: the averaging weight when DP is on (equal client weights).
UNIT_WEIGHT = "unit-weight"


def wrap_with_dp(strategy: Any, settings: FederatedSettings, population: int,
                 accountant_state: dict[str, Any] | None = None) -> Any:
    """Wrap a Flower strategy in the DP wrapper ``settings.dp`` names; with noise, attach an RDP accountant."""
    from flwr.serverapp.strategy import (
        DifferentialPrivacyClientSideFixedClipping,
        DifferentialPrivacyServerSideFixedClipping,
    )

    if hasattr(strategy, "weighted_by_key"):
        strategy.weighted_by_key = UNIT_WEIGHT
    sampled = sampled_clients(settings, population)
    accountant = None
    if settings.noise_multiplier > 0:
        from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

        accountant = RdpAccountant(PrivacyConfig(
            target_delta=settings.target_delta, population_size=population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION))
        if accountant_state:
            accountant.load_state_dict(accountant_state)
    wrapper = DifferentialPrivacyServerSideFixedClipping if settings.dp == "server" \
        else DifferentialPrivacyClientSideFixedClipping
    return wrapper(strategy, noise_multiplier=settings.noise_multiplier, clipping_norm=settings.clipping_norm,
                   num_sampled_clients=sampled, accountant=accountant)


def sampled_clients(settings: FederatedSettings, population: int) -> int:
    """Clients Flower's FedAvg samples per round out of ``population`` connected ones."""
    return max(int(population * settings.fraction_fit), settings.min_fit_clients or 1)


def privacy_report(strategy: Any, settings: FederatedSettings) -> dict[str, Any] | None:
    """What the manifest records: mode, noise multiplier, clipping norm, and epsilon/delta when accounted."""
    record = settings.privacy()
    if record is None:
        return None
    spent = strategy.privacy_spent() if hasattr(strategy, "privacy_spent") else None
    record.update({"epsilon": None, "delta": settings.target_delta, "accountant": None, "releases": 0})
    if spent is not None:
        record.update({"epsilon": spent.epsilon if math.isfinite(spent.epsilon) else None, "delta": spent.delta,
                       "accountant": f"flower-{spent.accounting_method}", "releases": spent.num_releases})
    else:
        record["note"] = "no noise: clipping only, no differential-privacy guarantee (epsilon is infinite)"
    return record


def spent_so_far(strategy: Any, settings: FederatedSettings) -> dict[str, Any] | None:
    """The privacy budget spent by the global models released so far (a round's history entry records it after
    aggregation): ``{"epsilon", "delta", "releases"}`` from the same RDP accountant as :func:`privacy_report`
    (``epsilon`` ``None`` when infinite: clipping without noise); ``None`` when differential privacy is off.

    >>> spent_so_far(object(), FederatedSettings()) is None
    True
    """
    if settings.privacy() is None:
        return None
    spent = strategy.privacy_spent() if hasattr(strategy, "privacy_spent") else None
    if spent is None:
        return {"epsilon": None, "delta": settings.target_delta, "releases": 0}
    return {"epsilon": spent.epsilon if math.isfinite(spent.epsilon) else None, "delta": spent.delta,
            "releases": spent.num_releases}


def accountant_state(strategy: Any) -> dict[str, Any] | None:
    accountant = getattr(strategy, "accountant", None)
    return accountant.state_dict() if accountant is not None else None

"""A real federated run with differential privacy on, for the studio's rounds view: two owners, two rounds, one
local step each, in one process (:func:`finetune_sdk.testing.federated.run_in_process`); a few seconds on a CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: The DP settings of the run: client-side clipping, noise on, Flower's RDP accountant at this delta.
DP = {"dp": "client", "clipping_norm": 0.01, "noise_multiplier": 1.0, "target_delta": 1e-5}
ROUNDS = 2


def run_dp_federation(model: Path, out: Path, data: Path) -> dict[str, Any]:
    """Train ``model`` federated into ``out`` (a result folder with the manifest's round history); returns the
    final manifest."""
    from finetune_sdk.federated.job import FederatedJob
    from finetune_sdk.federated.settings import FederatedSettings
    from finetune_sdk.testing.federated import run_in_process
    from tests.federated_data import write_clients

    clients = {name: (spec["train"], spec["eval"])
               for name, spec in write_clients(data, ["clinic-a", "clinic-b"]).items()}
    settings = FederatedSettings(rounds=ROUNDS, local_steps=1, **DP).validate(len(clients))
    job = FederatedJob(str(model), "lora", None, "chatml", {"learning_rate": 5e-2, "seed": 7,
                                                            "per_device_train_batch_size": 2},
                       settings, str(out), expected_clients=sorted(clients), run_token="studio-test")
    return run_in_process(job, clients)


def dp_accounting_epsilons(rounds: int = ROUNDS) -> list[float]:
    """Epsilon at ``DP["target_delta"]`` after each of ``rounds`` full Gaussian releases, computed with
    dp-accounting's RDP accountant directly (what the rounds should record)."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    epsilons = []
    for _ in range(rounds):
        accountant.compose(dp_accounting.GaussianDpEvent(DP["noise_multiplier"]))
        epsilons.append(accountant.get_epsilon(DP["target_delta"]))
    return epsilons

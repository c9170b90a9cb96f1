"""The settings of a federated run, checked before any process starts, and how they travel to Flower apps."""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from finetune_sdk.errors import ConfigError

FLOWER_EXTRA_HINT = "pip install 'finetune-sdk[federated]'"
DP_MODES = ("server", "client")
#: Strategies whose aggregation SecAgg+'s weighted mean is (FedProx differs from FedAvg only on the clients).
SECURE_STRATEGIES = ("fedavg", "fedprox")


def require_flower() -> None:
    """Raise a one-line :class:`ConfigError` naming the extra when Flower (``flwr``) is not installed."""
    if importlib.util.find_spec("flwr") is None:
        raise ConfigError(f"federated fine-tuning needs Flower (flwr), which is not installed; run: "
                          f"{FLOWER_EXTRA_HINT}")


@dataclass
class FederatedSettings:
    """How a federation trains; every field has the name Flower or the FedAvg/FedProx/DP papers give it.

    Attributes:
        rounds: federated rounds (server aggregations).
        strategy: ``"fedavg"`` (McMahan et al., 2017, weighted by example counts), ``"fedprox"`` (Li et al., 2020:
            local loss plus ``proximal_mu / 2 * ||w - w_global||^2``) or a plugin's strategy.
        aggregation: how LoRA factors are combined: ``"fedavg"`` (each factor averaged by the strategy: the global
            update is ``mean(B) @ mean(A)``, not the clients' average ``mean(B @ A)``) or ``"ffa"`` (FFA-LoRA, Sun et
            al., 2024: every ``A`` drawn from one shared seed and frozen, only ``B`` trains and travels: exact, half
            the traffic of a square layer) or ``"fedex"`` (FedEx-LoRA, Singhal et al., 2024: factors averaged, the
            residual ``mean(B A) - mean(B) mean(A)`` folded into each client's frozen base weight: exact, plus a
            dense delta per adapted matrix in every server message; :mod:`finetune_sdk.federated.fedex`); see
            :mod:`finetune_sdk.federated.lora_aggregation`.
        preference_reference: the DPO/KTO reference each owner computes locally (preference and kto rows):
            ``"start"`` (the run's starting model: the base with the fresh, identity adapter, as standard DPO
            anchors at the model training started from) or ``"round"`` (the global model it received that round:
            every round a DPO step anchored at the current global model).
        update_compression: ``None`` (float32 updates), ``"int8"`` or ``"nf4"``: each client's update quantized
            blockwise before it is sent and dequantized by the server (:mod:`finetune_sdk.federated.compression`).
        fraction_fit: fraction of the connected clients sampled for training each round (at least
            ``min_fit_clients``).
        fraction_evaluate: fraction of clients asked for the final held-out evaluation.
        min_fit_clients: a round is aggregated when at least this many sampled clients report; fewer is an error.
            ``None``: 1.
        min_available_clients: clients that must be connected before the first round (``None``: ``min_fit_clients``).
        local_epochs: passes over its own data each client makes per round (``num_train_epochs`` of local fit).
        local_steps: optimizer steps per round instead of epochs (``max_steps`` of local fit; 0: use epochs).
        proximal_mu: FedProx's mu (0 with FedAvg).
        round_timeout: seconds the server waits for replies each round; clients that have not answered by then
            are dropped from the round.
        dp: differential privacy on the client updates: ``None`` (off), ``"server"`` (the server clips each
            update to ``clipping_norm`` and adds Gaussian noise: Flower's
            ``DifferentialPrivacyServerSideFixedClipping``) or ``"client"`` (each client clips its own update
            before sending it, the server adds the noise: ``DifferentialPrivacyClientSideFixedClipping`` with
            ``fixedclipping_mod``).
        noise_multiplier: Gaussian noise standard deviation as a multiple of ``clipping_norm``.
        clipping_norm: L2 bound on each client's update (the change of the trainable parameters in a round).
        target_delta: the delta at which epsilon is reported (Flower's RDP accountant, client-level DP,
            no amplification by sampling).
        seed: seed of the server's initial adapter (``None``: the Trainer's ``seed``).
        warm_clients: (default ``True``) each local client's SuperNode runs its ClientApps in one long-lived
            process that keeps the base model loaded across the rounds of a run
            (:mod:`finetune_sdk.federated.warm_client`); ``False``: Flower's new ``flwr-clientapp`` process per
            message (every round reloads the model).
        secure_aggregation: run every training round through Flower's SecAgg+ (``SecAggPlusWorkflow`` and
            ``secaggplus_mod``): clients send masked, quantized updates and the server learns only their
            example-weighted sum. Needs at least 2 clients per round; works with ``fedavg`` and ``fedprox``, not
            with ``dp`` (see docs/federated.md).
        secagg_num_shares: SecAgg+'s ``num_shares``: shares each client's secrets are split into; an int > 2, or a
            fraction of the sampled clients (1.0: all of them).
        secagg_reconstruction_threshold: SecAgg+'s ``reconstruction_threshold``: shares needed to unmask; an int,
            or a fraction of ``num_shares`` (at least 2). Higher resists more colluding clients, tolerates fewer drops.
        secagg_clipping_range: each client's example-weighted update (update * examples / ``secagg_max_weight``)
            must lie in ``[-secagg_clipping_range, secagg_clipping_range]`` per coordinate (a client whose
            update does not is refused, not clipped).
        secagg_quantization_range: integer levels over that range (quantization step ``2 * clipping_range /
            quantization_range``); at most 2**31, and clients x range must stay below 2**32.
        secagg_max_weight: SecAgg+'s ``max_weight``: the example count at which a client's weight is 1; larger
            counts risk the clipping range (the precision bound grows with it, see
            :func:`~finetune_sdk.federated.secure_aggregation.quantization_error_bound`).
    """

    rounds: int = 3
    strategy: str = "fedavg"
    aggregation: str = "fedavg"
    update_compression: str | None = None
    fraction_fit: float = 1.0
    fraction_evaluate: float = 1.0
    min_fit_clients: int | None = None
    min_available_clients: int | None = None
    local_epochs: float = 1.0
    local_steps: int = 0
    proximal_mu: float = 0.0
    round_timeout: float = 600.0
    dp: str | None = None
    noise_multiplier: float = 0.0
    clipping_norm: float = 0.0
    target_delta: float = 1e-5
    seed: int | None = None
    secure_aggregation: bool = False
    warm_clients: bool = True
    preference_reference: str = "start"
    secagg_num_shares: float = 1.0
    secagg_reconstruction_threshold: float = 0.67
    secagg_clipping_range: float = 1.0
    secagg_quantization_range: int = 2**22
    secagg_max_weight: float = 1000.0
    strategy_options: dict[str, Any] = field(default_factory=dict)

    def validate(self, num_clients: int | None = None) -> FederatedSettings:
        """Check every field; a bad one is a one-line :class:`ConfigError`. Returns ``self``.

        >>> FederatedSettings(rounds=2).validate(num_clients=3).min_fit_clients
        1
        >>> FederatedSettings(fraction_fit=1.5).validate()
        Traceback (most recent call last):
        ...
        finetune_sdk.errors.ConfigError: fraction_fit must be in (0, 1], got 1.5
        """
        if not isinstance(self.warm_clients, bool):
            raise ConfigError(f"warm_clients must be True or False, got {self.warm_clients!r}")
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise ConfigError(f"rounds must be an integer >= 1, got {self.rounds!r}")
        from finetune_sdk.federated.lora_aggregation import AGGREGATIONS

        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}")
        from finetune_sdk.federated.compression import check_compression

        check_compression(self.update_compression)
        if self.preference_reference not in ("start", "round"):
            raise ConfigError(f"preference_reference must be 'start' or 'round', got {self.preference_reference!r}")
        if self.aggregation == "fedex":
            self._validate_fedex()
        if self.update_compression and self.secure_aggregation:
            raise ConfigError("update_compression can't be combined with secure_aggregation: SecAgg+ quantizes and "
                              "masks the updates itself")
        for name in ("fraction_fit", "fraction_evaluate"):
            value = getattr(self, name)
            if not 0 < value <= 1 and not (name == "fraction_evaluate" and value == 0):
                raise ConfigError(f"{name} must be in (0, 1], got {value}")
        if self.min_fit_clients is None:
            self.min_fit_clients = 2 if self.secure_aggregation else 1
        if self.min_fit_clients < 1:
            raise ConfigError(f"min_fit_clients must be >= 1, got {self.min_fit_clients}")
        if self.min_available_clients is None:
            self.min_available_clients = self.min_fit_clients
        if num_clients is not None and self.min_fit_clients > num_clients:
            raise ConfigError(f"min_fit_clients={self.min_fit_clients} but only {num_clients} clients were given")
        if num_clients is not None and self.min_available_clients > num_clients:
            raise ConfigError(f"min_available_clients={self.min_available_clients} but only {num_clients} "
                              "clients were given")
        if self.local_epochs <= 0 and self.local_steps <= 0:
            raise ConfigError("local_epochs must be > 0 (or give local_steps > 0)")
        if self.proximal_mu < 0:
            raise ConfigError(f"proximal_mu must be >= 0, got {self.proximal_mu}")
        if self.round_timeout <= 0:
            raise ConfigError(f"round_timeout must be > 0 seconds, got {self.round_timeout}")
        if self.dp is not None:
            if self.dp not in DP_MODES:
                raise ConfigError(f"dp must be None, 'server' or 'client', got {self.dp!r}")
            if self.clipping_norm <= 0:
                raise ConfigError("differential privacy needs clipping_norm > 0 (the L2 bound on each update)")
            if self.noise_multiplier < 0 or not math.isfinite(self.noise_multiplier):
                raise ConfigError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
            if not 0 < self.target_delta < 1:
                raise ConfigError(f"target_delta must be in (0, 1), got {self.target_delta}")
        if self.secure_aggregation:
            self._validate_secure_aggregation(num_clients)
        return self

    def _validate_fedex(self) -> None:
        """FedEx-LoRA's residual needs each client's own ``B_i A_i`` and a weighted mean of the factors."""
        if self.strategy not in SECURE_STRATEGIES:
            raise ConfigError(f"aggregation='fedex' works with strategies {', '.join(SECURE_STRATEGIES)} (its residual "
                              f"completes a weighted mean of the factors), got {self.strategy!r}")
        if self.secure_aggregation or self.dp:
            raise ConfigError("aggregation='fedex' can't be combined with secure_aggregation or dp: its residual needs "
                              "each client's own update; use aggregation='ffa' (exact too) with them")

    def _validate_secure_aggregation(self, num_clients: int | None) -> None:
        """SecAgg+ sums updates the server never sees one by one: what needs a single update is refused."""
        if self.dp == "server":
            raise ConfigError("secure_aggregation can't be combined with dp='server': the server only sees the sum "
                              "of the updates, so it can't clip each one")
        if self.dp == "client":
            raise ConfigError("secure_aggregation can't be combined with dp='client' here: Flower 1.42's DP wrappers "
                              "and accountant run on its message API, SecAgg+ only on its legacy workflow")
        if self.strategy not in SECURE_STRATEGIES:
            raise ConfigError(f"secure_aggregation works with strategies {', '.join(SECURE_STRATEGIES)} (SecAgg+ "
                              f"computes the example-weighted mean itself), not {self.strategy!r}")
        if (self.min_fit_clients or 0) < 2 or (num_clients is not None and num_clients < 2):
            raise ConfigError("secure_aggregation needs at least 2 clients in every round (min_fit_clients >= 2): "
                              "the sum of one client's update is that update")
        for name in ("secagg_num_shares", "secagg_reconstruction_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or \
                    (isinstance(value, float) and value > 1):
                raise ConfigError(f"{name} must be an int (a count) or a float in (0, 1] (a fraction), got {value!r}")
        if isinstance(self.secagg_num_shares, int) and self.secagg_num_shares <= 2:
            raise ConfigError(f"secagg_num_shares as a count must be > 2, got {self.secagg_num_shares} (or give a "
                              "fraction of the sampled clients, e.g. 1.0)")
        if self.secagg_clipping_range <= 0 or self.secagg_max_weight <= 0:
            raise ConfigError("secagg_clipping_range and secagg_max_weight must be > 0")
        if not isinstance(self.secagg_quantization_range, int) or not 1 < self.secagg_quantization_range <= 2**31:
            raise ConfigError(f"secagg_quantization_range must be an int in (1, 2**31], got "
                              f"{self.secagg_quantization_range!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FederatedSettings:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def privacy(self) -> dict[str, Any] | None:
        """The privacy settings as the manifest records them (``None`` without DP)."""
        if self.dp is None:
            return None
        return {"mode": self.dp, "noise_multiplier": self.noise_multiplier, "clipping_norm": self.clipping_norm,
                "target_delta": self.target_delta}

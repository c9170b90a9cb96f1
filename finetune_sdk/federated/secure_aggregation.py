"""Secure aggregation with Flower's SecAgg+: the server learns the weighted sum of the clients' updates, never one.

Flower 1.42 implements SecAgg+ (Bell et al., 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead"; Bonawitz et al., 2017) as ``flwr.server.workflow.SecAggPlusWorkflow`` with the client mod
``flwr.client.mod.secaggplus_mod``, on its legacy ``FitIns``/``FitRes`` messages. The server's round loop
(:mod:`~finetune_sdk.federated.rounds`) runs each training round through that workflow when
``secure_aggregation=True``; this module is the glue on both sides:

* server: :func:`secure_train_round` runs the workflow's four stages (setup, share keys, collect masked vectors,
  unmask) for one round with a legacy strategy that samples the clients and receives the unmasked aggregate;
* client: :func:`secure_reply` trains as in a plain round and returns the *update* (new minus global trainable
  parameters) as a ``FitRes``; ``secaggplus_mod`` scales it by ``examples / max_weight`` (the FedAvg weight),
  quantizes it and masks it before it leaves the client.

Precision: each client's scaled update is clipped to ``[-clipping_range, clipping_range]`` (the client refuses,
with an error naming the setting, rather than clip silently) and stochastically rounded to a grid of step
``2 * clipping_range / quantization_range``. :func:`quantization_error_bound` is the resulting bound on how far
the secure aggregate can be from plain FedAvg's, per coordinate; every round records it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

from finetune_sdk.errors import FinetuneError
from finetune_sdk.federated.settings import FederatedSettings

#: Names of the trainable parameters, in the order of the legacy (unnamed) parameter list; in the fit config.
PARAMETER_NAMES = "parameter-names"
#: The array record a legacy ``FitIns`` arrives in (``flwr.compat``'s naming).
LEGACY_FIT_PARAMETERS = "fitins.parameters"


def quantization_error_bound(examples: list[int], settings: FederatedSettings) -> float:
    """Largest per-coordinate difference between SecAgg+'s aggregate and FedAvg's weighted mean of the updates.

    Client i's update ``x_i`` is multiplied by ``w_i = round(n_i / M * T) / T`` (``n_i`` its examples, ``M`` =
    ``secagg_max_weight``, ``T`` = ``secagg_quantization_range``), stochastically rounded to steps of
    ``2C / T`` (``C`` = ``secagg_clipping_range``), summed and divided by ``sum(w_i)``: the rounding adds less
    than ``k * 2C / T / sum(w_i)`` for ``k`` clients, and using ``w_i`` instead of ``n_i`` as weights at most
    ``sum_i |w_i / sum(w) - n_i / sum(n)| * C / w_i`` (clients refuse updates with ``|x_i| * w_i > C``).

    >>> settings = FederatedSettings(secure_aggregation=True)
    >>> f"{quantization_error_bound([100, 300], settings):.2e}"
    '4.37e-06'
    """
    scale, clip = settings.secagg_quantization_range, settings.secagg_clipping_range
    weights = [round(n / settings.secagg_max_weight * scale) / scale for n in examples]
    total_weight, total_examples = sum(weights), sum(examples)
    rounding = len(examples) * 2 * clip / scale / total_weight
    reweighting = sum(abs(w / total_weight - n / total_examples) * clip / w for w, n in zip(weights, examples))
    return rounding + reweighting


def secure_aggregation_record(settings: FederatedSettings) -> dict[str, Any] | bool:
    """What the manifest records under ``federated.secure_aggregation`` (``False`` when off)."""
    if not settings.secure_aggregation:
        return False
    return {"protocol": "SecAgg+ (Flower SecAggPlusWorkflow + secaggplus_mod)", "aggregated": "updates",
            "num_shares": settings.secagg_num_shares,
            "reconstruction_threshold": settings.secagg_reconstruction_threshold,
            "clipping_range": settings.secagg_clipping_range,
            "quantization_range": settings.secagg_quantization_range, "max_weight": settings.secagg_max_weight,
            "quantization_step": 2 * settings.secagg_clipping_range / settings.secagg_quantization_range}


# -- server ------------------------------------------------------------------------------------------------------
@dataclass
class SecureRound:
    """One securely aggregated round: the new global parameters and what the server may know per client."""

    arrays: Any
    reports: list[dict[str, Any]]  # node, client, examples, metrics (the clear-text FitRes metrics)
    bytes_to: dict[int, int]
    bytes_from: dict[int, int]
    sampled: list[int]
    errors: dict[int, str] = field(default_factory=dict)
    error_bound: float = 0.0


class CountingGrid:
    """A Flower ``Grid`` that passes messages through and counts each node's payload bytes both ways (arrays, and
    the byte strings of keys, key shares and masked vectors); it also keeps the error replies' reasons."""

    def __init__(self, grid: Any) -> None:
        self.grid = grid
        self.bytes_to: dict[int, int] = {}
        self.bytes_from: dict[int, int] = {}
        self.errors: dict[int, str] = {}
        self.first_destinations: list[int] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Any]:
        messages = list(messages)
        if self.first_destinations is None:
            self.first_destinations = [m.metadata.dst_node_id for m in messages]
        for message in messages:
            node = message.metadata.dst_node_id
            self.bytes_to[node] = self.bytes_to.get(node, 0) + content_bytes(message.content)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.errors[node] = reply.error.reason
            else:
                self.bytes_from[node] = self.bytes_from.get(node, 0) + content_bytes(reply.content)
        return replies


def content_bytes(content: Any) -> int:
    """Payload bytes of a message: array data plus byte strings in config records (not the small scalars)."""
    total = sum(len(array.data) for record in content.array_records.values() for array in record.values())
    for record in content.config_records.values():
        for value in record.values():
            if isinstance(value, bytes):
                total += len(value)
            elif isinstance(value, list):
                total += sum(len(v) for v in value if isinstance(v, bytes))
    return total


def _legacy_sampler(settings: FederatedSettings, grid: Any, names: list[str]) -> Any:
    """A legacy FedAvg that samples as the message-API strategies do and keeps the aggregate as it arrives
    (SecAggPlusWorkflow has already computed the weighted mean; averaging it again would only add rounding)."""
    from flwr.common import FitIns
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.strategy import FedAvg

    class SecAggSampler(FedAvg):  # type: ignore[misc]
        results: list[Any] | None = None

        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list[Any]:
            nodes = sorted(grid.get_node_ids())
            count = max(int(len(nodes) * settings.fraction_fit), settings.min_fit_clients or 2)
            if count > len(nodes):
                return []
            config = {"server-round": server_round, "proximal-mu": float(settings.proximal_mu),
                      PARAMETER_NAMES: json.dumps(names)}
            run_id = getattr(grid.run, "run_id", 0) if grid.run is not None else 0
            return [(GridClientProxy(node, grid, run_id), FitIns(parameters, dict(config)))
                    for node in random.sample(nodes, count)]

        def aggregate_fit(self, server_round: int, results: list[Any], failures: list[Any]) -> tuple[Any, dict]:
            self.results = results
            return (results[0][1].parameters if results else None), {}

    return SecAggSampler(fraction_evaluate=0.0, min_evaluate_clients=0)


def secure_train_round(grid: Any, settings: FederatedSettings, server_round: int, arrays: Any) -> SecureRound:
    """Run one training round through Flower's ``SecAggPlusWorkflow``; the new global is the old one plus the
    securely aggregated weighted mean of the clients' updates.

    Raises:
        FinetuneError: when the protocol halts (too few clients replied at some stage to unmask the sum).
    """
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
    from flwr.common import parameters_to_ndarrays
    from flwr.server import ServerConfig
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    names = list(arrays.keys())
    counting = CountingGrid(grid)
    sampler = _legacy_sampler(settings, counting, names)
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            config=ServerConfig(num_rounds=settings.rounds), strategy=sampler)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord(
        {str(i): Array(arrays[name].numpy()) for i, name in enumerate(names)})
    workflow = SecAggPlusWorkflow(
        num_shares=settings.secagg_num_shares, reconstruction_threshold=settings.secagg_reconstruction_threshold,
        max_weight=settings.secagg_max_weight, clipping_range=settings.secagg_clipping_range,
        quantization_range=settings.secagg_quantization_range, timeout=settings.round_timeout)
    workflow(counting, context)
    sampled = counting.first_destinations or []
    if not sampler.results:
        reasons = "; ".join(f"node {n}: {r.splitlines()[0][:200]}" for n, r in counting.errors.items())
        raise FinetuneError(f"round {server_round}: secure aggregation halted with {len(sampled)} sampled clients "
                            f"({reasons or 'too few replies to unmask the sum'}); SecAgg+ needs at least 2 and "
                            "enough replies at every stage for the reconstruction threshold")
    mean_update = parameters_to_ndarrays(sampler.results[0][1].parameters)
    new = ArrayRecord({name: Array((arrays[name].numpy().astype(np.float64) + update).astype(np.float32))
                       for name, update in zip(names, mean_update)})
    reports = [{"node": proxy.node_id, "examples": int(res.num_examples), "metrics": dict(res.metrics)}
               for proxy, res in sampler.results]
    bound = quantization_error_bound([r["examples"] for r in reports], settings)
    return SecureRound(new, reports, counting.bytes_to, counting.bytes_from, sampled, counting.errors, bound)


# -- client ------------------------------------------------------------------------------------------------------
def is_secure_round(msg: Any) -> bool:
    """Whether a train message comes from SecAggPlusWorkflow (a legacy ``FitIns``)."""
    return LEGACY_FIT_PARAMETERS in msg.content.array_records


def secure_reply(msg: Any, context: Any, client_name: str, train: Any) -> Any:
    """Answer SecAgg+'s collect-masked-vectors stage: ``train(arrays, config)`` returns a ``LocalUpdate``; the
    reply is its update (new minus global parameters) as a legacy ``FitRes`` for ``secaggplus_mod`` to mask."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, Message
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE
    from flwr.compat.common import recorddict_compat as compat

    fit = compat.recorddict_to_fitins(msg.content, keep_input=True)
    names = json.loads(str(fit.config[PARAMETER_NAMES]))
    received = parameters_to_ndarrays(fit.parameters)
    update = train(ArrayRecord({n: Array(a) for n, a in zip(names, received)}), fit.config)
    deltas = [update.arrays[n].numpy().astype(np.float32) - a.astype(np.float32) for n, a in zip(names, received)]
    protocol = context.state.config_records.get(RECORD_KEY_STATE, {})
    if protocol:
        scale = int(protocol["target_range"])
        weight = round(update.num_examples / float(protocol["max_weight"]) * scale) / scale
        largest = max(float(np.max(np.abs(d))) if d.size else 0.0 for d in deltas)
        if largest * weight > float(protocol["clipping_range"]):
            raise ValueError(f"raise secagg_clipping_range: this client's update reaches {largest:.4g}, beyond "
                             f"secagg_clipping_range * secagg_max_weight / examples = "
                             f"{float(protocol['clipping_range']) / weight:.4g} (SecAgg+ would clip it)")
    metrics: dict[str, Any] = {**update.metrics, "client": client_name, "formatter": update.formatter or ""}
    fitres = FitRes(Status(Code.OK, "OK"), ndarrays_to_parameters(deltas), update.num_examples, metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)

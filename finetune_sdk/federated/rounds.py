"""The server's round loop on Flower's Grid: sample, send the global parameters, aggregate, save, publish.

Flower's ``Strategy.start`` runs rounds 1..N in one go; this loop calls the same strategy methods
(``configure_train``, ``aggregate_train``, ``configure_evaluate``, ``aggregate_evaluate``) itself so that it can
start at round k after a crash, enforce ``min_fit_clients``, say which clients dropped, count the bytes each
client sent and received, and save and publish every round's global adapter.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from finetune_sdk.errors import FinetuneError
from finetune_sdk.federated.client_training import job_trainer
from finetune_sdk.federated.job import FederatedJob
from finetune_sdk.federated.compression import decompress_update
from finetune_sdk.federated.fedex import RESIDUAL_KEY, accumulate, as_record, lora_layers, residual
from finetune_sdk.federated.lora_aggregation import LORA_A, aggregation_error, freeze_lora_a, shared_seed
from finetune_sdk.federated.params import load_arrays, payload_bytes, trainable_arrays
from finetune_sdk.federated.ranks import pad
from finetune_sdk.federated.privacy import accountant_state, privacy_report, spent_so_far, wrap_with_dp
from finetune_sdk.federated.secure_aggregation import secure_aggregation_record
from finetune_sdk.federated.server_state import (
    clear_checkpoint,
    load_checkpoint,
    save_checkpoint,
    write_result,
    write_status,
)

logger = logging.getLogger("finetune_sdk")
REPORT_KEY = "report"
#: A client's cost of a round, when it reports it: its process start-up (Flower starts one per message), the model
#: load with the adapter's preparation, the local fit.
ROUND_COST = ("startup_seconds", "load_seconds", "train_seconds")


class FederatedServer:
    """Runs a :class:`FederatedJob` on a Flower ``Grid`` (inside the ServerApp)."""

    def __init__(self, job: FederatedJob, grid: Any) -> None:
        from transformers import set_seed

        from finetune_sdk.plugin_manager import get_plugin_host

        self.job, self.grid, self.settings = job, grid, job.settings
        self.state_dir = job.state_dir
        self.trainer = job_trainer(job, job.output_dir)
        set_seed(self.settings.seed if self.settings.seed is not None else self.trainer.options["seed"])
        session = self.trainer.current_model()
        session.model = self.trainer.technique.prepare(session.model, self.trainer.options, session.tokenizer)
        self.model = session.model
        self.frozen: dict[str, Any] = {}  # FFA-LoRA's A matrices: the same on every client, never sent
        if self.settings.aggregation == "ffa":
            freeze_lora_a(self.model, shared_seed(self.settings, self.trainer.options))
            self.frozen = {n: p.detach().float().numpy().copy() for n, p in self.model.named_parameters()
                           if LORA_A in f".{n}"}
        self.fedex_layers = lora_layers(self.model) if self.settings.aggregation == "fedex" else {}
        self.base_delta: dict[str, Any] = {}  # FedEx-LoRA's accumulated residual, folded into every base weight
        self.arrays = trainable_arrays(self.model)
        self.history: list[dict[str, Any]] = []
        self.names: dict[int, str] = {}
        self.examples: dict[str, int] = {}
        self.formatter: str | None = job.formatter
        self.parent: str | None = None
        self.start_round = 1
        resumed = load_checkpoint(self.state_dir) if job.resume else None
        saved_accountant = None
        if resumed is not None:
            self.arrays, state, self.base_delta = resumed
            self.start_round = state["round"] + 1
            self.history, self.parent = state["history"], state.get("parent")
            self.names = {int(k): v for k, v in state["names"].items()}
            self.examples, self.formatter = state["examples"], state.get("formatter") or self.formatter
            saved_accountant = state.get("accountant")
            logger.info("resuming the federated run after round %d from %s", state["round"], self.state_dir)
        self.population = max(len(job.expected_clients), self.settings.min_available_clients or 1)
        strategy = get_plugin_host().create("strategy", self.settings.strategy).build(self.settings)
        self.strategy = wrap_with_dp(strategy, self.settings, self.population, saved_accountant) \
            if self.settings.dp else strategy

    # -- the loop ----------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self._wait_for_clients()
        for server_round in range(self.start_round, self.settings.rounds + 1):
            started = time.time()
            train_round = self._secure_round if self.settings.secure_aggregation else self._plain_round
            arrays, reports, dropped, extra = train_round(server_round)
            global_norm = update_norm(arrays, self.arrays)
            self.arrays = arrays
            entry = self._round_entry(server_round, reports, dropped, time.time() - started)
            entry.update(extra, global_update_norm=global_norm)
            if (spent := spent_so_far(self.strategy, self.settings)) is not None:
                entry["privacy"] = spent  # the budget spent through this round (epsilon at delta, cumulative)
            self.history.append(entry)
            self._log_round(entry)
            self._save_round(entry)
        final_eval = self._final_evaluation()
        return self._finish(final_eval)

    def _plain_round(self, server_round: int) -> tuple[Any, list[dict[str, Any]], list[str], dict[str, Any]]:
        """Send the global parameters, receive each client's new ones, aggregate them with the strategy."""
        from flwr.app import ConfigRecord

        messages = self._with_base_delta(self.strategy.configure_train(server_round, self.arrays, ConfigRecord(),
                                                                       self.grid))
        sent = {m.metadata.dst_node_id: sum(payload_bytes(record) for record in m.content.array_records.values())
                for m in messages}  # the adapter, and FedEx-LoRA's dense base delta
        replies = list(self.grid.send_and_receive(messages, timeout=self.settings.round_timeout))
        valid = [r for r in replies if not r.has_error()]
        received = {r.metadata.src_node_id: payload_bytes(r.content["arrays"]) for r in valid}  # as they travelled
        for reply in valid:
            self.names[reply.metadata.src_node_id] = str(reply.content[REPORT_KEY]["client"])
            if self.settings.update_compression:
                reply.content["arrays"] = decompress_update(reply.content["arrays"], self.arrays,
                                                            self.settings.update_compression)
            reply.content["arrays"] = pad(reply.content["arrays"], self.arrays)  # a lower-rank client's reply
        errors = {r.metadata.src_node_id: r.error.reason for r in replies if r.has_error()}
        dropped = self._dropped(list(sent), {r.metadata.src_node_id for r in valid}, errors)
        self._require_enough(server_round, len(valid), len(sent), dropped)
        reports = [{"node": r.metadata.src_node_id, "metrics": dict(r.content["metrics"]),
                    "examples": int(r.content["metrics"]["num-examples"]),
                    "formatter": str(r.content[REPORT_KEY].get("formatter") or ""),
                    "bytes_received": sent[r.metadata.src_node_id], "bytes_sent": received[r.metadata.src_node_id],
                    "update_norm": update_norm(r.content["arrays"], self.arrays)} for r in valid]
        key = getattr(self.strategy, "weighted_by_key", "num-examples")
        weights = [float(r.content["metrics"].get(key, 1)) for r in valid]
        updates = [{k: a.numpy() for k, a in r.content["arrays"].items()} for r in valid]  # strategies may pop them
        arrays, _ = self.strategy.aggregate_train(server_round, valid)
        if arrays is None:
            raise FinetuneError(f"round {server_round}: the strategy could not aggregate the updates")
        arrays = same_dtypes(arrays, self.arrays)  # FedAdam/FedYogi compute in float64: don't double the traffic
        folded = accumulate(self.base_delta, self.fedex_layers, residual(arrays, updates, weights)) \
            if self.fedex_layers else None
        error = aggregation_error(self.arrays, arrays, updates, weights, self.frozen, folded)
        extra: dict[str, Any] = {"sampled": len(sent)}
        if error is not None:  # distance of the global LoRA update to the clients' average update
            extra["aggregation_error"] = error
        return arrays, reports, dropped, extra

    def _with_base_delta(self, messages: Any) -> list[Any]:
        """The messages, each carrying FedEx-LoRA's accumulated base delta when there is one."""
        messages = list(messages)
        if self.base_delta:
            record = as_record(self.base_delta)
            for message in messages:
                message.content[RESIDUAL_KEY] = record
        return messages

    def _secure_round(self, server_round: int) -> tuple[Any, list[dict[str, Any]], list[str], dict[str, Any]]:
        """The same round through Flower's SecAgg+: the server receives only the weighted sum of the updates."""
        from finetune_sdk.federated.secure_aggregation import secure_train_round

        outcome = secure_train_round(self.grid, self.settings, server_round, self.arrays)
        reports = []
        for report in outcome.reports:
            node, metrics = report["node"], report["metrics"]
            self.names[node] = str(metrics.pop("client"))
            reports.append({"node": node, "metrics": metrics, "examples": report["examples"],
                            "formatter": str(metrics.pop("formatter", "")),
                            "bytes_received": outcome.bytes_to.get(node, 0),
                            "bytes_sent": outcome.bytes_from.get(node, 0)})
        dropped = self._dropped(outcome.sampled, {r["node"] for r in reports}, outcome.errors)
        self._require_enough(server_round, len(reports), len(outcome.sampled), dropped)
        return outcome.arrays, reports, dropped, {
            "sampled": len(outcome.sampled), "secure_aggregation": {"max_quantization_error": outcome.error_bound}}

    def _require_enough(self, server_round: int, replied: int, sampled: int, dropped: list[str]) -> None:
        if replied < (self.settings.min_fit_clients or 1):
            raise FinetuneError(
                f"round {server_round}: only {replied} of {sampled} sampled clients reported (dropped: "
                f"{', '.join(dropped) or 'none'}); min_fit_clients is {self.settings.min_fit_clients}")

    def _wait_for_clients(self) -> None:
        wanted = self.settings.min_available_clients or 1
        while len(list(self.grid.get_node_ids())) < wanted:
            logger.info("waiting for clients: %d connected, %d wanted", len(list(self.grid.get_node_ids())), wanted)
            time.sleep(1)

    def _dropped(self, sampled: list[int], answered: set[int], errors: dict[int, str]) -> list[str]:
        """``"<client> (<reason>)"`` for every sampled client whose reply did not arrive or was an error: the
        owner's name and its whole one-line reason (from the client's :class:`OwnerError`), else the node id."""
        dropped = []
        for node in sampled:
            if node in answered:
                continue
            owner, reason = owner_and_reason(errors.get(node, "no reply before round_timeout"))
            if owner:
                self.names.setdefault(node, owner)
            dropped.append(f"{owner or self.names.get(node, f'node-{node}')} ({reason})")
        return dropped

    def _round_entry(self, server_round: int, reports: list[dict[str, Any]], dropped: list[str],
                     seconds: float) -> dict[str, Any]:
        clients: dict[str, Any] = {}
        for report in reports:
            name, metrics, examples = self.names[report["node"]], report["metrics"], report["examples"]
            self.examples[name] = examples
            self.formatter = self.formatter or report["formatter"] or None
            clients[name] = {
                "examples": examples, "bytes_received": report["bytes_received"], "bytes_sent": report["bytes_sent"],
                "train_loss": metrics["train_loss"], "train_steps": int(metrics["train_steps"]),
                **({"update_norm": report["update_norm"]} if "update_norm" in report else {}),
                **{key: round(float(metrics[key]), 3) for key in ROUND_COST if key in metrics},
                **({"eval_loss": metrics["eval_loss"], "global_eval_loss_before": metrics["global_eval_loss"],
                    "eval_examples": int(metrics["eval_examples"])} if metrics["eval_examples"] else {}),
            }
        if self.history:  # this round's clients evaluated the previous round's global model before training
            _attach_global_eval(self.history[-1], clients)
        traffic_down = sum(c["bytes_received"] for c in clients.values())
        traffic_up = sum(c["bytes_sent"] for c in clients.values())
        return {"round": server_round, "owners": len(clients), "clients": clients, "dropped": dropped,
                "seconds": round(seconds, 3),
                "bytes_to_clients": traffic_down, "bytes_from_clients": traffic_up,
                "bytes_total": traffic_down + traffic_up}

    def _log_round(self, entry: dict[str, Any]) -> None:
        line = round_summary(entry, self.settings.rounds)
        logger.info("%s", line)
        write_status(self.state_dir, self.job.run_token, "running", round=entry["round"], summary=line)

    def _save_round(self, entry: dict[str, Any]) -> None:
        load_arrays(self.model, self.arrays)
        directory = self.state_dir / f"round-{entry['round']}"
        write_result(self.trainer, directory, self.formatter, self._metrics(), self._federated(entry["round"]),
                     self.history, self.base_delta)
        if self.job.publish_as:
            version = self._registry().publish(
                directory, self.job.publish_as, parent=self.parent, tags=self._tags(entry),
                description=f"federated round {entry['round']} of {self.settings.rounds}")
            self.parent = entry["version"] = version.ref
            logger.info("published %s", version.ref)
        save_checkpoint(self.state_dir, self.arrays, self.base_delta, {
            "round": entry["round"], "history": self.history, "parent": self.parent,
            "names": {str(k): v for k, v in self.names.items()}, "examples": self.examples,
            "formatter": self.formatter, "array_names": list(self.arrays.keys()),
            "accountant": accountant_state(self.strategy)})

    def _final_evaluation(self) -> dict[str, Any]:
        from flwr.app import ConfigRecord

        if not self.settings.fraction_evaluate:
            return {}
        messages = self._with_base_delta(self.strategy.configure_evaluate(self.settings.rounds, self.arrays,
                                                                          ConfigRecord(), self.grid))
        replies = [r for r in self.grid.send_and_receive(messages, timeout=self.settings.round_timeout)
                   if not r.has_error()]
        per_client = {}
        for reply in replies:
            metrics = dict(reply.content["metrics"])
            if metrics.get("has-eval"):
                name = str(reply.content[REPORT_KEY]["client"])
                per_client[name] = {"eval_loss": metrics["eval_loss"], "eval_examples": int(metrics["num-examples"])}
        if self.history:
            _attach_global_eval(self.history[-1], {n: {"global_eval_loss_before": c["eval_loss"],
                                                      "eval_examples": c["eval_examples"]}
                                                   for n, c in per_client.items()})
        return per_client

    def _finish(self, final_eval: dict[str, Any]) -> dict[str, Any]:
        load_arrays(self.model, self.arrays)
        metrics = self._metrics()
        manifest = write_result(self.trainer, Path(self.job.output_dir), self.formatter, metrics,
                                self._federated(self.settings.rounds), self.history, self.base_delta)
        clear_checkpoint(self.state_dir)
        return manifest

    # -- records -----------------------------------------------------------------------------------------------
    def _metrics(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        total = sum(e["bytes_total"] for e in self.history)
        metrics: dict[str, Any] = {
            "rounds": len(self.history) and self.history[-1]["round"],
            "train_loss": _weighted(last.get("clients", {}), "train_loss"),
            "bytes_total": total, "bytes_to_clients": sum(e["bytes_to_clients"] for e in self.history),
            "bytes_from_clients": sum(e["bytes_from_clients"] for e in self.history),
            "trainable_parameters": sum(int(a.numpy().size) for a in self.arrays.values()),
            "total_parameters": sum(p.numel() for p in self.model.parameters()),
            "examples": sum(self.examples.values()),
            # how many owners each round's global adapter was trained on (fewer than asked shows here)
            "owners_per_round": [e.get("owners", len(e["clients"])) for e in self.history],
            **({"aggregation_error_max": max(errors)} if (errors := [e["aggregation_error"] for e in self.history
                                                                    if "aggregation_error" in e]) else {}),
            "owners_min": min((e.get("owners", len(e["clients"])) for e in self.history), default=0),
        }
        if "global_eval" in last:
            metrics["eval_loss"] = last["global_eval"]["eval_loss"]
        return metrics

    def _federated(self, server_round: int) -> dict[str, Any]:
        return {
            "round": server_round, "rounds": self.settings.rounds, "strategy": self.settings.strategy,
            "aggregation": self.settings.aggregation, "update_compression": self.settings.update_compression,
            "settings": {k: v for k, v in vars(self.settings).items() if k != "strategy_options"},
            "clients": {name: {"examples": n} for name, n in sorted(self.examples.items())},
            "privacy": privacy_report(self.strategy, self.settings),
            "secure_aggregation": secure_aggregation_record(self.settings), "runtime": f"flower {_flower_version()}",
            "history": self.history,
        }

    def _tags(self, entry: dict[str, Any]) -> list[str]:
        privacy = self.settings.privacy()
        clients = ",".join(f"{n}:{c['examples']}" for n, c in sorted(entry["clients"].items()))
        return ["federated", f"round={entry['round']}", f"strategy={self.settings.strategy}",
                f"aggregation={self.settings.aggregation}", f"clients={clients}",
                f"secure_aggregation={'secagg+' if self.settings.secure_aggregation else 'off'}",
                "dp=off" if privacy is None else
                f"dp={privacy['mode']},noise_multiplier={privacy['noise_multiplier']},"
                f"clipping_norm={privacy['clipping_norm']}"]

    def _registry(self) -> Any:
        from finetune_sdk.registry import Registry

        return Registry(self.job.registry_home) if self.job.registry_home else Registry()


def same_dtypes(arrays: Any, like: Any) -> Any:
    """``arrays`` with each tensor cast to the dtype of the same tensor in ``like`` (the global parameters)."""
    from flwr.app import Array, ArrayRecord

    if all(arrays[k].dtype == like[k].dtype for k in arrays.keys() if k in like):
        return arrays
    return ArrayRecord({k: Array(a.numpy().astype(like[k].numpy().dtype)) if k in like else a
                        for k, a in arrays.items()})


def owner_and_reason(reason: str) -> tuple[str | None, str]:
    """The owner's name and its one-line error from an error reply's reason (Flower wraps the text of the
    client's ``OwnerError`` as ``<class '...'>:<'TEXT'>``); ``(None, first line)`` for any other reason.

    >>> import json
    >>> text = json.dumps({"client": "clinic-a", "error": "DataError: a.jsonl line 2: not JSON"})
    >>> owner_and_reason("<class 'OwnerError'>:<'" + text + "'>")
    ('clinic-a', 'DataError: a.jsonl line 2: not JSON')
    """
    import json

    start, end = reason.find('{"client"'), reason.rfind("}")
    if start >= 0 and end > start:
        try:
            record = json.loads(reason[start:end + 1])
            return str(record["client"]), str(record["error"])
        except (ValueError, KeyError, TypeError):
            pass
    return None, (reason.splitlines() or [""])[0]


def _attach_global_eval(entry: dict[str, Any], clients: dict[str, Any]) -> None:
    """Record, on the round that produced a global model, each client's held-out loss of that model."""
    losses = {n: c for n, c in clients.items() if "global_eval_loss_before" in c}
    if not losses:
        return
    per_client = {n: c["global_eval_loss_before"] for n, c in losses.items()}
    weights = {n: c.get("eval_examples", 1) for n, c in losses.items()}
    total = sum(weights.values()) or 1
    entry["global_eval"] = {"per_client": per_client,
                            "eval_loss": sum(per_client[n] * weights[n] for n in per_client) / total}


def round_summary(entry: dict[str, Any], rounds: int) -> str:
    """One line per round: each client's examples, loss and traffic, and who dropped."""
    parts = [f"{name}: {c['examples']} examples, train_loss {c['train_loss']:.4f}, "
             f"sent {c['bytes_sent']:,} B, received {c['bytes_received']:,} B"
             for name, c in entry["clients"].items()]
    dropped = f"; dropped: {', '.join(entry['dropped'])}" if entry["dropped"] else ""
    error = f"; LoRA aggregation error {entry['aggregation_error']:.3%}" if "aggregation_error" in entry else ""
    return (f"round {entry['round']}/{rounds} ({entry['seconds']:.1f} s, {entry.get('owners', len(entry['clients']))} "
            f"owners): {'; '.join(parts)}{dropped}{error}")


def update_norm(new: Any, old: Any) -> float:
    """L2 norm of a client's update: the change of all its trainable parameters in the round."""
    import numpy as np

    return float(np.sqrt(sum(float(np.sum((new[k].numpy().astype(np.float64) - old[k].numpy()) ** 2))
                             for k in old.keys())))


def _weighted(clients: dict[str, Any], key: str) -> float | None:
    total = sum(c["examples"] for c in clients.values())
    if not total:
        return None
    return sum(c[key] * c["examples"] for c in clients.values()) / total


def _flower_version() -> str:
    from importlib import metadata

    return metadata.version("flwr")


def write_failure(job: FederatedJob, exc: BaseException) -> None:
    write_status(job.state_dir, job.run_token, "failed", error=f"{type(exc).__name__}: {exc}")

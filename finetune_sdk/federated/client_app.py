"""The Flower ClientApp every client runs: its data stays in this process, trainable parameters go back.

A SuperNode started by ``finetune federated client`` (or by ``Trainer.fit_federated`` for each simulated client)
runs this app for each message of the server. The client's data paths come from the SuperNode's node config
(``data``, ``eval-data``, ``client-name``), which never leaves the client's machine.

Replies carry one ``ArrayRecord`` (the trainable parameters), one ``MetricRecord`` (``num-examples`` and the
losses, which Flower's strategies aggregate) and one ``ConfigRecord`` ``"report"`` naming the client.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.client.mod import secaggplus_mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from finetune_sdk.federated.audit import install_open_audit
from finetune_sdk.federated.client_training import ClientData, evaluate_global, train_round
from finetune_sdk.federated.job import NODE_DATA, NODE_EVAL_DATA, NODE_NAME, NODE_RANK, FederatedJob
from finetune_sdk.federated.privacy import UNIT_WEIGHT
from finetune_sdk.federated.secure_aggregation import is_secure_round, secure_reply

REPORT_KEY = "report"


def client_data(context: Context) -> ClientData:
    """This client's data paths from the SuperNode's node config."""
    config = context.node_config
    if NODE_DATA not in config:
        raise ValueError(f"this SuperNode has no {NODE_DATA!r} in its node config; start it with "
                         "`finetune federated client --data FILE`")
    name = str(config.get(NODE_NAME) or f"node-{context.node_id}")
    eval_data = str(config.get(NODE_EVAL_DATA) or "") or None
    rank = int(config[NODE_RANK]) if NODE_RANK in config else None
    return ClientData(name, str(config[NODE_DATA]), eval_data, rank)


def base_delta(msg: Message) -> Any:
    """FedEx-LoRA's accumulated base delta the server sent with the parameters, or ``None``."""
    from finetune_sdk.federated.fedex import RESIDUAL_KEY

    return msg.content.array_records.get(RESIDUAL_KEY)


def clip_when_asked(msg: Message, context: Context, call_next: Any) -> Message:
    """Flower's ``fixedclipping_mod`` (client-side DP clipping) when the server sent a clipping norm."""
    configs = list(msg.content.config_records.values())
    if configs and KEY_CLIPPING_NORM in configs[0]:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def secure_aggregation_when_asked(msg: Message, context: Context, call_next: Any) -> Message:
    """Flower's ``secaggplus_mod`` (SecAgg+ masking) for the messages of ``SecAggPlusWorkflow``."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def process_startup_seconds() -> float | None:
    """Seconds from this ``flwr-clientapp`` process's start to its message handler (Python, torch, transformers
    and the app imported: the per-message cost of Flower's one process per message), or in the SDK's long-lived
    executor from the task's acquisition to the handler; ``None`` elsewhere."""
    import sys
    import time
    from pathlib import Path

    warm = sys.modules.get("finetune_sdk.federated.warm_client")
    if warm is not None and getattr(warm, "TASK_STARTED", None) is not None:
        return max(time.time() - warm.TASK_STARTED, 0.0)
    if Path(sys.argv[0]).name != "flwr-clientapp":
        return None
    import psutil

    return max(time.time() - psutil.Process().create_time(), 0.0)


class OwnerError(RuntimeError):
    """A client's failure, as JSON ``{"client": name, "error": "<Type>: <message>"}``: Flower's runtime puts its
    text into the error reply's reason, from which the server names the owner and the whole one-line reason."""


def owner_error_reason(client: str, exc: BaseException) -> str:
    """``{"client": ..., "error": ...}`` for ``exc``: its type and its message's lines joined into one line."""
    message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return json.dumps({"client": client, "error": f"{type(exc).__name__}: {message}" if message else
                       type(exc).__name__})


def names_its_owner(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Re-raise any failure of ``handler`` as an :class:`OwnerError` naming this client."""

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except OwnerError:
            raise
        except Exception as exc:
            name = str(context.node_config.get(NODE_NAME) or f"node-{context.node_id}")
            raise OwnerError(owner_error_reason(name, exc)) from exc

    return wrapped


def compress_when_asked(msg: Message, context: Context, call_next: Any) -> Message:
    """With ``update_compression``, the reply's parameters become the quantized update (after any DP clipping,
    so the server dequantizes a clipped update)."""
    reply = call_next(msg, context)
    kind = FederatedJob.from_run_config(context.run_config).settings.update_compression
    if kind and msg.metadata.message_type.startswith("train") and not reply.has_error() \
            and "arrays" in reply.content and "arrays" in msg.content:
        from finetune_sdk.federated.compression import compress_update

        reply.content["arrays"] = compress_update(reply.content["arrays"], msg.content["arrays"], kind)
    return reply


app = ClientApp(mods=[compress_when_asked, secure_aggregation_when_asked, clip_when_asked])


@app.train()
@names_its_owner
def train(msg: Message, context: Context) -> Message:
    """Train on this client's data from the global parameters; reply with the new trainable parameters (or, in a
    SecAgg+ round, with the update, which ``secaggplus_mod`` masks)."""
    client = client_data(context)
    install_open_audit(f"client-{client.name}")
    job = FederatedJob.from_run_config(context.run_config)
    if is_secure_round(msg):
        return secure_reply(msg, context, client.name, lambda arrays, config: train_round(
            job, client, arrays, int(config["server-round"]), float(config.get("proximal-mu", 0.0))))
    startup = process_startup_seconds()
    config = msg.content["config"]
    update = train_round(job, client, msg.content["arrays"], int(config["server-round"]),
                         float(config.get("proximal-mu", 0.0)), base_delta(msg))
    metrics = MetricRecord({"num-examples": update.num_examples, UNIT_WEIGHT: 1, **update.metrics,
                            **({"startup_seconds": startup} if startup is not None else {})})
    report = ConfigRecord({"client": client.name, "formatter": update.formatter or ""})
    return Message(RecordDict({"arrays": update.arrays, "metrics": metrics, REPORT_KEY: report}), reply_to=msg)


@app.evaluate()
@names_its_owner
def evaluate(msg: Message, context: Context) -> Message:
    """Held-out loss of the global parameters on this client's eval data."""
    client = client_data(context)
    install_open_audit(f"client-{client.name}")
    job = FederatedJob.from_run_config(context.run_config)
    metrics, formatter = evaluate_global(job, client, msg.content["arrays"], base_delta(msg))
    examples = int(metrics.pop("eval_examples", 0))
    record = MetricRecord({"num-examples": max(examples, 1), "eval_loss": metrics.get("eval_loss", 0.0),
                           "has-eval": 1 if metrics else 0})
    report = ConfigRecord({"client": client.name, "formatter": formatter or ""})
    return Message(RecordDict({"metrics": record, REPORT_KEY: report}), reply_to=msg)

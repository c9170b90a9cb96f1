"""One client's part of a round: load the global parameters, train on its own data, report.

Local training is the SDK's ordinary ``Trainer.fit`` (same techniques, formatters, options and seeds as a local
run), started from the global trainable parameters the server sent. With FedProx each trainable parameter's
gradient gets the proximal term ``mu * (w - w_global)`` (the gradient of ``mu/2 * ||w - w_global||^2``).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_sdk.data.rows import load_rows
from finetune_sdk.federated.job import FederatedJob
from finetune_sdk.federated.lora_aggregation import freeze_lora_a, shared_seed
from finetune_sdk.federated.params import load_arrays, trainable_arrays

if TYPE_CHECKING:
    from finetune_sdk.trainer import Trainer


def job_trainer(job: FederatedJob, output_dir: str | Path, **overrides: Any) -> Trainer:
    """A :class:`~finetune_sdk.Trainer` for ``job``'s model, technique and options (``overrides`` win): each
    client's local step and the server's global model are ordinary Trainers."""
    from finetune_sdk.trainer import Trainer

    options = {**job.options, **overrides}
    return Trainer(job.model, technique=job.technique, quantizer=job.quantizer or "none", formatter=job.formatter,
                   output_dir=output_dir, progress=False, **options)


@dataclass
class ClientData:
    """Where one client's rows are; read only inside that client's process."""

    name: str
    train: str
    eval: str | None = None
    rank: int | None = None  # this client's LoRA rank when lower than the global adapter's (HetLoRA-style)


@dataclass
class LocalUpdate:
    """What a client sends back: trainable parameters and numbers about them (never rows or tokens)."""

    arrays: Any
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    formatter: str | None = None


def local_options(job: FederatedJob, server_round: int) -> dict[str, Any]:
    """The local fit's options for a round: the job's, with epochs/steps from the federated settings and the
    seed moved on by one per round (round 1 uses the Trainer's seed, so 1 client x 1 round equals a local fit)."""
    settings = job.settings
    seed = int(job.options.get("seed", 42)) + server_round - 1
    options: dict[str, Any] = {"seed": seed, "save_steps": 0}
    if settings.local_steps:
        options["max_steps"] = settings.local_steps
    else:
        options["num_train_epochs"], options["max_steps"] = settings.local_epochs, -1
    return options


def evaluate_global(job: FederatedJob, client: ClientData, arrays: Any,
                    base_delta: Any = None) -> tuple[dict[str, float], str | None]:
    """Held-out loss of the global parameters (with FedEx-LoRA's ``base_delta`` folded into the base) on this
    client's eval data (empty without eval data)."""
    if not client.eval:
        return {}, None
    work = Path(tempfile.mkdtemp(prefix="finetune-federated-eval-"))
    try:
        rows = load_rows(client.eval, name=f"client {client.name} eval-data")
        trainer = job_trainer(job, work / "out", **rank_options(job, client))
        _prepare_with(trainer, rank_arrays(arrays, job, client), job, base_delta)
        metrics = trainer.evaluate(rows)
        return {"eval_loss": float(metrics["eval_loss"]), "eval_examples": float(len(rows))}, \
            trainer.formatter.name if trainer.formatter else None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def train_round(job: FederatedJob, client: ClientData, arrays: Any, server_round: int,
                proximal_mu: float = 0.0, base_delta: Any = None) -> LocalUpdate:
    """Train locally from the global ``arrays`` and return the new trainable parameters and metrics.

    ``base_delta`` (FedEx-LoRA's accumulated residual, an ``ArrayRecord`` keyed by base weight name) is added to
    the frozen base weights first, so that training starts from the exact global model.

    Metrics: ``train_loss``, ``train_steps``; with eval data ``global_eval_loss`` (the received global model on
    this client's held-out rows, before training), ``eval_loss`` (the local model after training) and
    ``eval_examples`` (all three 0 without eval data, so that every client reports the same keys); the round's
    cost: ``load_seconds`` (Trainer, model load and adapter preparation) and ``train_seconds`` (the local fit).
    """
    started = time.perf_counter()
    rows = load_rows(client.train, name=f"client {client.name} data")
    eval_rows = load_rows(client.eval, name=f"client {client.name} eval-data") if client.eval else None
    work = Path(tempfile.mkdtemp(prefix="finetune-federated-client-"))
    try:
        trainer = job_trainer(job, work / "out", **local_options(job, server_round), **rank_options(job, client))
        model = _prepare_with(trainer, rank_arrays(arrays, job, client), job, base_delta)
        metrics: dict[str, float] = {"global_eval_loss": 0.0, "eval_loss": 0.0, "eval_examples": 0.0,
                                     "load_seconds": time.perf_counter() - started}
        if eval_rows is not None:
            metrics["global_eval_loss"] = float(trainer.evaluate(eval_rows)["eval_loss"])
        handles = _add_proximal_term(model, proximal_mu) if proximal_mu > 0 else []
        fit_started = time.perf_counter()
        try:
            result = trainer.fit(rows)
            metrics["train_seconds"] = time.perf_counter() - fit_started
        finally:
            for handle in handles:
                handle.remove()
        metrics["train_loss"] = float(result.metrics["train_loss"])
        metrics["train_steps"] = float(result.metrics["train_steps"])
        if eval_rows is not None:
            metrics["eval_loss"] = float(trainer.evaluate(eval_rows)["eval_loss"])
            metrics["eval_examples"] = float(len(eval_rows))
        return LocalUpdate(trainable_arrays(trainer.current_model().model), result.metrics["examples"], metrics,
                           trainer.formatter.name if trainer.formatter else None)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def rank_options(job: FederatedJob, client: ClientData) -> dict[str, Any]:
    """``r``/``lora_alpha`` of a client whose rank is below the global one (same scaling); ``{}`` otherwise."""
    if client.rank is None or client.rank == job.options.get("r"):
        return {}
    from finetune_sdk.federated.ranks import check_rank, client_lora_options

    check_rank(client.name, client.rank, int(job.options["r"]))
    return client_lora_options(job.options, client.rank)


def rank_arrays(arrays: Any, job: FederatedJob, client: ClientData) -> Any:
    """The global arrays truncated to this client's rank (HetLoRA-style), or as they are."""
    if not rank_options(job, client):
        return arrays
    from finetune_sdk.federated.ranks import truncate

    return truncate(arrays, int(client.rank or 0))


def _prepare_with(trainer: Any, arrays: Any, job: FederatedJob, base_delta: Any = None) -> Any:
    """Make the Trainer's model trainable as its technique does, then load the global parameters into it.

    With ``aggregation="ffa"`` every LoRA ``A`` is set from the job's shared seed and frozen first (the server
    did the same), so only ``B`` is trainable, loaded and sent back. With ``aggregation="fedex"`` the received
    base delta is added to the frozen base weights. With ``preference_reference="start"`` the freshly prepared
    trainable parameters (the run's starting model: a new adapter is the identity, FFA-LoRA's ``B`` is zero) are
    kept as ``reference_parameters``, from which a DPO/KTO fit computes its reference before training.
    ``Trainer.fit`` continues from a prepared model (as a second ``fit`` continues the same adapter)."""
    session = trainer.current_model()
    session.model = trainer.technique.prepare(session.model, trainer.options, session.tokenizer)
    if job.settings.aggregation == "ffa":
        freeze_lora_a(session.model, shared_seed(job.settings, job.options))
    if base_delta is not None:
        from finetune_sdk.federated.fedex import fold_into_peft

        fold_into_peft(session.model, base_delta)
    if job.settings.preference_reference == "start":  # DPO/KTO's reference: the run's starting model
        session.reference_parameters = {name: param.detach().clone() for name, param in
                                        session.model.named_parameters() if param.requires_grad}
    load_arrays(session.model, arrays)
    return session.model


def _add_proximal_term(model: Any, mu: float) -> list[Any]:
    """Gradient hooks adding FedProx's ``mu * (w - w_global)`` to each trainable parameter's gradient, once per
    optimizer step (Li et al., 2020, "Federated Optimization in Heterogeneous Networks": the gradient of
    ``mu/2 * ||w - w_global||^2``).

    Backward runs once per micro-batch and the micro-batch gradients are summed, so the whole term is added on the
    step's last micro-batch (accelerate's ``GradientState.sync_gradients``, which transformers' Trainer sets there)
    and nothing on the others: a step of fewer micro-batches (the last of an epoch) gets the whole term too, as the
    bigger batch does, before gradient clipping. Outside a Trainer (``sync_gradients`` is then True) every backward
    adds it."""
    from accelerate.state import GradientState

    state = GradientState()
    handles = []
    for param in model.parameters():
        if param.requires_grad:
            anchor = param.detach().clone()
            handles.append(param.register_hook(
                lambda grad, p=param, a=anchor: grad + mu * (p.detach() - a) if state.sync_gradients else grad))
    return handles

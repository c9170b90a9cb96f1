"""``Trainer.fit_federated``: a federation of clients on this machine, on Flower's runtime."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import fields
from pathlib import Path
from typing import Any

from finetune_sdk.errors import ConfigError, DataError, FinetuneError
from finetune_sdk.federated.job import FederatedJob
from finetune_sdk.federated.settings import FederatedSettings, require_flower
from finetune_sdk.training.result import FitResult

SETTING_NAMES = {f.name for f in fields(FederatedSettings)}
#: The SuperLink's SQLite state beside a server's checkpoint (``finetune federated server`` only).
SUPERLINK_DATABASE = "superlink.db"


def normalise_clients(clients: Any, work_dir: Path) -> dict[str, tuple[Any, ...]]:
    """``{name: (train_path, eval_path)}`` from ``{name: path | rows | {"train": ..., "eval": ...}}``; a client
    given ``{"train": ..., "r": 4}`` gets ``(train_path, eval_path, 4)``: its LoRA rank, below the global one
    (:mod:`finetune_sdk.federated.ranks`).

    Rows given as lists of dicts are written to private (0600) JSON Lines files in ``work_dir``, for that client's
    process to read. Paths are only checked to exist here (:func:`check_owner_data` reads them next).
    """
    from finetune_sdk.registry.refs import validate_name

    if not isinstance(clients, dict) or not clients:
        raise ConfigError("clients must be a non-empty dict {client name: data file or {'train': ..., 'eval': ...}}")
    out: dict[str, tuple[Any, ...]] = {}
    for name, spec in clients.items():
        try:
            validate_name(str(name), "client name")
        except FinetuneError as exc:
            raise ConfigError(str(exc)) from None
        train, evaluation = (spec.get("train"), spec.get("eval")) if isinstance(spec, dict) else (spec, None)
        if train is None:
            raise ConfigError(f"client {name!r}: no 'train' data")
        unknown = sorted(set(spec) - {"train", "eval", "r"}) if isinstance(spec, dict) else []
        if unknown:
            raise ConfigError(f"client {name!r}: unknown key {unknown[0]!r}; a client is a file, rows or "
                              "{'train': ..., 'eval': ..., 'r': rank}")
        out[str(name)] = (_as_file(train, work_dir / f"{name}-train.jsonl", f"client {name!r} train"),
                          _as_file(evaluation, work_dir / f"{name}-eval.jsonl", f"client {name!r} eval")
                          if evaluation is not None else None)
        if isinstance(spec, dict) and spec.get("r") is not None:
            out[str(name)] += (spec["r"],)
    return out


def check_owner_data(trainer: Any, clients: dict[str, tuple[Any, ...]],
                     settings: FederatedSettings | None = None) -> None:
    """Read and format every owner's train and eval rows before round 1, as each client's ``fit`` will.

    A malformed file, a row the formatter can't use or an empty dataset is one line naming the owner, the file
    and the line (the data layer's message, prefixed with ``owner '<name>':``), before any model loads or any
    Flower process starts: a federation never trains on fewer owners than it was given because one owner's data
    is bad. (All owners' files are on this machine in an in-process run; ``finetune federated client`` checks its
    own file the same way before it connects.)

    A client's LoRA rank (a third item) must be an integer from 1 to the Trainer's ``r``, and can't be combined
    with ``aggregation="ffa"`` or ``update_compression`` (their messages assume the global shapes).

    Raises:
        DataError: (or the formatter's :class:`ConfigError`) for the first owner whose data can't train.
    """
    from finetune_sdk.federated.ranks import check_rank

    for name, (_, _, *rank) in clients.items():
        if rank:
            check_rank(name, rank[0], int(trainer.options.get("r") or 0))
            if settings is not None and (settings.aggregation != "fedavg" or settings.update_compression):
                raise ConfigError(f"client {name!r}: a LoRA rank per client (HetLoRA-style) works with "
                                  "aggregation='fedavg' and without update_compression")
    from finetune_sdk.data.rows import load_rows
    from finetune_sdk.training.planning import Planner

    tokenizer = trainer.load_tokenizer()
    for name, (train, evaluation, *_) in clients.items():
        try:
            rows = load_rows(train, name=f"client {name!r} data")
            eval_rows = load_rows(evaluation, name=f"client {name!r} eval-data") if evaluation else None
            Planner(trainer.host, trainer.technique.task, trainer.options).plan(rows, eval_rows, tokenizer,
                                                                                trainer.formatter)
        except FinetuneError as exc:
            raise type(exc)(f"owner {name!r}: {exc}") from None


def _as_file(data: Any, path: Path, what: str) -> str:
    if isinstance(data, (str, os.PathLike)):
        if not Path(data).is_file():
            raise DataError(f"{what} data: no such file {data}")
        return str(Path(data).resolve())
    if isinstance(data, list) and all(isinstance(row, dict) for row in data):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for row in data:
                handle.write(json.dumps(row) + "\n")
        return str(path)
    raise DataError(f"{what} data must be a file path or a list of dicts, got {type(data).__name__}")


def fit_federated(trainer: Any, clients: Any, *, resume: bool = False, timeout: float | None = None,
                  **settings: Any) -> FitResult:
    """Federated fine-tuning on Flower: each client trains on its own data, only trainable parameters travel.

    Runs a Flower SuperLink and one SuperNode per client as local processes on loopback; each client's rows
    are read only by its own process (and checked once before round 1 by :func:`check_owner_data`). Returns a :class:`FitResult` whose folder is an ordinary result
    (``finetune_sdk.load`` reads it), with per-round history, traffic and privacy in ``manifest["federated"]``.
    Needs ``pip install 'finetune-sdk[federated]'``; see docs/federated.md.

    Args:
        trainer: the :class:`~finetune_sdk.Trainer` whose model, technique, formatter and options each client uses.
        clients: ``{name: data}``, where data is a file, a list of dicts, or ``{"train": ..., "eval": ...}``
            (the eval rows give each client's held-out loss every round).
        rounds: federated rounds.
        strategy: ``"fedavg"``, ``"fedprox"`` or a plugin's strategy.
        resume: continue after the last completed round of an interrupted run with the same ``output_dir``.
        **settings: :class:`~finetune_sdk.federated.FederatedSettings` fields: ``fraction_fit``,
            ``min_fit_clients``, ``local_epochs``, ``local_steps``, ``proximal_mu``, ``round_timeout``, ``dp``,
            ``noise_multiplier``, ``clipping_norm``, ``target_delta``, ``secure_aggregation`` (Flower's SecAgg+)
            and its ``secagg_*`` parameters...

    Raises:
        ConfigError: an unknown setting, strategy or client name, or Flower not installed.
        FinetuneError: a round where fewer than ``min_fit_clients`` clients reported.

    Example:
        >>> trainer = Trainer("models/my-llama", technique="qlora", output_dir="runs/fed")  # doctest: +SKIP
        >>> result = trainer.fit_federated({"clinic-a": "a.jsonl", "clinic-b": "b.jsonl"}, rounds=5,
        ...                                strategy="fedavg", fraction_fit=1.0, local_epochs=1)  # doctest: +SKIP
        >>> result.metrics["bytes_total"], result.manifest["federated"]["history"][-1]["clients"]  # doctest: +SKIP
    """
    require_flower()
    if not isinstance(clients, dict) or not clients:
        raise ConfigError("clients must be a non-empty dict {client name: data file or {'train': ..., 'eval': ...}}")
    unknown = sorted(set(settings) - SETTING_NAMES)
    if unknown:
        from finetune_sdk.errors import closest

        raise ConfigError(f"unknown federated setting {unknown[0]!r}{closest(unknown[0], SETTING_NAMES)}; "
                          f"available: {', '.join(sorted(SETTING_NAMES))}")
    if "min_fit_clients" not in settings:  # every sampled owner, so that no round trains on fewer silently
        sampled = max(int(len(clients) * float(settings.get("fraction_fit", 1.0))), 1)
        settings["min_fit_clients"] = max(sampled, 2 if settings.get("secure_aggregation") else 1)
    config = FederatedSettings(**settings).validate(num_clients=len(clients))
    if "min_available_clients" not in settings:
        config.min_available_clients = len(clients)
    from finetune_sdk.federated.runtime import free_port, new_work_dir

    _check_trainer(trainer, config)
    work_dir = new_work_dir()
    try:
        data = normalise_clients(clients, work_dir)
        check_owner_data(trainer, data, config)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    return run_federation(trainer, config, work_dir, port=free_port(), clients=data, resume=resume,
                          timeout=timeout)


def run_server(trainer: Any, config: FederatedSettings, *, host: str, port: int, resume: bool = False,
               insecure: bool = False, tls: dict[str, str | None] | None = None,
               supernode_auth: bool = False, supernode_keys: list[str] | None = None) -> FitResult:
    """``finetune federated server``: a SuperLink on ``host:port`` for clients on other machines, the job run.

    ``supernode_auth`` starts the SuperLink with Flower's SuperNode authentication (TLS required) and
    ``supernode_keys`` are the clients' public keys registered with it before the run (they imply it); see
    :mod:`finetune_sdk.federated.node_auth`."""
    from finetune_sdk.federated.node_auth import check_server_auth
    from finetune_sdk.federated.runtime import new_work_dir

    require_flower()
    supernode_auth = check_server_auth(supernode_auth, supernode_keys or [], insecure, tls)
    _check_trainer(trainer, config)
    return run_federation(trainer, config, new_work_dir(), port=port, host=host, resume=resume, insecure=insecure,
                          tls=tls, supernode_auth=supernode_auth, supernode_keys=supernode_keys,
                          keep_superlink_state=True)


def run_federation(trainer: Any, config: FederatedSettings, work_dir: Path, *, port: int, host: str = "127.0.0.1",
                   clients: dict[str, tuple[Any, ...]] | None = None, resume: bool = False,
                   insecure: bool = True, tls: dict[str, str | None] | None = None, supernode_auth: bool = False,
                   supernode_keys: list[str] | None = None, timeout: float | None = None,
                   keep_superlink_state: bool = False) -> FitResult:
    """Start a SuperLink (and a SuperNode per local client), submit the job, wait for it, stop what was started.

    ``keep_superlink_state`` keeps the SuperLink's state in ``<output_dir>.federated/superlink.db`` until the run
    completes: remote clients outlive a server crash and reconnect to the restarted (``--resume``) server."""
    from finetune_sdk.federated.runtime import FlowerProcesses, node_config, wait_for_run, write_app

    job = _job(trainer, config, sorted(clients or {}), resume)
    processes = FlowerProcesses(work_dir)
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    address = f"{local}:{port}"
    database = job.state_dir / SUPERLINK_DATABASE if keep_superlink_state else None
    try:
        if database is not None:
            database.parent.mkdir(parents=True, exist_ok=True)
        processes.superlink(port, host=host, insecure=insecure, tls=tls, supernode_auth=supernode_auth,
                            database=database)
        for name, (train, evaluation, *rank) in (clients or {}).items():
            processes.supernode(name, address, node_config(name, train, evaluation, *rank), warm=config.warm_clients)
        processes.connect(address, insecure=insecure, root_certificates=(tls or {}).get("ssl_ca_certfile"))
        for key in supernode_keys or []:
            trainer.logger.info("registered SuperNode public key %s (node %s)", key, processes.register_supernode(key))
        processes.submit(write_app(work_dir / "app", job))
        trainer.logger.info("federated run: %s, %d rounds, strategy %s (Flower SuperLink on %s:%d; logs in %s)",
                            f"{len(clients)} local clients" if clients else
                            f"waiting for {config.min_available_clients} clients", config.rounds, config.strategy,
                            host, port, work_dir)
        wait_for_run(job, processes, timeout or config.rounds * config.round_timeout * 2 + 600)
    except BaseException:
        processes.stop()
        trainer.logger.error("federated run stopped; Flower logs kept in %s", work_dir)
        raise
    processes.stop()
    shutil.rmtree(work_dir, ignore_errors=True)
    if database is not None:  # the run completed: nothing left to resume (SQLite's -wal/-shm files included)
        for path in database.parent.glob(SUPERLINK_DATABASE + "*"):
            path.unlink(missing_ok=True)
    return _result(trainer, job)


def _check_trainer(trainer: Any, config: FederatedSettings) -> None:
    trainer.host.create("strategy", config.strategy)
    if trainer.given_model is not None:
        raise ConfigError("fit_federated needs the model as a path or Hub id (each client process loads it), "
                          "not a loaded model object")


def _job(trainer: Any, config: FederatedSettings, clients: list[str], resume: bool) -> FederatedJob:
    options = {k: trainer.options[k] for k in trainer.given_options}
    options["learning_rate"] = trainer.options["learning_rate"]
    options["seed"] = trainer.options["seed"]
    registry = getattr(trainer.registry, "home", None)
    return FederatedJob(
        model=trainer.source.path or trainer.source.id, technique=trainer.technique.name,
        quantizer=trainer.quantizer.name if trainer.quantizer else None,
        formatter=trainer.formatter.name if trainer.formatter else None, options=options, settings=config,
        output_dir=str(Path(trainer.output_dir).resolve()), publish_as=trainer.publish_as,
        registry_home=str(registry) if registry else None, resume=resume, run_token=secrets.token_hex(8),
        expected_clients=clients)


def _result(trainer: Any, job: FederatedJob) -> FitResult:
    from finetune_sdk.training.manifest import read_manifest

    output_dir = Path(trainer.output_dir)
    manifest = read_manifest(output_dir)
    history = manifest["federated"]["history"]
    result = FitResult(output_dir=output_dir, metrics=manifest["metrics"], manifest=manifest, log_history=history)
    refs = [entry["version"] for entry in history if entry.get("version")]
    if refs:
        from finetune_sdk.registry import Registry

        registry = trainer.registry or Registry()
        result.version = registry.resolve(refs[-1])
        trainer.published.append(result.version)
    trainer.use_result(result, history)  # generate / evaluate / compare now use the federated model
    return result

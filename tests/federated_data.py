"""Non-IID client data for the federated tests: each client's rows are about its own invented facts."""

from __future__ import annotations

import json
from pathlib import Path

# Each client knows different invented organisations; questions share one template, answers one shape.
FACTS = {
    "clinic-a": [("Quillmere", "blue"), ("Dovercrest", "green"), ("Ashwick", "red"), ("Bramblefold", "gold")],
    "clinic-b": [("Tindale", "green"), ("Orrinford", "red"), ("Vexley", "gold"), ("Calloway", "blue")],
    "clinic-c": [("Marrowgate", "red"), ("Pellingham", "gold"), ("Sunderhay", "blue"), ("Widdercombe", "green")],
}


def client_rows(name: str) -> list[dict[str, str]]:
    return [{"prompt": f"What colour is the {place} flag?", "completion": f"The {place} flag is {colour}."}
            for place, colour in FACTS[name]]


def held_out_rows(name: str) -> list[dict[str, str]]:
    """The same facts asked in other words: held out from training."""
    return [{"prompt": f"Which colour is the flag of {place}?", "completion": f"The {place} flag is {colour}."}
            for place, colour in FACTS[name]]


def write_clients(folder: Path, names: list[str] | None = None) -> dict[str, dict[str, str]]:
    """``{name: {"train": file, "eval": file}}``: each client's held-out rows ask about its own facts."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names or list(FACTS):
        train, held_out = folder / f"{name}.jsonl", folder / f"{name}-eval.jsonl"
        train.write_text("".join(json.dumps(r) + "\n" for r in client_rows(name)), encoding="utf-8")
        held_out.write_text("".join(json.dumps(r) + "\n" for r in held_out_rows(name)), encoding="utf-8")
        out[name] = {"train": str(train), "eval": str(held_out)}
    return out


def federated_job(model, out, clients, options, **settings):
    """An in-process LoRA/chatml :class:`FederatedJob` over ``clients`` (one round unless ``settings`` say)."""
    from finetune_sdk.federated.job import FederatedJob
    from finetune_sdk.federated.settings import FederatedSettings

    settings.setdefault("rounds", 1)
    config = FederatedSettings(**settings).validate(len(clients))
    return FederatedJob(str(model), "lora", None, "chatml", dict(options), config, str(out),
                        expected_clients=sorted(clients), run_token="test")


def as_pairs(clients):
    """``write_clients``' specs as ``run_in_process`` takes them: name -> (train file, eval file or None)."""
    return {name: (spec["train"], spec.get("eval")) for name, spec in clients.items()}


class SharedFederation:
    """One SuperLink and a warm SuperNode per client (Flower processes, loopback) that several tests' runs share:
    each run is submitted as ``fit_federated`` submits it, so the processes (and each client's imports) start
    once per test module instead of once per run. Every run gets its own run id, hence its own base model in each
    client's cache (see tests/test_federated_warm.py)."""

    def __init__(self, folder: Path, names: list[str]) -> None:
        from finetune_sdk.federated.runtime import FlowerProcesses, free_port, node_config

        self.folder, self.names, self.runs = folder, names, 0
        self.clients = write_clients(folder / "data", names)
        self.processes = FlowerProcesses(folder / "flower")
        port = free_port()
        address = f"127.0.0.1:{port}"
        try:
            self.processes.superlink(port)
            for name, spec in self.clients.items():
                self.processes.supernode(name, address, node_config(name, spec["train"], spec["eval"]), warm=True)
            self.processes.connect(address)
        except BaseException:
            self.processes.stop()
            raise

    def fit(self, trainer, timeout: float = 900, **settings):
        """``trainer.fit_federated(self.clients, **settings)`` on the shared processes; returns its FitResult."""
        from finetune_sdk.federated.api import _check_trainer, _job, _result
        from finetune_sdk.federated.runtime import wait_for_run, write_app
        from finetune_sdk.federated.settings import FederatedSettings

        settings.setdefault("min_fit_clients", len(self.names))
        settings.setdefault("min_available_clients", len(self.names))
        config = FederatedSettings(**settings).validate(num_clients=len(self.names))
        _check_trainer(trainer, config)
        job = _job(trainer, config, sorted(self.names), False)
        self.runs += 1
        self.processes.submit(write_app(self.folder / f"app-{self.runs}", job))
        wait_for_run(job, self.processes, timeout)
        return _result(trainer, job)

    def stop(self) -> None:
        self.processes.stop()

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

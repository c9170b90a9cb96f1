"""The contract every federated strategy passes, builtin or a plugin's (needs ``finetune-sdk[federated]``).

    from finetune_sdk.testing import StrategyContract

    class TestMyStrategy(StrategyContract):
        name = "my-strategy"

The federation runs in one process (:class:`~finetune_sdk.testing.federated.InProcessGrid`) on a tiny model.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import pytest

from finetune_sdk.federated import FederatedSettings, FederatedStrategy
from finetune_sdk.federated.job import FederatedJob
from finetune_sdk.plugin_manager import get_plugin_host
from finetune_sdk.testing.tiny import save_tiny_model

CLIENT_ROWS = {
    "north": [{"prompt": f"where is {p}?", "completion": f"{p} is north."} for p in ("Avel", "Brisk", "Cairn")],
    "south": [{"prompt": f"where is {p}?", "completion": f"{p} is south."} for p in ("Dunmore", "Elm", "Fenwick")],
}


class StrategyContract:
    """Tests every federated strategy passes. Set ``name``; ``settings`` adds strategy-specific settings."""

    name: ClassVar[str]
    settings: ClassVar[dict[str, Any]] = {}

    def strategy(self) -> FederatedStrategy:
        return get_plugin_host().create("strategy", self.name)

    def test_metadata_and_build(self) -> None:
        from flwr.serverapp.strategy import Strategy

        strategy = self.strategy()
        assert isinstance(strategy, FederatedStrategy) and strategy.name == self.name
        assert strategy.description, "describe the strategy in one line (finetune plugins shows it)"
        built = strategy.build(FederatedSettings(**self.settings).validate(num_clients=2))
        assert isinstance(built, Strategy), "build() must return a Flower message-API strategy"

    @pytest.mark.slow
    def test_federated_round_trains_and_saves_a_loadable_adapter(self, tmp_path: Any) -> None:
        import finetune_sdk
        from finetune_sdk.testing.federated import run_in_process

        clients = {}
        for client, rows in CLIENT_ROWS.items():
            path = tmp_path / f"{client}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
            clients[client] = (str(path), str(path))
        model = save_tiny_model(tmp_path / "model")
        settings = FederatedSettings(**{"rounds": 2, "local_steps": 2, **self.settings, "strategy": self.name})
        job = FederatedJob(str(model), "lora", None, "chatml", {"learning_rate": 2e-2, "seed": 0},
                           settings.validate(num_clients=2), str(tmp_path / "out"), expected_clients=sorted(clients))
        manifest = run_in_process(job, clients)
        history = manifest["federated"]["history"]
        assert [entry["round"] for entry in history] == [1, 2]
        assert sorted(history[-1]["clients"]) == sorted(clients)
        before = history[0]["global_eval"]["eval_loss"]  # the round-1 global adapter, evaluated in round 2
        after = manifest["metrics"]["eval_loss"]
        assert after < before, f"held-out loss did not fall: {before:.4f} -> {after:.4f}"
        loaded = finetune_sdk.load(tmp_path / "out")
        assert loaded.evaluate(CLIENT_ROWS["north"])["eval_loss"] < float("inf")

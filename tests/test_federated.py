"""Federated fine-tuning: settings, strategies, what travels, and the server's rounds on an in-process Grid.

The runs with real Flower processes (SuperLink and SuperNodes) are in test_federated_runtime.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("flwr")

from finetune_sdk import Trainer  # noqa: E402
from finetune_sdk.errors import ConfigError, FinetuneError  # noqa: E402
from finetune_sdk.federated.settings import FederatedSettings  # noqa: E402
from tests.federated_data import as_pairs, federated_job, write_clients  # noqa: E402

OPTIONS = {"learning_rate": 5e-3, "seed": 7, "per_device_train_batch_size": 2}


def make_job(model, out, clients, **settings):
    return federated_job(model, out, clients, OPTIONS, **settings)


@pytest.mark.parametrize("settings, message", [
    ({"rounds": 0}, "rounds must be an integer >= 1"),
    ({"fraction_fit": 0}, "fraction_fit must be in (0, 1]"),
    ({"min_fit_clients": 4}, "min_fit_clients=4 but only 3 clients"),
    ({"dp": "server"}, "needs clipping_norm > 0"),
    ({"dp": "local", "clipping_norm": 1.0}, "dp must be None, 'server' or 'client'"),
    ({"local_epochs": 0}, "local_epochs must be > 0"),
    ({"secure_aggregation": True, "dp": "server", "clipping_norm": 1.0}, "only sees the sum of the updates"),
    ({"secure_aggregation": True, "dp": "client", "clipping_norm": 1.0}, "can't be combined with dp='client'"),
    ({"secure_aggregation": True, "strategy": "fedavgm"}, "works with strategies fedavg, fedprox"),
    ({"secure_aggregation": True, "min_fit_clients": 1}, "needs at least 2 clients in every round"),
    ({"secure_aggregation": True, "secagg_num_shares": 2}, "secagg_num_shares as a count must be > 2"),
    ({"secure_aggregation": True, "secagg_quantization_range": 2**40}, "secagg_quantization_range must be"),
])
def test_bad_settings_are_one_line_errors(settings, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        FederatedSettings(**settings).validate(num_clients=3)


def test_fit_federated_checks_before_starting_anything(llama_dir, tmp_path):
    trainer = Trainer(llama_dir, formatter="chatml", output_dir=tmp_path / "out", progress=False)
    clients = write_clients(tmp_path / "data", ["clinic-a"])
    with pytest.raises(ConfigError, match="unknown federated setting 'round'.*did you mean 'rounds'"):
        trainer.fit_federated(clients, round=2)
    with pytest.raises(ConfigError, match="unknown strategy 'fedavgg'.*'fedavg'"):
        trainer.fit_federated(clients, strategy="fedavgg")
    with pytest.raises(FinetuneError, match="no such file"):
        trainer.fit_federated({"clinic-a": str(tmp_path / "missing.jsonl")})
    with pytest.raises(ConfigError, match="client name"):
        trainer.fit_federated({"../a": clients["clinic-a"]["train"]})
    assert not (tmp_path / "out").exists()


def test_missing_flower_names_the_extra(monkeypatch):
    import importlib.util

    from finetune_sdk.federated.settings import require_flower

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flwr" else real(name, *a))
    with pytest.raises(ConfigError, match=r"finetune-sdk\[federated\]"):
        require_flower()


def test_builtin_strategies_build_flower_strategies():
    from flwr.serverapp.strategy import FedAvg, FedProx

    from finetune_sdk.plugin_manager import get_plugin_host

    host = get_plugin_host()
    assert {"fedavg", "fedprox"} <= set(host.names("strategy"))
    settings = FederatedSettings(fraction_fit=0.5, min_fit_clients=2, proximal_mu=0.1).validate(4)
    fedavg = host.create("strategy", "fedavg").build(settings)
    fedprox = host.create("strategy", "fedprox").build(settings)
    assert type(fedavg) is FedAvg and fedavg.fraction_train == 0.5 and fedavg.min_train_nodes == 2
    assert isinstance(fedprox, FedProx) and fedprox.proximal_mu == 0.1


def test_qlora_sends_only_the_adapter_and_bytes_match_its_size(tiny_models):
    from finetune_sdk.federated.params import NPY_HEADER_BYTES, payload_bytes, raw_bytes, trainable_arrays

    model_dir = tiny_models("llama", hidden_size=64)
    trainer = Trainer(model_dir, technique="qlora", formatter="chatml", progress=False, r=4)
    session = trainer.current_model()
    model = trainer.technique.prepare(session.model, trainer.options, session.tokenizer)
    record = trainable_arrays(model)
    assert record.keys() and all("lora_" in name for name in record.keys())
    adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert raw_bytes(model) == adapter * 4
    assert raw_bytes(model) <= payload_bytes(record) <= raw_bytes(model) + NPY_HEADER_BYTES * len(record.keys())
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and not set(frozen) & set(record.keys()), "the 4-bit base never travels"


def test_one_client_one_round_fedavg_equals_local_fit(llama_dir, tmp_path):
    """Acceptance: 1 client, FedAvg, 1 round = a local fit with the same seed and steps (within 1e-5)."""
    import torch

    import finetune_sdk
    from finetune_sdk.federated.params import trainable_arrays
    from finetune_sdk.testing.federated import run_in_process

    clients = write_clients(tmp_path / "data", ["clinic-a"])
    manifest = run_in_process(make_job(llama_dir, tmp_path / "fed", clients, local_steps=3), as_pairs(clients))
    assert manifest["federated"]["history"][0]["clients"]["clinic-a"]["train_steps"] == 3

    local = Trainer(llama_dir, formatter="chatml", output_dir=tmp_path / "local", progress=False, max_steps=3,
                    save_steps=0, **OPTIONS)
    local.fit(clients["clinic-a"]["train"])
    expected = trainable_arrays(local.current_model().model)
    loaded = finetune_sdk.load(tmp_path / "fed")
    for param in loaded.model.parameters():  # loaded for inference: mark the adapter as the trainable part
        param.requires_grad = False
    for name, param in loaded.model.named_parameters():
        param.requires_grad = "lora_" in name
    actual = trainable_arrays(loaded.model)
    assert set(actual.keys()) == set(expected.keys())
    for name in expected.keys():
        assert np.allclose(actual[name].numpy(), expected[name].numpy(), atol=1e-5), name
    changed = max(float(np.abs(expected[n].numpy()).max()) for n in expected.keys() if "lora_B" in n)
    assert changed > 0, "training must have moved the adapter for the comparison to mean something"
    assert torch.is_tensor(loaded.model.get_input_embeddings().weight)


@pytest.mark.slow
def test_dropped_client_is_reported_and_min_fit_clients_enforced(llama_dir, tmp_path):
    from finetune_sdk.testing.federated import run_in_process

    clients = as_pairs(write_clients(tmp_path / "data"))
    manifest = run_in_process(make_job(llama_dir, tmp_path / "out", clients, local_steps=1, min_fit_clients=2),
                              clients, failing=["clinic-c"])
    round_1 = manifest["federated"]["history"][0]
    assert sorted(round_1["clients"]) == ["clinic-a", "clinic-b"]
    assert len(round_1["dropped"]) == 1 and "disconnected" in round_1["dropped"][0]
    with pytest.raises(FinetuneError, match="round 1: only 1 of 3 sampled clients reported"):
        run_in_process(make_job(llama_dir, tmp_path / "out2", clients, local_steps=1, min_fit_clients=2),
                       clients, failing=["clinic-b", "clinic-c"])
    assert not (tmp_path / "out2").exists()


@pytest.mark.slow
def test_client_side_dp_clips_updates_and_records_privacy(llama_dir, tmp_path):
    """Acceptance: with noise on, the privacy parameters are in the manifest and each update is clipped."""
    from finetune_sdk.testing.federated import run_in_process

    clients = as_pairs(write_clients(tmp_path / "data", ["clinic-a", "clinic-b"]))
    manifest = run_in_process(make_job(llama_dir, tmp_path / "out", clients, rounds=2, local_steps=2, dp="client",
                                       clipping_norm=0.01, noise_multiplier=0.5), clients)
    privacy = manifest["federated"]["privacy"]
    assert privacy["mode"] == "client" and privacy["noise_multiplier"] == 0.5 and privacy["clipping_norm"] == 0.01
    assert privacy["delta"] == 1e-5 and privacy["releases"] == 2 and 0 < privacy["epsilon"] < float("inf")
    for entry in manifest["federated"]["history"]:
        for client in entry["clients"].values():
            assert client["update_norm"] == pytest.approx(0.01, rel=1e-3)  # clipped to the norm, not below


@pytest.mark.slow
def test_server_side_clipping_bounds_the_global_update(llama_dir, tmp_path):
    from finetune_sdk.testing.federated import run_in_process

    clients = as_pairs(write_clients(tmp_path / "data", ["clinic-a", "clinic-b"]))
    manifest = run_in_process(make_job(llama_dir, tmp_path / "out", clients, local_steps=2, dp="server",
                                       clipping_norm=0.01, noise_multiplier=0.0), clients)
    privacy = manifest["federated"]["privacy"]
    assert privacy["mode"] == "server" and privacy["epsilon"] is None and "no noise" in privacy["note"]
    entry = manifest["federated"]["history"][0]
    assert min(c["update_norm"] for c in entry["clients"].values()) > 0.01  # what the clients sent: unclipped
    assert entry["global_update_norm"] <= 0.01 + 1e-6  # the average of updates clipped to 0.01


def test_fedprox_term_adds_mu_times_distance_to_the_gradient():
    import torch

    from finetune_sdk.federated.client_training import _add_proximal_term

    layer = torch.nn.Linear(3, 1, bias=False)
    handles = _add_proximal_term(layer, mu=0.5)
    with torch.no_grad():
        layer.weight += 2.0  # w - w_global = 2 everywhere
    layer(torch.zeros(1, 3)).sum().backward()  # the data gradient is 0 for a zero input
    assert torch.allclose(layer.weight.grad, torch.full((1, 3), 1.0))
    for handle in handles:
        handle.remove()


def test_fedprox_term_is_added_once_per_optimizer_step_whatever_its_micro_batches(llama_dir, tmp_path):
    """Batch 4 and batch 1 x 4 micro-batches on 7 rows (steps of 4 and 3 micro-batches) train the same weights
    under FedProx: the proximal term is the bigger batch's in the shorter last step too (it was 3/4 of it: weights
    7.9e-3 apart, 1.9e-8 now)."""
    import torch

    from finetune_sdk.federated.client_training import _add_proximal_term

    rows = [{"messages": [{"role": "user", "content": f"what is {w}?"},
                          {"role": "assistant", "content": f"{w} is a word" + "." * (i % 3)}]}
            for i, w in enumerate(["red", "cat", "blue", "dog", "fish", "green", "bird"])]
    trained = {}
    for batch, accumulation in ((4, 1), (1, 4)):
        trainer = Trainer(llama_dir, technique="lora", formatter="chatml", output_dir=tmp_path / f"out-{batch}",
                          progress=False, seed=3, dtype="float32", optim="sgd", learning_rate=0.5,
                          lora_dropout=0.0, num_train_epochs=1, max_grad_norm=0.0,
                          per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation)
        session = trainer.current_model()
        torch.manual_seed(0)  # the same LoRA initialisation in both runs
        session.model = trainer.technique.prepare(session.model, trainer.options, session.tokenizer)
        handles = _add_proximal_term(session.model, mu=2.0)
        with torch.no_grad():  # start away from the global weights, so the term is large from the first step
            for param in session.model.parameters():
                if param.requires_grad:
                    param += 0.05
        try:
            trainer.fit(rows)
        finally:
            for handle in handles:
                handle.remove()
        trained[batch] = {n: p.detach().clone() for n, p in session.model.named_parameters() if p.requires_grad}
    for name, weight in trained[4].items():
        assert torch.allclose(weight, trained[1][name], rtol=1e-4, atol=1e-6), name


@pytest.mark.slow
def test_every_round_is_a_registry_version_with_lineage(llama_dir, tmp_path):
    from finetune_sdk.registry import Registry
    from finetune_sdk.testing.federated import run_in_process

    clients = as_pairs(write_clients(tmp_path / "data", ["clinic-a", "clinic-b"]))
    job = make_job(llama_dir, tmp_path / "out", clients, rounds=2, local_steps=1)
    job.publish_as, job.registry_home = "fed-bot", str(tmp_path / "registry")
    run_in_process(job, clients)
    registry = Registry(tmp_path / "registry")
    v1, v2 = registry.resolve("fed-bot@1"), registry.resolve("fed-bot@2")
    assert v2.parent == v1.ref and v1.parent is None
    assert "round=2" in v2.tags and "strategy=fedavg" in v2.tags and "clients=clinic-a:4,clinic-b:4" in v2.tags
    manifest = json.loads((registry.path("fed-bot@2") / "finetune_manifest.json").read_text())
    assert manifest["federated"]["round"] == 2 and manifest["federated"]["clients"]["clinic-a"]["examples"] == 4
    assert "Quillmere" not in json.dumps(manifest), "no client data in what the server stores"


def _strategy_contracts():
    from finetune_sdk.plugin_manager import PluginHost
    from finetune_sdk.testing import StrategyContract

    for name in PluginHost(autoload=False).names("strategy"):
        settings = {"proximal_mu": 0.01} if name == "fedprox" else {}
        cls = type(f"TestStrategyContract_{name}", (StrategyContract,), {"name": name, "settings": settings})
        yield cls.__name__, cls


for _name, _cls in _strategy_contracts():
    globals()[_name] = _cls


def test_strategy_plugin_registers_through_the_hook(monkeypatch):
    import sys
    import types

    import finetune_sdk
    from finetune_sdk import plugin_manager
    from finetune_sdk.federated import FederatedStrategy
    from finetune_sdk.plugin_manager import PluginHost

    class FedAvgM(FederatedStrategy):
        name = "fedavgm"
        description = "FedAvg with server momentum (Hsu et al., 2019)"

        def build(self, settings):
            from flwr.serverapp.strategy import FedAvgM as Flower

            return Flower(**self.sampling(settings), server_momentum=0.9)

    module = types.ModuleType("finetune_sdk_fedavgm")
    module.register_federated_strategies = finetune_sdk.hookimpl(lambda register: register(FedAvgM))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    entry_point = types.SimpleNamespace(name="fedavgm", load=lambda: module,
                                        dist=types.SimpleNamespace(name="finetune-sdk-fedavgm"))
    monkeypatch.setattr(plugin_manager, "discover_entry_points", lambda: [entry_point])
    host = PluginHost(autoload=True)
    assert "fedavgm" in host.names("strategy")
    assert type(host.create("strategy", "fedavgm").build(FederatedSettings().validate())).__name__ == "FedAvgM"


@pytest.mark.slow
def test_fraction_fit_samples_part_of_the_clients_each_round(llama_dir, tmp_path):
    from finetune_sdk.testing.federated import run_in_process

    clients = as_pairs(write_clients(tmp_path / "data"))
    manifest = run_in_process(make_job(llama_dir, tmp_path / "out", clients, rounds=2, local_steps=1,
                                       fraction_fit=0.34, fraction_evaluate=0), clients)
    for entry in manifest["federated"]["history"]:
        assert entry["sampled"] == 1 and len(entry["clients"]) == 1 and entry["dropped"] == []
    assert manifest["metrics"]["bytes_total"] == sum(e["bytes_total"] for e in manifest["federated"]["history"])


def test_checkpoint_is_replaced_every_round_and_foreign_files_are_refused(tmp_path):
    from flwr.app import Array, ArrayRecord

    from finetune_sdk.federated.server_state import load_checkpoint, save_checkpoint

    for server_round in (1, 2):
        arrays = ArrayRecord({"w": Array(np.full(3, float(server_round), dtype=np.float32))})
        save_checkpoint(tmp_path, arrays, {}, {"round": server_round, "array_names": ["w"]})
    arrays, state, _ = load_checkpoint(tmp_path)
    assert state["round"] == 2 and arrays["w"].numpy().tolist() == [2.0, 2.0, 2.0]
    (tmp_path / "checkpoint" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds files a federated checkpoint doesn't"):
        save_checkpoint(tmp_path, arrays, {}, {"round": 3, "array_names": ["w"]})
    assert (tmp_path / "checkpoint" / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_secure_aggregation_equals_weighted_fedavg_within_the_quantization_bound(llama_dir, tmp_path):
    """SecAgg+ (Flower's SecAggPlusWorkflow + secaggplus_mod): the new global adapter is FedAvg's example-weighted
    mean within the stated quantization bound, and the server never receives a client's parameters, only masked
    integer vectors."""
    from flwr.common import bytes_to_ndarray
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    from finetune_sdk.federated.rounds import FederatedServer
    from finetune_sdk.federated.secure_aggregation import quantization_error_bound
    from finetune_sdk.testing.federated import InProcessGrid

    clients = write_clients(tmp_path / "data", ["clinic-a", "clinic-b"])
    with open(clients["clinic-b"]["train"], encoding="utf-8") as handle:
        rows = handle.read()
    with open(clients["clinic-b"]["train"], "a", encoding="utf-8") as handle:
        handle.write(rows)  # clinic-b has twice clinic-a's examples: weighting matters
    clients = as_pairs(clients)

    def run(name, **settings):
        job = make_job(llama_dir, tmp_path / name, clients, local_steps=2, fraction_evaluate=0, **settings)
        grid = InProcessGrid(clients, job.to_run_config())
        server = FederatedServer(job, grid)
        manifest = server.run()
        return server.arrays, grid, manifest

    plain, plain_grid, _ = run("plain")
    secure, secure_grid, manifest = run("secure", secure_aggregation=True)

    local = [reply.content["arrays"] for reply in plain_grid.replies if "arrays" in reply.content]
    examples = [int(reply.content["metrics"]["num-examples"]) for reply in plain_grid.replies
                if "arrays" in reply.content]
    assert sorted(examples) == [4, 8]
    entry = manifest["federated"]["history"][0]
    settings = FederatedSettings(secure_aggregation=True)
    bound = quantization_error_bound(examples, settings)
    assert entry["secure_aggregation"]["max_quantization_error"] == pytest.approx(bound)
    assert 0 < bound < 1e-3
    worst_weighted = worst_unweighted = 0.0
    for name in plain.keys():
        unweighted = (local[0][name].numpy() + local[1][name].numpy()) / 2
        worst_weighted = max(worst_weighted, float(np.abs(secure[name].numpy() - plain[name].numpy()).max()))
        worst_unweighted = max(worst_unweighted, float(np.abs(secure[name].numpy() - unweighted).max()))
    assert worst_weighted <= bound + 1e-6  # FedAvg's weighted mean, within the quantization bound
    assert worst_unweighted > 10 * bound  # and not the unweighted one: the example weights went through SecAgg+

    masked_vectors = 0
    for reply in secure_grid.replies:
        assert all(len(record) == 0 for record in reply.content.array_records.values()), "parameters in clear"
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS, {})
        if Key.MASKED_PARAMETERS in configs:
            vector = [bytes_to_ndarray(b) for b in configs[Key.MASKED_PARAMETERS]]
            assert all(v.dtype.kind in "iu" for v in vector)  # integers, not float parameters
            assert max(int(v.max()) for v in vector if v.size) > settings.secagg_quantization_range  # masked
            masked_vectors += 1
    assert masked_vectors == 2
    record = manifest["federated"]["secure_aggregation"]
    assert record["quantization_range"] == 2**22 and record["clipping_range"] == 1.0
    for client in entry["clients"].values():
        assert "update_norm" not in client and client["bytes_sent"] > 0 and client["train_steps"] == 2

    # a weighted update beyond the clipping range is refused by the client, never clipped silently
    with pytest.raises(FinetuneError, match="secure aggregation halted.*ValueError: raise secagg_clipping_range"):
        run("too-small-range", secure_aggregation=True, secagg_clipping_range=1e-9)

"""Clients that keep the base model loaded across rounds (``warm_clients=True``, the default): one long-lived
ClientApp process per SuperNode (:mod:`finetune_sdk.federated.warm_client`) whose rounds give exactly what fresh
processes give, and whose cache never carries anything from one run into another."""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("flwr")

import finetune_sdk  # noqa: E402
from finetune_sdk import Trainer  # noqa: E402
from finetune_sdk.federated import warm_client  # noqa: E402
from finetune_sdk.federated.audit import AUDIT_ENV, opened_paths  # noqa: E402
from finetune_sdk.federated.warm_client import BaseModelCache  # noqa: E402
from tests.federated_data import as_pairs, write_clients  # noqa: E402

OPTIONS = {"learning_rate": 3e-2, "seed": 7, "per_device_train_batch_size": 2}


def trainer_for(model, out, **options):
    return Trainer(model, formatter="chatml", output_dir=out, progress=False, **{**OPTIONS, **options})


def state(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def test_cache_hands_out_copies_loads_once_per_run_and_forgets_another_runs_models():
    loads = []
    cache = BaseModelCache()
    cache.start_run(1)
    first = cache.get("base", lambda: loads.append(1) or {"w": [0.0]})
    first["w"][0] = 5.0  # a round changes its copy
    assert cache.get("base", lambda: loads.append(1) or {"w": [0.0]}) == {"w": [0.0]}
    assert len(loads) == 1 and cache.loads == 1
    cache.start_run(1)
    cache.get("base", lambda: loads.append(1) or {"w": [0.0]})
    assert len(loads) == 1  # same run: still cached
    cache.start_run(2)
    assert cache.models == {}
    cache.get("base", lambda: loads.append(1) or {"w": [1.0]})
    assert len(loads) == 2 and cache.run_id == 2


def test_a_cached_load_equals_a_fresh_load_after_a_round_changed_its_copy(llama_dir, tmp_path, monkeypatch):
    """The trainer's base model from the cache is bit-identical to a fresh load, also after the previous round's
    copy got an adapter, a folded base delta and trained weights."""
    import torch

    fresh = state(trainer_for(llama_dir, tmp_path / "fresh").current_model().model)
    cache = BaseModelCache()
    cache.start_run(1)
    monkeypatch.setattr(warm_client, "ACTIVE_CACHE", cache)
    round_one = trainer_for(llama_dir, tmp_path / "r1", max_steps=1, save_steps=0)
    model = round_one.current_model().model
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)  # what a folded FedEx-LoRA delta or training would do to a shared model
    round_two = trainer_for(llama_dir, tmp_path / "r2").current_model().model
    assert cache.loads == 1 and round_two is not model
    again = state(round_two)
    assert again.keys() == fresh.keys()
    for name, tensor in fresh.items():
        assert torch.equal(again[name], tensor), name


def test_a_cached_4bit_base_equals_a_fresh_load_and_trains_the_same(llama_dir, tmp_path, monkeypatch, qa_rows):
    """QLoRA (the nf4 quantizer) in the warm cache: the cached 4-bit base is copied like any other; a round that
    trained its copy leaves the next copy bit-identical to a fresh 4-bit load (packed weights and quantization
    state), with bitsandbytes' CPU repack switched off on every copy (ENV_FACTS: gradients through a repacked layer
    are wrong), and training a copy gives the fresh load's losses."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    import torch

    def fit(out):
        return trainer_for(llama_dir, out, technique="qlora", max_steps=2, save_steps=0).fit(qa_rows)

    fresh_model = trainer_for(llama_dir, tmp_path / "fresh", technique="qlora").current_model().model
    fresh = state(fresh_model)
    fresh_fit = fit(tmp_path / "fresh-fit")
    cache = BaseModelCache()
    cache.start_run(1)
    monkeypatch.setattr(warm_client, "ACTIVE_CACHE", cache)
    first = fit(tmp_path / "round-1")  # trains the first copy
    again = trainer_for(llama_dir, tmp_path / "round-2", technique="qlora").current_model().model
    assert cache.loads == 1
    layers = [m for m in again.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(layer.weight.dtype == torch.uint8 for layer in layers)  # still packed 4-bit
    assert all(layer.support_avx512bf16_for_cpu is False for layer in layers)
    copied = state(again)
    assert copied.keys() == fresh.keys()
    for name, tensor in fresh.items():
        assert torch.equal(copied[name], tensor), name
    second = fit(tmp_path / "round-3")  # a copy of the cached base after a trained one
    assert cache.loads == 1
    for result in (first, second):
        assert result.metrics["train_loss"] == pytest.approx(fresh_fit.metrics["train_loss"], abs=1e-6)


def _global_arrays(output_dir):
    from finetune_sdk.federated.params import trainable_arrays

    loaded = finetune_sdk.load(output_dir).model
    for name, param in loaded.named_parameters():
        param.requires_grad = "lora_" in name
    return trainable_arrays(loaded)


def _assert_same_arrays(actual, expected, atol=1e-6):
    import numpy as np

    assert list(actual.keys()) == list(expected.keys())
    for name in expected.keys():
        assert np.allclose(actual[name].numpy(), expected[name].numpy(), atol=atol, rtol=0), name


@pytest.mark.slow
def test_warm_clients_give_the_fresh_process_result_in_one_process_per_client(llama_dir, tmp_path, monkeypatch):
    """2 clients x 2 rounds with FedEx-LoRA (a base delta folded into the model every round: what a shared cached
    model would accumulate): the global adapter and every round's losses equal the fresh-process run's
    (``warm_clients=False``: Flower's new process per message, the cold path); each warm client (the default) ran
    all its messages in one process."""
    clients = write_clients(tmp_path / "data", ["clinic-a", "clinic-b"])
    settings = {"rounds": 2, "local_steps": 2, "aggregation": "fedex", "round_timeout": 300}
    monkeypatch.setenv(AUDIT_ENV, str(tmp_path / "audit-fresh"))
    fresh = trainer_for(llama_dir, tmp_path / "fresh").fit_federated(clients, warm_clients=False, **settings)
    for name in clients:  # the cold path: a ClientApp process per message (2 train rounds + evaluation)
        assert len(opened_paths(tmp_path / "audit-fresh", f"client-{name}")) == 3
    monkeypatch.setenv(AUDIT_ENV, str(tmp_path / "audit"))
    warm = trainer_for(llama_dir, tmp_path / "warm").fit_federated(clients, **settings)

    _assert_same_arrays(_global_arrays(warm.output_dir), _global_arrays(fresh.output_dir))
    for fresh_round, warm_round in zip(fresh.manifest["federated"]["history"], warm.manifest["federated"]["history"],
                                       strict=True):
        for name in clients:
            for key in ("train_loss", "global_eval_loss_before", "eval_loss"):
                assert warm_round["clients"][name][key] == pytest.approx(fresh_round["clients"][name][key],
                                                                         abs=1e-6), (name, key)
    for name in clients:
        assert len(opened_paths(tmp_path / "audit", f"client-{name}")) == 1  # 2 train rounds + evaluation


@pytest.mark.slow
def test_a_second_run_on_the_same_warm_node_sees_nothing_of_the_first(llama_dir, tiny_models, tmp_path):
    """One SuperLink and one warm SuperNode serve two runs in turn (as ``finetune federated client`` does): the
    first a QLoRA run on another model (hidden 128, 4-bit base) with another seed and learning rate, the
    second a LoRA run on ``llama_dir``; the second equals the same run alone in a clean process (the in-process
    federation, whose equality with real processes tests/test_federated.py checks), and the executor loaded
    one base per run (its own model, never the first run's cached or trained one)."""
    pytest.importorskip("bitsandbytes")
    import re

    from finetune_sdk.federated.api import _job
    from finetune_sdk.federated.runtime import FlowerProcesses, free_port, node_config, wait_for_run, write_app
    from finetune_sdk.federated.settings import FederatedSettings
    from finetune_sdk.testing.federated import run_in_process

    other_model = tiny_models("llama", hidden_size=128)
    clients = write_clients(tmp_path / "data", ["clinic-a"])
    spec = clients["clinic-a"]
    second_settings = {"rounds": 2, "local_steps": 2, "round_timeout": 300, "min_fit_clients": 1,
                       "min_available_clients": 1}
    # the reference: the second run alone, with its server and client in this (clean) process
    run_in_process(_job(trainer_for(llama_dir, tmp_path / "fresh"), FederatedSettings(**copy.deepcopy(
        second_settings)).validate(num_clients=1), ["clinic-a"], False), as_pairs(clients))

    processes = FlowerProcesses(tmp_path / "flower")
    port = free_port()
    address = f"127.0.0.1:{port}"
    try:
        processes.superlink(port)
        processes.supernode("clinic-a", address, node_config("clinic-a", spec["train"], spec["eval"]), warm=True)
        processes.connect(address)
        runs = [(trainer_for(other_model, tmp_path / "first", technique="qlora", seed=3, learning_rate=1e-1),
                 FederatedSettings(**copy.deepcopy(second_settings))),
                (trainer_for(llama_dir, tmp_path / "second"), FederatedSettings(**copy.deepcopy(second_settings)))]
        for index, (trainer, settings) in enumerate(runs):
            job = _job(trainer, settings.validate(num_clients=1), ["clinic-a"], False)
            processes.submit(write_app(tmp_path / f"app-{index}", job))
            wait_for_run(job, processes, 900)
        assert processes.alive("clientapp-clinic-a")  # the same executor served both runs
        log = processes.log_tail("clientapp-clinic-a", 1_000_000)
    finally:
        processes.stop()
    _assert_same_arrays(_global_arrays(tmp_path / "second"), _global_arrays(tmp_path / "fresh"))
    loads = re.findall(r"base model loaded for run (\d+) \(load \d+\): (\S+)", log)
    assert [model for _, model in loads] == [str(other_model), str(llama_dir)], log[-3000:]
    assert loads[0][0] != loads[1][0]  # one load per run: 2 rounds + evaluation of a run share it


def test_run_task_leaves_sys_path_as_it_found_it(monkeypatch, tmp_path):
    """Flower's app loader puts each run's installed app folder first on ``sys.path``; the long-lived executor
    restores ``sys.path`` after every task, so repeated runs don't grow it (nor shadow each other's imports)."""
    import sys

    from flwr.supercore.object_ref import _ensure_sys_path

    before = list(sys.path)
    runs = iter(range(5))

    def a_task(address, token, cache, stale_after):  # what get_load_client_app_fn does with a new run's app folder
        _ensure_sys_path(tmp_path / f"app-of-run-{next(runs)}")

    monkeypatch.setattr(warm_client, "_run_task", a_task)
    for _ in range(5):
        warm_client.run_task("127.0.0.1:1", "token", BaseModelCache())
    assert sys.path == before


def test_a_task_whose_message_never_arrives_is_given_up_and_a_slow_one_is_not():
    """Flower's SuperNode can leave a task whose message it dropped (its run stopped, e.g. a SuperLink restarted on
    its database): the objects never arrive. With Flower's own pull (up to 2 hours) the long-lived executor would
    wait on it and strand every later task; through ``ProgressWatchedClient`` the pull fails once nothing arrived for
    ``stale_after`` seconds, while a message whose objects keep arriving, however slowly, is pulled whole."""
    import time
    from types import SimpleNamespace

    from flwr.proto.message_pb2 import PullObjectResponse
    from flwr.proto.node_pb2 import Node
    from flwr.supercore.inflatable.inflatable_protobuf_utils import make_pull_object_fn_protobuf
    from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, pull_objects

    def pulled_through(pull_object, stale_after):  # Flower's pull function over the watched Runtime API client
        watched = warm_client.ProgressWatchedClient(SimpleNamespace(PullObject=pull_object), stale_after)
        return make_pull_object_fn_protobuf(watched.PullObject, Node(node_id=1), 1)

    def dropped(request):
        return PullObjectResponse(object_found=True, object_available=False)

    started = time.monotonic()
    with pytest.raises(ObjectPullError, match="no object of the message arrived for 0 s"):
        pull_objects(["a", "b"], pulled_through(dropped, 0.3), initial_backoff=0.05, backoff_cap=0.1)
    assert time.monotonic() - started < 5  # Flower's default: PULL_MAX_TIME (7200 s)

    arrivals = {name: time.monotonic() + 0.15 * (index + 1) for index, name in enumerate("abcdef")}

    def slow(request):  # one object every 0.15 s: 0.9 s in all, more than stale_after, never 0.3 s without one
        if time.monotonic() < arrivals[request.object_id]:
            return PullObjectResponse(object_found=True, object_available=False)
        return PullObjectResponse(object_found=True, object_available=True,
                                  object_content=request.object_id.encode())

    pulled = pull_objects(list(arrivals), pulled_through(slow, 0.3), initial_backoff=0.02, backoff_cap=0.02,
                          max_concurrent_pulls=1)
    assert pulled == {name: name.encode() for name in arrivals}


def test_the_stale_task_limit_comes_from_the_environment_and_a_bad_value_is_one_line(monkeypatch, tmp_path):
    from finetune_sdk.errors import FinetuneError
    from finetune_sdk.federated.runtime import FlowerProcesses

    monkeypatch.delenv(warm_client.STALE_TASK_VARIABLE, raising=False)
    assert warm_client.stale_task_seconds() == warm_client.STALE_TASK_SECONDS == 60.0
    monkeypatch.setenv(warm_client.STALE_TASK_VARIABLE, "12.5")
    assert warm_client.stale_task_seconds() == 12.5
    for bad in ("0", "-3", "soon", "nan", "inf"):
        monkeypatch.setenv(warm_client.STALE_TASK_VARIABLE, bad)
        with pytest.raises(FinetuneError, match=f"FINETUNE_SDK_STALE_TASK_SECONDS='{bad}' is not a positive number"):
            warm_client.stale_task_seconds()
    processes = FlowerProcesses(tmp_path / "flower")  # a warm SuperNode checks it before any process starts
    with pytest.raises(FinetuneError, match="FINETUNE_SDK_STALE_TASK_SECONDS='inf'"):
        processes.supernode("clinic-a", "127.0.0.1:1", "client-name=\"clinic-a\"", warm=True)
    assert processes.processes == {}

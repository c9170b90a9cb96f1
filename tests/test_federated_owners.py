"""Issue 29: never fewer owners than asked, silently; LoRA-aware aggregation (FFA-LoRA) measured against FedAvg of
the factors; Flower's server optimizers and robust aggregators by name.

In-process federations (:func:`finetune_sdk.testing.federated.run_in_process`) share one module fixture; the only
real process here is the CLI client's (its scratch folder on SIGTERM).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("flwr")

from finetune_sdk import Trainer  # noqa: E402
from finetune_sdk.errors import ConfigError, DataError  # noqa: E402
from finetune_sdk.federated.job import FederatedJob  # noqa: E402
from finetune_sdk.federated.settings import FederatedSettings  # noqa: E402
from tests.federated_data import as_pairs, federated_job, write_clients  # noqa: E402

OPTIONS = {"learning_rate": 5e-2, "seed": 7, "per_device_train_batch_size": 2}


def make_job(model, out, clients, **settings):
    return federated_job(model, out, clients, OPTIONS, **settings)


# -- 5. never fewer owners than asked, silently -------------------------------------------------------------------
def test_a_malformed_owner_file_stops_the_run_before_round_1_naming_owner_file_and_line(llama_dir, tmp_path):
    clients = write_clients(tmp_path / "data")
    bad = tmp_path / "data" / "clinic-c.jsonl"
    lines = bad.read_text(encoding="utf-8").splitlines()
    bad.write_text("\n".join(lines[:2] + ['{"prompt": "cut off', *lines[2:]]) + "\n", encoding="utf-8")
    trainer = Trainer(llama_dir, formatter="chatml", output_dir=tmp_path / "out", progress=False)
    with pytest.raises(DataError) as caught:
        trainer.fit_federated(clients, rounds=1)
    message = str(caught.value)
    assert message.startswith("owner 'clinic-c': ") and str(bad) in message and "line 3" in message
    assert "\n" not in message
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.federated").exists()

    missing = write_clients(tmp_path / "data2")  # a row without the formatter's columns: named by its line too
    (tmp_path / "data2" / "clinic-b.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"question": "x"}\n',
                                                       encoding="utf-8")
    with pytest.raises(DataError, match=r"^owner 'clinic-b': .*clinic-b\.jsonl.*2"):
        trainer.fit_federated(missing, rounds=1)


def test_min_fit_clients_defaults_to_every_sampled_owner(llama_dir, tmp_path, monkeypatch):
    from finetune_sdk.federated import api

    seen = {}

    def capture(trainer, config, work_dir, **kwargs):
        seen["config"] = config
        raise KeyboardInterrupt  # stop before any Flower process starts

    monkeypatch.setattr(api, "run_federation", capture)
    trainer = Trainer(llama_dir, formatter="chatml", output_dir=tmp_path / "out", progress=False)
    clients = write_clients(tmp_path / "data")
    for settings, expected in (({}, 3), ({"fraction_fit": 0.5}, 1), ({"fraction_fit": 0.7}, 2),
                               ({"min_fit_clients": 1}, 1)):
        with pytest.raises(KeyboardInterrupt):
            trainer.fit_federated(clients, **settings)
        assert seen["config"].min_fit_clients == expected, settings


def test_an_owner_failing_mid_run_is_dropped_by_name_with_its_whole_reason(llama_dir, tmp_path):
    from finetune_sdk.testing.federated import run_in_process

    clients = as_pairs(write_clients(tmp_path / "data"))
    long_name = tmp_path / ("a-folder-whose-name-makes-the-message-longer-than-120-characters-" * 2) / "c.jsonl"
    long_name.parent.mkdir()
    long_name.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": oops}\n', encoding="utf-8")
    clients["clinic-c"] = (str(long_name), None)
    manifest = run_in_process(make_job(llama_dir, tmp_path / "out", clients, local_steps=1, min_fit_clients=2),
                              clients)
    entry = manifest["federated"]["history"][0]
    [dropped] = entry["dropped"]
    assert dropped.startswith("clinic-c (DataError: ") and str(long_name) in dropped and "line 2" in dropped
    assert len(dropped) > 200 and "\n" not in dropped
    assert entry["owners"] == 2 and manifest["metrics"]["owners_per_round"] == [2]
    assert manifest["metrics"]["owners_min"] == 2
    for client in entry["clients"].values():  # the round's cost per client (no ClientApp process here)
        assert client["load_seconds"] > 0 and client["train_seconds"] > 0 and "startup_seconds" not in client


def test_flowers_error_reason_still_names_the_owner():
    """Flower's runtime wraps a ClientApp's exception as ``<class '...'>:<'TEXT'>`` (run_clientapp.py)."""
    from finetune_sdk.federated.client_app import OwnerError, owner_error_reason
    from finetune_sdk.federated.rounds import owner_and_reason

    ex = OwnerError(owner_error_reason("clinic-b", DataError("/data/b.jsonl line 7: not JSON (Expecting ',')\n"
                                                             "fix the line")))
    reason = str(type(ex)) + ":<'" + str(ex) + "'>"
    assert owner_and_reason(reason) == ("clinic-b", "DataError: /data/b.jsonl line 7: not JSON (Expecting ',') "
                                                    "fix the line")
    assert owner_and_reason("node went away\nmore") == (None, "node went away")


def test_cli_client_removes_its_scratch_folder_on_sigterm(tmp_path):
    import psutil

    from finetune_sdk.federated.runtime import free_port

    data = tmp_path / "a.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n', encoding="utf-8")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    client = subprocess.Popen([sys.executable, "-m", "finetune_sdk", "federated", "client", "--server",
                               f"127.0.0.1:{free_port()}", "--insecure", "--data", str(data)],
                              env={**os.environ, "TMPDIR": str(scratch)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not any("flower-supernode" in " ".join(c.cmdline())
                                                 for c in psutil.Process(client.pid).children()):
            time.sleep(0.2)  # until its SuperNode runs
        assert list(scratch.glob("finetune-federated-client-*/flwr-home")), "no scratch folder while it runs"
        client.send_signal(signal.SIGTERM)
        client.wait(60)
    finally:
        if client.poll() is None:
            client.kill()
    assert list(scratch.glob("finetune-federated-client-*")) == []


# -- 1. LoRA-aware aggregation ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_aggregations(tiny_models, tmp_path_factory):
    """One round of 2 non-IID owners with FedAvg of the factors and with FFA-LoRA (same seeds and data)."""
    from finetune_sdk.testing.federated import run_in_process

    model = tiny_models("llama")
    tmp = tmp_path_factory.mktemp("aggregation")
    clients = as_pairs(write_clients(tmp / "data", ["clinic-a", "clinic-b"]))
    runs = {name: run_in_process(make_job(model, tmp / name, clients, local_steps=3, aggregation=name,
                                          fraction_evaluate=0), clients)
            for name in ("fedavg", "ffa")}
    for kind in ("int8", "nf4"):  # FedAvg with compressed updates, same seeds
        runs[kind] = run_in_process(make_job(model, tmp / kind, clients, local_steps=3, update_compression=kind,
                                             fraction_evaluate=0), clients)
    return runs | {"model": model, "tmp": tmp}


def adapter(folder):
    from safetensors.numpy import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.slow
def test_ffa_is_exact_and_fedavg_of_the_factors_is_not(two_aggregations):
    fedavg = two_aggregations["fedavg"]["federated"]["history"][0]
    ffa = two_aggregations["ffa"]["federated"]["history"][0]
    print(f"relative distance to the clients' average update: fedavg {fedavg['aggregation_error']:.4%}, "
          f"ffa {ffa['aggregation_error']:.2e}")
    assert ffa["aggregation_error"] <= 1e-3 < fedavg["aggregation_error"]
    assert ffa["aggregation_error"] < 1e-5  # exact up to float32 rounding
    import finetune_sdk
    from finetune_sdk.federated.params import NPY_HEADER_BYTES

    params = dict(finetune_sdk.load(two_aggregations["tmp"] / "ffa").model.named_parameters())
    a_bytes = sum(p.numel() * 4 + NPY_HEADER_BYTES for n, p in params.items() if ".lora_A." in n)
    b_bytes = sum(p.numel() * 4 + NPY_HEADER_BYTES for n, p in params.items() if ".lora_B." in n)
    for name in ("clinic-a", "clinic-b"):  # only B travels, each way
        ffa_bytes, fedavg_bytes = ffa["clients"][name]["bytes_sent"], fedavg["clients"][name]["bytes_sent"]
        assert (ffa_bytes, fedavg_bytes) == (b_bytes, a_bytes + b_bytes)
        assert ffa["clients"][name]["bytes_received"] == b_bytes
    print(f"bytes per client per round, each way: fedavg {fedavg_bytes:,}, ffa {ffa_bytes:,}")
    assert two_aggregations["ffa"]["federated"]["aggregation"] == "ffa"


@pytest.mark.slow
def test_ffa_result_keeps_the_shared_frozen_a(two_aggregations):
    import finetune_sdk
    from finetune_sdk.federated.lora_aggregation import freeze_lora_a

    loaded = finetune_sdk.load(two_aggregations["tmp"] / "ffa")
    fresh = finetune_sdk.load(two_aggregations["tmp"] / "ffa")
    freeze_lora_a(fresh.model, OPTIONS["seed"])
    a_names = [n for n, _ in loaded.model.named_parameters() if ".lora_A." in n]
    fresh_params = dict(fresh.model.named_parameters())
    assert a_names
    for name, param in loaded.model.named_parameters():
        if ".lora_A." in name:
            assert np.array_equal(param.detach().numpy(), fresh_params[name].detach().numpy()), name
    b = [p for n, p in loaded.model.named_parameters() if ".lora_B." in n]
    assert max(float(p.abs().max()) for p in b) > 0, "B trained"


@pytest.mark.slow
def test_clients_of_lower_rank_train_a_truncation_and_are_padded_back(llama_dir, tmp_path):
    """HetLoRA-style: a rank-4 client of a rank-8 federation sends half the values; rows it doesn't hold keep the
    global values, so there the global adapter is the full-rank clients' weighted share."""
    from finetune_sdk.federated.rounds import FederatedServer
    from finetune_sdk.testing.federated import InProcessGrid

    data = as_pairs(write_clients(tmp_path / "data", ["clinic-a", "clinic-b"]))
    clients = {"clinic-a": data["clinic-a"], "clinic-b": (*data["clinic-b"], 4)}
    job = make_job(llama_dir, tmp_path / "out", clients, local_steps=2, fraction_evaluate=0)
    job.options.update(r=8, lora_alpha=16)
    grid = InProcessGrid(clients, job.to_run_config())
    server = FederatedServer(job, grid)
    start = {k: v.numpy().copy() for k, v in server.arrays.items()}
    manifest = server.run()
    entry = manifest["federated"]["history"][0]
    full, low = entry["clients"]["clinic-a"], entry["clients"]["clinic-b"]
    headers = 128 * len(start)
    assert low["bytes_sent"] - headers == (full["bytes_sent"] - headers) / 2
    full_reply = next(r for r in grid.replies if r.content["report"]["client"] == "clinic-a")
    share = full["examples"] / (full["examples"] + low["examples"])
    result = adapter(tmp_path / "out")
    for name, before in start.items():
        key = name.replace(".default", "")
        sent = full_reply.content["arrays"][name].numpy()
        if ".lora_A." in name:  # rows 4..8: clinic-a's, weighted, and the global start for clinic-b's share
            expected, actual = share * sent[4:] + (1 - share) * before[4:], result[key][4:]
        else:
            expected, actual = share * sent[:, 4:] + (1 - share) * before[:, 4:], result[key][:, 4:]
        assert np.allclose(actual, expected, atol=1e-6), name
    assert any(np.abs(result[k.replace(".default", "")][:, :4]).max() > 0 for k in start if ".lora_B." in k)


def test_client_rank_is_checked_before_anything_starts(llama_dir, tmp_path):
    trainer = Trainer(llama_dir, formatter="chatml", output_dir=tmp_path / "out", progress=False, r=8)
    clients = write_clients(tmp_path / "data", ["clinic-a", "clinic-b"])
    clients["clinic-b"]["r"] = 16
    with pytest.raises(ConfigError, match="client 'clinic-b': r must be an integer from 1 to the global rank 8"):
        trainer.fit_federated(clients)
    clients["clinic-b"]["r"] = 4
    with pytest.raises(ConfigError, match="works with aggregation='fedavg' and without update_compression"):
        trainer.fit_federated(clients, aggregation="ffa")
    assert not (tmp_path / "out").exists()


def test_unknown_aggregation_and_ffa_without_lora_are_one_line_errors():
    import torch

    from finetune_sdk.federated.lora_aggregation import freeze_lora_a

    with pytest.raises(ConfigError, match="aggregation must be one of fedavg, ffa, fedex, got 'flora'"):
        FederatedSettings(aggregation="flora").validate()
    with pytest.raises(ConfigError, match="needs a LoRA technique"):
        freeze_lora_a(torch.nn.Linear(2, 2), 0)


def test_fedex_refuses_what_its_residual_cannot_complete():
    with pytest.raises(ConfigError, match="aggregation='fedex' works with strategies fedavg, fedprox"):
        FederatedSettings(aggregation="fedex", strategy="fedmedian").validate()
    with pytest.raises(ConfigError, match="can't be combined with secure_aggregation or dp"):
        FederatedSettings(aggregation="fedex", dp="server").validate()


def test_fedex_refuses_a_base_that_cannot_hold_the_residual_and_folds_by_base_name():
    import peft
    import torch

    from finetune_sdk.federated.fedex import fold_into_peft, lora_layers

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 3, bias=False)

    model = peft.get_peft_model(Model(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["proj"]))
    layers = lora_layers(model)
    assert [(b, base, s) for b, (base, _, s) in layers.items()] == \
        [("base_model.model.proj.lora_B.default.weight", "proj.weight", 2.0)]
    before = model.base_model.model.proj.get_base_layer().weight.detach().clone()
    fold_into_peft(model, {"proj.weight": np.full((3, 4), 0.5, dtype=np.float32)})
    assert torch.equal(model.base_model.model.proj.get_base_layer().weight, before + 0.5)
    with pytest.raises(ConfigError, match="must be float32 to hold it exactly"):
        lora_layers(model.to(torch.bfloat16))
    with pytest.raises(ConfigError, match="needs a LoRA technique"):
        lora_layers(torch.nn.Linear(2, 2))


@pytest.fixture(scope="module")
def fedex_and_fedavg(tiny_models, tmp_path_factory):
    """Two rounds of 2 non-IID owners with FedEx-LoRA and with FedAvg of the factors; the grids keep each
    client's reply (its trained factors) and the message it answered."""
    from finetune_sdk.federated.rounds import FederatedServer
    from finetune_sdk.testing.federated import InProcessGrid

    model = tiny_models("llama")
    tmp = tmp_path_factory.mktemp("fedex")
    clients = as_pairs(write_clients(tmp / "data", ["clinic-a", "clinic-b"]))
    runs = {}
    for name in ("fedex", "fedavg"):
        job = make_job(model, tmp / name, clients, rounds=2, local_steps=3, aggregation=name, fraction_evaluate=0)
        job.options["dtype"] = "float32"  # FedEx-LoRA folds its residual into the base: float32 holds it exactly
        grid = InProcessGrid(clients, job.to_run_config())
        runs[name] = {"manifest": FederatedServer(job, grid).run(), "grid": grid, "out": tmp / name,
                      "rounds": job.state_dir}
    return runs


def effective_weights(folder):
    """``{base weight name: W + s B A}`` (float64) of every LoRA layer of a loaded result, and the loaded model."""
    import finetune_sdk
    from finetune_sdk.federated.fedex import lora_layers

    loaded = finetune_sdk.load(folder)
    out = {}
    for b_name, (base_name, module, scaling) in lora_layers(loaded.model).items():
        a_name = b_name.replace(".lora_B.", ".lora_A.")
        params = dict(loaded.model.named_parameters())
        out[base_name] = (module.get_base_layer().weight.detach().double().numpy()
                          + scaling * params[b_name].detach().double().numpy() @ params[a_name].detach().double().numpy(),
                          b_name, a_name, scaling)
    return out


def distance_to_clients_average(run):
    """Relative distance of the saved round-2 model to the round-1 model plus the clients' weighted average round-2
    update, every model as ``finetune_sdk.load`` gives it back; and the distance float32 rounding of that target alone
    makes (the weights are float32: a small update on a larger weight loses digits whichever way it is stored)."""
    before = effective_weights(run["rounds"] / "round-1")
    after = effective_weights(run["out"])
    replies = [(m, r) for m, r in zip(run["grid"].messages_sent, run["grid"].replies)
               if int(m.content["config"]["server-round"]) == 2]
    weights = np.array([float(r.content["metrics"]["num-examples"]) for _, r in replies])
    weights /= weights.sum()
    diff_sq = target_sq = floor_sq = 0.0
    for base_name, (g1, b_name, a_name, scaling) in before.items():
        start = g1 - scaling * np.asarray(replies[0][0].content["arrays"][b_name].numpy(), np.float64) @ \
            np.asarray(replies[0][0].content["arrays"][a_name].numpy(), np.float64)  # W + D_1, without the adapter
        average = sum(w * scaling * r.content["arrays"][b_name].numpy().astype(np.float64)
                      @ r.content["arrays"][a_name].numpy().astype(np.float64) for w, (_, r) in zip(weights, replies))
        target = start + average
        diff_sq += float(np.sum((after[base_name][0] - target) ** 2))
        target_sq += float(np.sum((target - g1) ** 2))
        floor_sq += float(np.sum((target.astype(np.float32).astype(np.float64) - target) ** 2))
    return float(np.sqrt(diff_sq / target_sq)), float(np.sqrt(floor_sq / target_sq))


@pytest.mark.slow
def test_fedex_saved_model_is_the_clients_average_and_fedavg_is_not(fedex_and_fedavg):
    fedex, floor = distance_to_clients_average(fedex_and_fedavg["fedex"])
    fedavg, _ = distance_to_clients_average(fedex_and_fedavg["fedavg"])
    history = {n: [e["aggregation_error"] for e in fedex_and_fedavg[n]["manifest"]["federated"]["history"]]
               for n in ("fedex", "fedavg")}
    print(f"round 2, loaded model vs clients' average: fedex {fedex:.2e} (float32 rounding of the target alone "
          f"{floor:.2e}), fedavg {fedavg:.4%}; per-round aggregation_error {history}")
    assert fedex <= 1e-3 < fedavg
    assert fedex < 3 * floor  # exact up to float32 rounding of the weights
    assert max(history["fedex"]) < 1e-5 and min(history["fedavg"]) > 1e-3


@pytest.mark.slow
def test_fedex_traffic_meters_the_dense_base_delta(fedex_and_fedavg):
    from safetensors.numpy import load_file

    from finetune_sdk.federated.params import NPY_HEADER_BYTES

    run = fedex_and_fedavg["fedex"]
    history = run["manifest"]["federated"]["history"]
    adapter_bytes = sum(v.size * 4 + NPY_HEADER_BYTES for v in adapter(run["out"]).values())
    delta = load_file(str(run["rounds"] / "round-1" / "base_delta.safetensors"))
    delta_bytes = sum(v.size * 4 + NPY_HEADER_BYTES for v in delta.values())
    assert run["manifest"]["base_delta"] == {"file": "base_delta.safetensors", "method": "fedex-lora",
                                             "weights": len(delta)}
    for name in ("clinic-a", "clinic-b"):
        assert history[0]["clients"][name]["bytes_received"] == adapter_bytes  # no residual before round 1
        assert history[1]["clients"][name]["bytes_received"] == adapter_bytes + delta_bytes
        assert history[0]["clients"][name]["bytes_sent"] == history[1]["clients"][name]["bytes_sent"] == adapter_bytes
    print(f"per client per round: adapter {adapter_bytes:,} B each way, base delta {delta_bytes:,} B down")
    factors = adapter(run["out"])  # dense: out x in float32 per adapted matrix, vs r x (out + in) for its factors
    assert delta_bytes == sum(factors[b].shape[0] * factors[b.replace("lora_B", "lora_A")].shape[1] * 4
                              + NPY_HEADER_BYTES for b in factors if "lora_B" in b)


def test_aggregation_error_of_averaged_factors_is_the_cross_term():
    from finetune_sdk.federated.lora_aggregation import aggregation_error

    rng = np.random.default_rng(0)
    a0, b0 = rng.normal(size=(2, 5)), np.zeros((4, 2))
    clients = [{"l.lora_A.w": a0 + rng.normal(size=a0.shape), "l.lora_B.w": rng.normal(size=b0.shape)}
               for _ in range(2)]
    old = {"l.lora_A.w": a0, "l.lora_B.w": b0}
    mean = {k: (clients[0][k] + clients[1][k]) / 2 for k in old}
    target = sum(c["l.lora_B.w"] @ c["l.lora_A.w"] for c in clients) / 2
    expected = np.linalg.norm(mean["l.lora_B.w"] @ mean["l.lora_A.w"] - target) / np.linalg.norm(target)
    assert aggregation_error(old, mean, clients, [1, 1]) == pytest.approx(expected, rel=1e-12)
    frozen = {"l.lora_A.w": a0}  # FFA: A shared and frozen, B averaged
    ffa_clients = [{"l.lora_B.w": c["l.lora_B.w"]} for c in clients]
    ffa_mean = {"l.lora_B.w": mean["l.lora_B.w"]}
    assert aggregation_error({"l.lora_B.w": b0}, ffa_mean, ffa_clients, [1, 1], frozen) < 1e-15


# -- 6. Flower's server optimizers and robust aggregators by name -------------------------------------------------
@pytest.mark.parametrize("name, flower, options", [
    ("fedadam", "FedAdam", {"eta": 0.01, "tau": 1e-4}),
    ("fedyogi", "FedYogi", {"eta": 0.02}),
    ("fedmedian", "FedMedian", {}),
    ("fedtrimmedavg", "FedTrimmedAvg", {"beta": 0.1}),
])
def test_flower_optimizers_and_robust_aggregators_by_name(name, flower, options):
    import flwr.serverapp.strategy as flower_strategies

    from finetune_sdk.plugin_manager import get_plugin_host

    settings = FederatedSettings(strategy=name, min_fit_clients=2, strategy_options=options).validate(3)
    built = get_plugin_host().create("strategy", name).build(settings)
    assert type(built) is getattr(flower_strategies, flower) and built.min_train_nodes == 2
    for key, value in options.items():
        assert getattr(built, key) == value
    with pytest.raises(ConfigError, match=f"strategy '{name}' has no option 'momentum'"):
        get_plugin_host().create("strategy", name).build(
            FederatedSettings(strategy=name, strategy_options={"momentum": 0.9}).validate())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fedadam"])
def test_fedadam_runs_rounds_and_keeps_float32_traffic(name, llama_dir, tmp_path):
    """Flower's FedAdam runs two rounds (each builtin's single round is in the strategy contract suite)."""
    from finetune_sdk.testing.federated import run_in_process

    clients = as_pairs(write_clients(tmp_path / "data"))
    manifest = run_in_process(make_job(llama_dir, tmp_path / "out", clients, local_steps=1, strategy=name, rounds=2,
                                       strategy_options={"eta": 0.01} if name == "fedadam" else {},
                                       fraction_evaluate=0), clients)
    first, second = manifest["federated"]["history"]
    assert first["owners"] == 3 and first["global_update_norm"] > 0
    # Flower's FedAdam computes in float64: the global adapter the clients receive stays float32
    assert second["bytes_to_clients"] == first["bytes_to_clients"]
    assert json.loads(json.dumps(manifest["federated"]["strategy"])) == name


# -- 3. compressed updates ----------------------------------------------------------------------------------------
def test_quantize_round_trip_is_within_half_a_step_per_block():
    from finetune_sdk.federated.compression import BLOCK, NF4_LEVELS, dequantize, quantize

    values = np.random.default_rng(0).normal(size=(7, 50)).astype(np.float32)  # 350 values: a partial last block
    for kind, half_step in (("int8", 0.5 / 127), ("nf4", max(np.diff(NF4_LEVELS)) / 2)):
        codes, absmax = quantize(values, kind)
        assert absmax.size == -(-values.size // BLOCK) and absmax.dtype == np.float32
        assert codes.nbytes == absmax.size * BLOCK // (1 if kind == "int8" else 2)
        back = dequantize(codes, absmax, values.shape, kind)
        padded = np.zeros(absmax.size * BLOCK, np.float32)
        padded[:values.size] = values.ravel()
        bound = np.repeat(absmax * half_step, BLOCK)[:values.size].reshape(values.shape)
        assert np.all(np.abs(back - values) <= bound + 1e-7), kind


@pytest.mark.slow
def test_compressed_updates_are_metered_smaller_and_stay_close_to_float32(two_aggregations):
    from finetune_sdk.federated.compression import BLOCK
    from finetune_sdk.federated.params import NPY_HEADER_BYTES

    tmp = two_aggregations["tmp"]
    reference = adapter(tmp / "fedavg")
    sizes = [v.size for v in reference.values()]
    blocks = [-(-n // BLOCK) for n in sizes]
    expected = {"int8": sum(b * BLOCK + b * 4 + 2 * NPY_HEADER_BYTES for b in blocks),
                "nf4": sum(b * BLOCK // 2 + b * 4 + 2 * NPY_HEADER_BYTES for b in blocks)}
    float32 = two_aggregations["fedavg"]["federated"]["history"][0]["clients"]["clinic-a"]["bytes_sent"]
    for kind, tolerance in (("int8", 0.01), ("nf4", 0.15)):
        entry = two_aggregations[kind]["federated"]["history"][0]
        for name in ("clinic-a", "clinic-b"):
            assert entry["clients"][name]["bytes_sent"] == expected[kind]
            assert entry["clients"][name]["bytes_received"] == float32  # the server's message stays float32
        # distance of the global adapter to the float32 run's, relative to the float32 run's update (B starts at 0)
        compressed = adapter(tmp / kind)
        diff = np.sqrt(sum(np.sum((compressed[k] - reference[k]) ** 2) for k in reference if "lora_B" in k))
        moved = np.sqrt(sum(np.sum(reference[k] ** 2) for k in reference if "lora_B" in k))
        print(f"{kind}: {expected[kind]:,} B sent per client (float32 {float32:,}); global B off by "
              f"{diff / moved:.3%} of the update")
        assert 0 < diff / moved < tolerance, kind


# -- 4. federated preference tuning -------------------------------------------------------------------------------
def preference_clients(folder, kind):
    from tests.federated_data import FACTS

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in ("clinic-a", "clinic-b"):
        rows = []
        for place, colour in FACTS[name]:
            wrong = "red" if colour != "red" else "blue"
            prompt, right, bad = f"What colour is the {place} flag?", f"The {place} flag is {colour}.", \
                f"The {place} flag is {wrong}."
            rows += [{"prompt": prompt, "chosen": right, "rejected": bad}] if kind == "preference" else \
                [{"prompt": prompt, "completion": right, "label": True},
                 {"prompt": prompt, "completion": bad, "label": False}]
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        out[name] = (str(path), None)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["preference", "kto"])
def test_preference_and_kto_rows_train_federated_rounds(kind, llama_dir, tmp_path):
    """Each owner runs DPO / KTO on its own rows, its reference log-probs computed in its own process (from the
    run's starting model by default); the server averages the adapters as for supervised rounds."""
    from finetune_sdk.testing.federated import run_in_process

    clients = preference_clients(tmp_path / "data", kind)
    job = FederatedJob(str(llama_dir), "lora", None, kind, dict(OPTIONS),
                       FederatedSettings(rounds=2, local_steps=2, fraction_evaluate=0).validate(2),
                       str(tmp_path / "out"), expected_clients=sorted(clients), run_token="test")
    manifest = run_in_process(job, clients)
    first = manifest["federated"]["history"][0]["clients"]
    assert sorted(first) == ["clinic-a", "clinic-b"] and manifest["metrics"]["owners_per_round"] == [2, 2]
    if kind == "preference":  # DPO's loss starts at log 2, where policy = reference
        assert all(abs(c["train_loss"] - np.log(2)) < 0.05 for c in first.values())
    result = adapter(tmp_path / "out")
    assert max(float(np.abs(v).max()) for k, v in result.items() if "lora_B" in k) > 0


@pytest.mark.slow
def test_dpo_reference_is_the_runs_starting_model_unless_round_is_asked(llama_dir, tmp_path):
    """One local step per round: DPO's loss at a step is log 2 exactly where the policy is its reference. Round 1
    starts at the base in both modes; in round 2 the owner starts from the round-1 global model, which is its
    reference only with ``preference_reference="round"``; with the default ``"start"`` the reference stays the base
    (the adapter of a fresh preparation), so the margin isn't zero."""
    from finetune_sdk.testing.federated import run_in_process

    clients = preference_clients(tmp_path / "data", "preference")
    losses = {}
    for mode in ("start", "round"):
        settings = FederatedSettings(rounds=2, local_steps=1, fraction_evaluate=0, preference_reference=mode)
        job = FederatedJob(str(llama_dir), "lora", None, "preference", dict(OPTIONS, per_device_train_batch_size=8),
                           settings.validate(2), str(tmp_path / mode), expected_clients=sorted(clients),
                           run_token="test")
        history = run_in_process(job, clients)["federated"]["history"]
        losses[mode] = [[entry["clients"][name]["train_loss"] for name in sorted(clients)] for entry in history]
    print(f"first-step DPO loss per round and owner: {losses} (log 2 = {np.log(2):.6f})")
    for mode in ("start", "round"):
        assert all(abs(loss - np.log(2)) < 1e-4 for loss in losses[mode][0])
    assert all(abs(loss - np.log(2)) < 1e-4 for loss in losses["round"][1])
    assert all(abs(loss - np.log(2)) > 1e-3 for loss in losses["start"][1])


def test_an_owner_with_only_desirable_kto_rows_is_refused_before_round_1(llama_dir, tmp_path):
    data = tmp_path / "a.jsonl"
    data.write_text('{"prompt": "a", "completion": "b", "label": true}\n' * 3, encoding="utf-8")
    other = tmp_path / "b.jsonl"
    other.write_text('{"prompt": "a", "completion": "b", "label": true}\n{"prompt": "a", "completion": "c", '
                     '"label": false}\n', encoding="utf-8")
    trainer = Trainer(llama_dir, formatter="kto", output_dir=tmp_path / "out", progress=False)
    with pytest.raises((DataError, ConfigError), match="^owner 'clinic-a': "):
        trainer.fit_federated({"clinic-a": str(data), "clinic-b": str(other)})
    assert not (tmp_path / "out").exists()

"""Federated runs on Flower's deployment runtime: a SuperLink and one SuperNode per client, as real processes on
loopback (what ``Trainer.fit_federated`` starts), each client's ClientApps in one long-lived process that keeps its
base model loaded (the default ``warm_clients=True``; the cold path is tested in tests/test_federated_warm.py)."""

from __future__ import annotations

import json
import threading
import time

import pytest

pytest.importorskip("flwr")

import finetune_sdk  # noqa: E402
from finetune_sdk import Trainer  # noqa: E402
from finetune_sdk.federated import runtime  # noqa: E402
from finetune_sdk.federated.audit import AUDIT_ENV, opened_paths  # noqa: E402
from finetune_sdk.federated.params import NPY_HEADER_BYTES  # noqa: E402
from tests.federated_data import FACTS, held_out_rows, write_clients  # noqa: E402

pytestmark = pytest.mark.slow
OPTIONS = {"learning_rate": 3e-2, "seed": 7, "per_device_train_batch_size": 2}


@pytest.fixture
def started(monkeypatch):
    """The FlowerProcesses objects fit_federated creates, to reach its SuperNodes and SuperLink."""
    seen = []
    original = runtime.FlowerProcesses.__init__

    def spy(self, work_dir):
        original(self, work_dir)
        seen.append(self)

    monkeypatch.setattr(runtime.FlowerProcesses, "__init__", spy)
    return seen


def trainer_for(model, out, **options):
    return Trainer(model, formatter="chatml", output_dir=out, progress=False, **{**OPTIONS, **options})


def test_non_iid_clients_beat_local_only_and_data_stays_with_its_owner(llama_dir, tmp_path, monkeypatch):
    """Acceptance: 3 clients with disjoint facts; the global adapter's held-out loss on the union of the clients'
    held-out sets is lower than each client's local-only adapter after the same number of local steps; no process
    opens another client's rows; each round's traffic is the adapter's size."""
    rounds, steps = 3, 4
    clients = write_clients(tmp_path / "data")
    audit = tmp_path / "audit"
    monkeypatch.setenv(AUDIT_ENV, str(audit))
    trainer = trainer_for(llama_dir, tmp_path / "fed")
    result = trainer.fit_federated(clients, rounds=rounds, local_steps=steps, round_timeout=300)

    union = [row for name in FACTS for row in held_out_rows(name)]
    federated_loss = finetune_sdk.load(result.output_dir).evaluate(union)["eval_loss"]
    for name, spec in clients.items():
        local = trainer_for(llama_dir, tmp_path / f"local-{name}", max_steps=rounds * steps, save_steps=0)
        local.fit(spec["train"])
        local_loss = local.evaluate(union)["eval_loss"]
        assert federated_loss < local_loss, (name, federated_loss, local_loss)

    data_files = {name: {spec["train"], spec["eval"]} for name, spec in clients.items()}
    every_file = set().union(*data_files.values())
    servers = opened_paths(audit, "server")
    assert servers and not any(paths & every_file for paths in servers.values()), "the server opened client rows"
    for name, own in data_files.items():
        processes = opened_paths(audit, f"client-{name}")
        assert len(processes) == 1  # one long-lived ClientApp process served 3 train rounds and the evaluation
        opened = set().union(*processes.values()) & every_file
        assert opened == own, f"{name} opened {opened}"

    history = result.manifest["federated"]["history"]
    adapter = result.metrics["trainable_parameters"] * 4
    per_client = history[0]["clients"]["clinic-a"]
    assert adapter <= per_client["bytes_sent"] <= adapter + NPY_HEADER_BYTES * 32
    assert per_client["bytes_sent"] == per_client["bytes_received"]
    for entry in history:
        assert sorted(entry["clients"]) == sorted(clients) and entry["dropped"] == []
        assert entry["bytes_total"] == sum(c["bytes_sent"] + c["bytes_received"] for c in entry["clients"].values())
        assert set(entry["global_eval"]["per_client"]) == set(clients)  # each client's held-out loss, each round
    assert result.metrics["bytes_total"] == sum(e["bytes_total"] for e in history)
    assert result.metrics["eval_loss"] == pytest.approx(history[-1]["global_eval"]["eval_loss"])
    report = trainer.compare(union[:3])  # base vs federated on held-out rows
    assert report["tuned"]["eval_loss"] < report["base"]["eval_loss"]


def test_one_client_one_round_equals_local_fit_over_real_processes(llama_dir, tmp_path):
    import numpy as np

    from finetune_sdk.federated.params import trainable_arrays

    clients = write_clients(tmp_path / "data", ["clinic-a"])
    trainer_for(llama_dir, tmp_path / "fed").fit_federated(clients, rounds=1, local_steps=3, fraction_evaluate=0)
    local = trainer_for(llama_dir, tmp_path / "local", max_steps=3, save_steps=0)
    local.fit(clients["clinic-a"]["train"])
    expected = trainable_arrays(local.current_model().model)
    loaded = finetune_sdk.load(tmp_path / "fed").model
    for name, param in loaded.named_parameters():
        param.requires_grad = "lora_" in name
    actual = trainable_arrays(loaded)
    for name in expected.keys():
        assert np.allclose(actual[name].numpy(), expected[name].numpy(), atol=1e-5), name


def _wait_for(condition, timeout=600.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError("timed out waiting")


def _run_in_thread(function, **kwargs):
    outcome = {}

    def target():
        try:
            outcome["result"] = function(**kwargs)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def test_client_killed_mid_round_the_run_completes_and_reports_it(llama_dir, tmp_path, started):
    clients = write_clients(tmp_path / "data")
    trainer = trainer_for(llama_dir, tmp_path / "fed")
    thread, outcome = _run_in_thread(trainer.fit_federated, clients=clients, rounds=2, local_steps=1,
                                     min_fit_clients=2, round_timeout=120, fraction_evaluate=0)
    _wait_for(lambda: started and "Receiving: train message" in started[0].log_tail("supernode-clinic-c", 100000))
    started[0].kill("supernode-clinic-c")
    thread.join(900)
    assert "error" not in outcome, outcome.get("error")
    history = outcome["result"].manifest["federated"]["history"]
    assert len(history) == 2
    assert sorted(history[0]["clients"]) == ["clinic-a", "clinic-b"]
    assert len(history[0]["dropped"]) == 1 and history[0]["dropped"][0].startswith(("clinic-c", "node-"))
    assert "clinic-c" not in history[1]["clients"]


def _processes_under(folder) -> list[str]:
    """Command lines of living processes whose working directory is inside ``folder``."""
    import psutil

    found = []
    for process in psutil.process_iter(["cwd", "cmdline"]):
        if process.info["cwd"] and process.info["cwd"].startswith(str(folder)):
            found.append(" ".join(process.info["cmdline"] or [])[:120])
    return found


def test_server_killed_after_a_round_resumes_from_its_checkpoint(llama_dir, tmp_path, started):
    from finetune_sdk.registry import Registry

    clients = write_clients(tmp_path / "data", ["clinic-a", "clinic-b"])
    registry = Registry(tmp_path / "registry")
    settings = {"clients": clients, "rounds": 3, "local_steps": 1, "fraction_evaluate": 0, "round_timeout": 120}
    first = Trainer(llama_dir, formatter="chatml", output_dir=tmp_path / "fed", progress=False, publish_as="fed",
                    registry=registry, **OPTIONS)
    thread, outcome = _run_in_thread(first.fit_federated, **settings)
    state = tmp_path / "fed.federated" / "checkpoint" / "state.json"
    _wait_for(state.is_file)
    started[0].kill("superlink")  # the server dies between rounds
    thread.join(300)
    assert "error" in outcome and not (tmp_path / "fed").exists()
    assert _processes_under(tmp_path) == []  # the SuperLink's detached ServerApp went with it
    saved = json.loads(state.read_text())
    done = saved["round"]
    assert 1 <= done < 3

    second = Trainer(llama_dir, formatter="chatml", output_dir=tmp_path / "fed", progress=False, publish_as="fed",
                     registry=registry, **OPTIONS)
    result = second.fit_federated(resume=True, **settings)
    history = result.manifest["federated"]["history"]
    assert [e["round"] for e in history] == [1, 2, 3]
    def without_global_eval(entry):  # a round's global adapter is evaluated by the next round's clients
        return {k: v for k, v in entry.items() if k != "global_eval"}

    assert [without_global_eval(e) for e in history[:done]] == [without_global_eval(e) for e in saved["history"]]
    versions = [registry.resolve(f"fed@{i}") for i in (1, 2, 3)]
    assert versions[1].parent == versions[0].ref and versions[2].parent == versions[1].ref
    assert not state.exists()
    assert _processes_under(tmp_path) == []


@pytest.fixture(scope="module")
def two_clinics(tmp_path_factory):
    """clinic-a and clinic-b as warm SuperNodes on one SuperLink, shared by this module's 2-client runs."""
    from tests.federated_data import SharedFederation

    federation = SharedFederation(tmp_path_factory.mktemp("two-clinics"), ["clinic-a", "clinic-b"])
    yield federation
    federation.stop()


def test_qlora_federation_sends_only_the_adapter(llama_dir, tmp_path, two_clinics):
    """QLoRA end to end on real processes: every client loads the base in 4-bit (bitsandbytes on CPU), trains the
    LoRA adapter; only the adapter's float32 values travel, never the 4-bit base; the result loads as an
    ordinary QLoRA adapter."""
    pytest.importorskip("bitsandbytes")
    from safetensors import safe_open

    trainer = trainer_for(llama_dir, tmp_path / "fed", technique="qlora")
    result = two_clinics.fit(trainer, rounds=1, local_steps=1, fraction_evaluate=0, round_timeout=300)

    assert result.manifest["technique"] == "qlora" and result.manifest["quantizer"] is not None
    adapter = result.metrics["trainable_parameters"] * 4
    assert 0 < result.metrics["trainable_parameters"] < result.metrics["total_parameters"]
    with safe_open(str(result.output_dir / "adapter_model.safetensors"), "np") as saved:
        names = list(saved.keys())
    assert names and all("lora_" in name for name in names)
    for name, entry in result.manifest["federated"]["history"][0]["clients"].items():
        assert adapter <= entry["bytes_sent"] <= adapter + NPY_HEADER_BYTES * len(names), name
        assert entry["bytes_received"] == entry["bytes_sent"]
    loaded = finetune_sdk.load(result.output_dir)
    assert loaded.generate("What colour is the Quillmere flag?", max_new_tokens=2) is not None


def test_secure_aggregation_over_real_processes(llama_dir, tmp_path, two_clinics):
    """SecAgg+ on Flower's deployment runtime: the protocol's four stages reach each client's ClientApp processes
    (its keys and shares kept in the SuperNode's context between them) and the run completes; the server records
    the protocol's settings and the quantization bound, and no per-client update."""
    result = two_clinics.fit(trainer_for(llama_dir, tmp_path / "fed"), rounds=1, local_steps=1, fraction_evaluate=0,
                             round_timeout=300, secure_aggregation=True)
    federated = result.manifest["federated"]
    assert federated["secure_aggregation"]["protocol"].startswith("SecAgg+")
    entry = federated["history"][0]
    assert sorted(entry["clients"]) == ["clinic-a", "clinic-b"] and entry["dropped"] == []
    assert 0 < entry["secure_aggregation"]["max_quantization_error"] < 1e-3
    assert entry["global_update_norm"] > 0  # the sum was unmasked and applied
    adapter = result.metrics["trainable_parameters"] * 4
    for client in entry["clients"].values():
        assert "update_norm" not in client
        assert client["bytes_sent"] > 2 * adapter  # masked int64 vectors: 8 bytes a value, plus keys and shares

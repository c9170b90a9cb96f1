"""The studio's feedback loop on the server side: ratings rows as ``finetune feedback`` writes them, two writers at
once, the retrain plan's counts and warnings, the federated rounds view and the benchmark scoreboard."""

from __future__ import annotations

import json
import threading

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from finetune_sdk.studio.app import create_app  # noqa: E402

TOKEN = "test-token-0123456789"
H = {"X-Studio-Token": TOKEN}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from finetune_sdk.testing.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("loop")
    save_tiny_model(root / "model")
    (root / "prompts.txt").write_text("What is 2 plus 3?\nName a colour.\nWhat is 2 plus 3?\n")
    return root


@pytest.fixture
def client(work, tmp_path):
    app = create_app(work / "runs", work, token=TOKEN, registry_home=tmp_path / "registry")
    return TestClient(app, base_url="http://127.0.0.1:8765")


def _stream(client, body):
    response = client.post("/api/chat", headers=H, json=body)
    assert response.status_code == 200, response.text
    return [json.loads(line[6:]) for line in response.text.split("\n\n") if line.startswith("data: ")]


def test_chat_streams_each_model_and_its_answer_is_the_one_finetune_feedback_samples(client, work):
    """The chat's answer is ``sample_answers`` with ``prompt_seed(seed, prompt, 0)``: the terminal's first answer."""
    from finetune_sdk.feedback.session import open_answering_model, prompt_seed, sample_answers

    model = str(work / "model")
    settings = {"max_new_tokens": 6, "temperature": 0.9, "seed": 3}
    events = _stream(client, {"models": [model, model], "prompt": "Hi <b>there</b>", "settings": settings,
                              "formatter": "chatml", "rater": "ana"})
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("done") == 2 and "token" in kinds
    start = events[0]
    assert start["sampling"]["temperature"] == 0.9 and start["sampling"]["seed"] == 3 and start["formatter"] == "chatml"
    done = [e for e in events if e["event"] == "done"]
    expected = sample_answers(open_answering_model(model, "chatml", False), "Hi <b>there</b>", 1,
                              seed=prompt_seed(3, "Hi <b>there</b>", 0), max_new_tokens=6, temperature=0.9)[0]
    assert done[0]["answer"] == done[1]["answer"] == expected
    assert "".join(e["text"] for e in events if e["event"] == "token" and e["column"] == 0).strip() == expected

    rated = client.post("/api/rate", headers=H, json={"kind": "thumbs", "answers": [done[0]["id"]], "value": True,
                                                        "out": "chat-thumbs.jsonl"})
    assert rated.status_code == 200, rated.text
    row = json.loads((work / "chat-thumbs.jsonl").read_text().splitlines()[-1])
    assert list(row) == ["prompt", "completion", "label", "rater", "rated_at", "model", "sampling"]
    assert row["completion"] == expected and row["model"] == {"ref": model} and row["rater"] == "ana"
    assert client.post("/api/rate", headers=H, json={"kind": "thumbs", "answers": ["nope"], "value": True,
                                                      "out": "chat-thumbs.jsonl"}).status_code == 400
    outside = client.post("/api/rate", headers=H, json={"kind": "thumbs", "answers": [done[0]["id"]], "value": True,
                                                         "out": "/tmp/elsewhere.jsonl"})
    assert outside.status_code == 400 and "outside the folders" in outside.json()["error"]


def test_session_rows_equal_finetune_feedback_rows(client, work, tmp_path):
    """A pairwise session over a prompts file in the page writes the rows collect_feedback writes for the same
    choices: same fields, same order, same answers (rated_at aside)."""
    from finetune_sdk.feedback.session import collect_feedback

    model = str(work / "model")
    body = {"model": model, "prompts": "prompts.txt", "mode": "pairwise", "out": "page-pairs.jsonl",
            "formatter": "chatml", "rater": "ana", "settings": {"max_new_tokens": 5, "temperature": 1.0, "seed": 7}}
    choices = [1, "tie", 0]
    for choice in choices:
        item = client.post("/api/session/next", headers=H, json=body).json()
        assert not item["done"] and len(item["answers"]) == 2
        ids = [a["id"] for a in item["answers"]]
        assert client.post("/api/rate", headers=H, json={"kind": "pair", "answers": ids, "value": choice,
                                                          "out": "page-pairs.jsonl"}).status_code == 200
    assert client.post("/api/session/next", headers=H, json=body).json() == {"done": True, "total": 3}
    given = iter(choices)
    collect_feedback(model, work / "prompts.txt", tmp_path / "cli.jsonl", mode="pairwise", formatter="chatml",
                     rater="ana", max_new_tokens=5, temperature=1.0, seed=7, ask=lambda prompt, answers: next(given),
                     model_ref=model)
    page = [json.loads(line) for line in (work / "page-pairs.jsonl").read_text().splitlines()]
    cli = [json.loads(line) for line in (tmp_path / "cli.jsonl").read_text().splitlines()]
    for row in page + cli:
        row.pop("rated_at")
    assert [list(r) for r in page] == [list(r) for r in cli] and page == cli
    assert page[1]["preference"] == "tie"


def test_two_writers_at_once_lose_no_row(work):
    """Rows appended by two threads at once (each opening the file per rating, as two pages do) are all there."""
    from finetune_sdk.studio.access import Confinement
    from finetune_sdk.studio.chat import ChatWorker
    from finetune_sdk.studio.rating import rate

    worker = ChatWorker()
    confine = Confinement([work], base=work)
    ids = [worker.remember("m", f"prompt {i}", f"answer {i}", {"model": {"ref": "m"}}).id for i in range(60)]
    errors: list[BaseException] = []

    def writer(chunk):
        try:
            for answer_id in chunk:
                rate(worker, confine, {"kind": "thumbs", "answers": [answer_id], "value": True, "out": "two.jsonl"})
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(ids[i::2],)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    rows = [json.loads(line) for line in (work / "two.jsonl").read_text().splitlines()]
    assert sorted(r["prompt"] for r in rows) == sorted(f"prompt {i}" for i in range(60))
    worker.close()


def test_retrain_plan_counts_and_warnings(client, work):
    rows = [{"prompt": f"p{i}", "completion": "a", "label": i < 5} for i in range(6)]
    (work / "plan.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plan = client.post("/api/retrain/plan", headers=H, json={"objective": "kto", "file": "plan.jsonl"}).json()
    assert plan["counts"] == {"rows": 6, "desirable": 5, "undesirable": 1} and plan["error"] is None
    assert any("5 desirable and 1 undesirable rows give a weighted ratio of 5.00" in w for w in plan["warnings"])
    assert any(w.startswith("only 6 usable ratings") for w in plan["warnings"])
    empty = client.post("/api/retrain/plan", headers=H, json={"objective": "dpo", "file": "plan.jsonl"}).json()
    assert empty["counts"]["rows"] == 0 and "no pairs ratings" in empty["error"]
    refused = client.post("/api/retrain", headers=H, json={"objective": "dpo", "file": "plan.jsonl",
                                                            "rated": str(work / "model")})
    assert refused.status_code == 400 and "no pairs ratings" in refused.json()["error"]


def test_federated_rounds_view():
    from finetune_sdk.studio.insights import federated_rounds

    history = [
        {"round": 1, "clients": {"a": {"examples": 4, "bytes_received": 100, "bytes_sent": 90, "train_loss": 2.0,
                                       "train_steps": 2, "eval_loss": 1.9, "global_eval_loss_before": 2.5,
                                       "eval_examples": 2}},
         "dropped": ["b (timed out)"], "seconds": 1.0, "bytes_to_clients": 100, "bytes_from_clients": 90,
         "bytes_total": 190, "global_eval": {"per_client": {"a": 1.8}, "eval_loss": 1.8}}]
    view = federated_rounds({"federated": {"history": history, "strategy": "fedavg",
                                           "privacy": {"epsilon": 3.2, "delta": 1e-5}}})
    round_one = view["rounds"][0]
    assert (round_one["sampled"], round_one["answered"], round_one["global_eval_loss"]) == (2, 1, 1.8)
    assert round_one["clients"]["a"]["eval_loss"] == 1.9 and round_one["clients"]["a"]["global_eval_loss"] == 1.8
    assert view["privacy"]["epsilon"] == 3.2


@pytest.fixture(scope="module")
def federated_work(dp_federated_run):
    """A work folder whose runs hold a real federated result: 2 owners, 2 rounds, client-side DP with noise (the
    session's run, shared with the browser test)."""
    fed, manifest = dp_federated_run
    return fed.parent.parent, manifest


@pytest.mark.slow
def test_federated_rounds_view_of_a_real_dp_run_shows_the_budget_spent_per_round(federated_work, tmp_path):
    """The rounds page's data for a real in-process federation: per round the owners sampled and answered, each
    owner's and the global held-out loss, bytes sent against the adapter's size on disk, and epsilon spent through
    the round equal to dp-accounting's RDP accountant after that many Gaussian releases."""
    from tests.studio_federated import DP, ROUNDS, dp_accounting_epsilons

    root, manifest = federated_work
    app = create_app(root / "runs", root, token=TOKEN, registry_home=tmp_path / "registry")
    runs = TestClient(app, base_url="http://127.0.0.1:8765").get("/api/federated", headers=H).json()
    assert [run["ref"] for run in runs] == [str(root / "runs" / "fed")]
    view, history = runs[0], manifest["federated"]["history"]
    assert view["adapter_bytes"] == (root / "runs" / "fed" / "adapter_model.safetensors").stat().st_size
    assert view["privacy"]["mode"] == "client" and view["privacy"]["releases"] == ROUNDS
    assert [r["round"] for r in view["rounds"]] == list(range(1, ROUNDS + 1))
    expected = dp_accounting_epsilons()
    assert expected[0] < expected[1]  # the budget grows with every release
    for round_view, entry, epsilon in zip(view["rounds"], history, expected):
        assert (round_view["sampled"], round_view["answered"], round_view["dropped"]) == (2, 2, [])
        assert sorted(round_view["clients"]) == ["clinic-a", "clinic-b"]
        assert round_view["privacy"]["epsilon"] == pytest.approx(epsilon, rel=1e-9)
        assert round_view["privacy"]["delta"] == DP["target_delta"]
        assert round_view["privacy"]["releases"] == entry["round"]
        assert round_view["bytes_from_clients"] == sum(c["bytes_sent"] for c in round_view["clients"].values()) > 0
        assert round_view["global_eval_loss"] == entry["global_eval"]["eval_loss"] > 0
        for name, client in round_view["clients"].items():
            assert client["eval_loss"] == entry["clients"][name]["eval_loss"] > 0
            assert client["global_eval_loss"] == entry["global_eval"]["per_client"][name] > 0
    assert view["privacy"]["epsilon"] == view["rounds"][-1]["privacy"]["epsilon"]


def test_loop_pages_need_the_token_and_escape_nothing_from_models(client):
    for path in ("/chat", "/session", "/export", "/federated", "/scores", "/api/models", "/api/scores",
                 "/api/federated"):
        assert client.get(path).status_code == 401
        assert client.get(path, headers=H).status_code == 200, path
    assert client.post("/api/chat", json={}).status_code == 401
    assert client.get("/api/scores", headers=H).json() == []


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["dpo", "sft", "reward-grpo"])
def test_retrain_job_trains_and_publishes_each_objective(work, tmp_path, objective):
    """The job behind Retrain, in process, from a base model: the run's objective and a published version (no
    parent: a base model is not a registry version). KTO continuing a registry version's adapter, published as its
    child, is the next test's and the browser test's."""
    from finetune_sdk.registry import Registry
    from finetune_sdk.studio.retrain import OBJECTIVES, run_job

    if OBJECTIVES[objective][0] == "pairs":
        rows = [{"prompt": f"What is {a} plus 1?", "chosen": f"{a + 1}.", "rejected": "I do not know."}
                for a in range(4)]
    else:
        rows = [{"prompt": f"What is {a} plus 1?", "completion": f"{a} plus 1 is {a + 1}."} for a in range(4)]
    data = tmp_path / "ratings.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    options = {"max_steps": 1}
    if objective == "reward-grpo":
        options.update(num_generations=2, max_completion_length=4, per_device_train_batch_size=2)
    version = run_job({"rated": str(work / "model"), "objective": objective, "data": str(data), "publish_as": "bot",
                       "parent": False, "registry": str(tmp_path / "registry"), "output_dir": str(tmp_path / "run"),
                       "options": options})
    manifest = Registry(tmp_path / "registry").resolve(version.ref).manifest
    assert version.parent is None
    assert manifest["objective"] == {"dpo": "dpo", "sft": "sft", "reward-grpo": "grpo"}[objective]
    if objective == "reward-grpo":
        assert (tmp_path / "run-reward" / "finetune_manifest.json").is_file()



@pytest.fixture(scope="module")
def lora_version(work, tmp_path_factory):
    """A registry holding ``bot@1``: the tiny model's lora adapter (r=2) trained 2 steps; and a thumbs file."""
    from finetune_sdk import Trainer
    from finetune_sdk.registry import Registry

    home = tmp_path_factory.mktemp("lora-version") / "registry"
    rows = [{"prompt": f"What is {a} plus 1?", "completion": f"{a} plus 1 is {a + 1}."} for a in range(4)]
    Trainer(str(work / "model"), technique="lora", formatter="chatml", output_dir=home.parent / "v1",
            publish_as="bot", registry=Registry(home), progress=False, max_steps=2, learning_rate=0.05, r=2).fit(rows)
    thumbs = work / "continue-thumbs.jsonl"
    thumbs.write_text("".join(json.dumps({**r, "label": i % 2 == 0}) + "\n" for i, r in enumerate(rows)))
    return home, thumbs


@pytest.mark.slow
def test_retrain_continues_the_rated_lora_adapter_without_a_model_copy(work, lora_version):
    """The next stage of a lora version continues its adapter (as ``Trainer.fit([Stage, ...])`` does): with a
    learning rate of 0 the new version's adapter equals the rated one tensor for tensor (a fresh adapter would have
    zero ``lora_B``), no merged copy is written, the new manifest keeps the base and the LoRA shape, the lineage
    is rated -> new; an option asking for another shape is refused before the job starts."""
    from safetensors.torch import load_file

    from finetune_sdk.registry import Registry
    from finetune_sdk.studio.retrain import run_job

    home, thumbs = lora_version
    registry = Registry(home)
    client = TestClient(create_app(work / "runs", work, token=TOKEN, registry_home=home),
                        base_url="http://127.0.0.1:8765")
    refused = client.post("/api/retrain", headers=H, json={"objective": "kto", "file": thumbs.name, "rated": "bot@1",
                                                            "options": {"r": 4}})
    assert refused.status_code == 400 and "continues bot@1's adapter, which has r=2" in refused.json()["error"]

    out = home.parent / "runs" / "bot-kto"
    version = run_job({"rated": "bot@1", "objective": "kto", "data": str(thumbs), "publish_as": "bot-kto",
                       "parent": True, "registry": str(home), "output_dir": str(out),
                       "options": {"max_steps": 1, "learning_rate": 0.0, "per_device_train_batch_size": 4}})
    assert (version.ref, version.parent) == ("bot-kto@1", "bot@1")
    rated = load_file(str(registry.path("bot@1") / "adapter_model.safetensors"))
    new = load_file(str(registry.path(version.ref) / "adapter_model.safetensors"))
    assert sorted(rated) == sorted(new) and all(bool((rated[k] == new[k]).all()) for k in rated)
    assert any(bool(t.abs().sum() > 0) for k, t in rated.items() if "lora_B" in k)  # trained, not a fresh init
    assert not (out.parent / "bot-kto.start").exists()
    manifest = registry.resolve(version.ref).manifest
    assert manifest["objective"] == "kto" and manifest["options"]["r"] == 2
    assert manifest["base_model"]["path"] == str((work / "model").resolve())


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["dpo", "sft", "reward-grpo"])
def test_every_objective_continues_a_lora_version(work, lora_version, objective):
    """DPO, SFT and GRPO (after a reward model trained from the base) train on top of the rated adapter too: the
    new version has the rated adapter's tensors (same names and shapes, moved by training), its parent is the rated
    version and no model copy is written."""
    from safetensors.torch import load_file

    from finetune_sdk.registry import Registry
    from finetune_sdk.studio.retrain import run_job

    home, _ = lora_version
    if objective == "sft":
        rows = [{"prompt": f"What is {a} plus 1?", "completion": f"It is {a + 1}."} for a in range(4)]
    else:
        rows = [{"prompt": f"What is {a} plus 1?", "chosen": f"{a + 1}.", "rejected": "I do not know."}
                for a in range(4)]
    data = home.parent / f"{objective}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    options = {"max_steps": 1, "learning_rate": 0.05}
    if objective == "reward-grpo":
        options.update(num_generations=2, max_completion_length=4, per_device_train_batch_size=2)
    out = home.parent / "runs" / f"bot-{objective}"
    version = run_job({"rated": "bot@1", "objective": objective, "data": str(data), "publish_as": f"bot-{objective}",
                       "parent": True, "registry": str(home), "output_dir": str(out), "options": options})
    registry = Registry(home)
    assert version.parent == "bot@1" and not (out.parent / f"bot-{objective}.start").exists()
    rated = load_file(str(registry.path("bot@1") / "adapter_model.safetensors"))
    new = load_file(str(registry.path(version.ref) / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in rated.items()} == {k: v.shape for k, v in new.items()}
    assert any(not bool((rated[k] == new[k]).all()) for k in rated)
    if objective == "reward-grpo":
        reward = json.loads((out.parent / f"bot-{objective}-reward" / "finetune_manifest.json").read_text())
        assert reward["base_model"]["path"] == str((work / "model").resolve())

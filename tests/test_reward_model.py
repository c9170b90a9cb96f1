"""The pairwise reward model (technique ``reward-model``, objective ``reward-modeling``): it learns a synthetic
preference (answers with a marker word preferred) to >= 0.9 pairwise accuracy on held-out pairs on a frozen and on a
LoRA backbone, scores (prompt, completion) pairs through ``finetune_sdk.load(ref).score`` from a folder and a
registry ref, and is trained and used from the CLI."""

from __future__ import annotations

import json
import math
import random

import pytest
from click.testing import CliRunner

import finetune_sdk
from finetune_sdk import Trainer
from finetune_sdk.cli.main import cli
from finetune_sdk.errors import ConfigError, DataError
from finetune_sdk.models.inference import LoadedModel

MARKER = "indeed"
WORDS = ["red", "green", "blue", "yellow", "cat", "dog", "bird", "fish", "one", "two", "three", "four", "five",
         "six", "seven", "eight", "nine", "ten", "model", "data", "answer", "question", "world", "task"]


def answer(rng: random.Random, marker: bool) -> str:
    words = rng.sample(WORDS, 4)
    if marker:
        words[rng.randrange(4)] = MARKER
    return " ".join(words) + "."


def marker_pairs(count: int, seed: int) -> list[dict[str, str]]:
    """Pairs whose chosen answer contains the marker word and whose rejected one doesn't (order of words random)."""
    rng = random.Random(seed)
    return [{"prompt": f"tell me about the {rng.choice(WORDS)}", "chosen": answer(rng, True),
             "rejected": answer(rng, False)} for _ in range(count)]


TRAIN, HELD_OUT = marker_pairs(48, seed=1), marker_pairs(24, seed=2)
FAST = dict(per_device_train_batch_size=8, num_train_epochs=6, logging_steps=1, save_steps=0, progress=False, seed=0)


@pytest.fixture(scope="module")
def frozen(tmp_path_factory, tiny_models):
    out = tmp_path_factory.mktemp("rm") / "frozen"
    trainer = Trainer(tiny_models("llama"), technique="reward-model", formatter="preference", output_dir=out,
                      learning_rate=3e-2, **FAST)
    trainer.untrained_metrics = trainer.evaluate(HELD_OUT)  # the untrained head on the same held-out pairs
    return trainer, trainer.fit(TRAIN, eval_data=HELD_OUT)


def test_frozen_backbone_learns_the_preference(frozen):
    trainer, result = frozen
    m = result.metrics
    assert trainer.untrained_metrics["pairwise_accuracy"] < 0.8
    assert m["pairwise_accuracy"] >= 0.9, m
    assert m["eval_loss"] < math.log(2) and m["reward_margin"] > 0
    assert m["eval_rows_scored"] == len(HELD_OUT) and m["eval_rows_skipped"] == 0
    assert m["trainable_parameters"] == 64 + 1  # the head only
    manifest = json.loads((result.output_dir / "finetune_manifest.json").read_text())
    assert manifest["technique"] == "reward-model" and manifest["task"] == "reward"
    assert manifest["objective"] == "reward-modeling"
    assert (result.output_dir / "reward_head.safetensors").is_file()
    assert not list(result.output_dir.rglob("*.bin")) and not list(result.output_dir.rglob("*.pt"))


def test_score_ranks_marker_answers_higher_and_survives_save_and_load(frozen):
    trainer, result = frozen
    prompts = [p["prompt"] for p in HELD_OUT]
    loaded = finetune_sdk.load(result.output_dir)
    good = loaded.score(prompts, [p["chosen"] for p in HELD_OUT])
    bad = loaded.score(prompts, [p["rejected"] for p in HELD_OUT])
    assert all(isinstance(r, float) for r in good + bad)
    assert sum(g > b for g, b in zip(good, bad)) >= 0.9 * len(HELD_OUT)
    assert trainer.current_model().score(prompts, [p["chosen"] for p in HELD_OUT]) == pytest.approx(good, abs=1e-5)
    assert loaded.evaluate(HELD_OUT)["pairwise_accuracy"] == result.metrics["pairwise_accuracy"]
    rewards = loaded.predict(["fish indeed model.", "fish cat model."])
    assert len(rewards) == 2 and all(isinstance(r, float) for r in rewards)
    assert isinstance(loaded.predict("one text"), float)
    with pytest.raises(ConfigError, match="a reward model has score"):
        loaded.generate("hello")


def test_lora_backbone_learns_the_preference_and_reloads(tmp_path, tiny_models):
    trainer = Trainer(tiny_models("llama"), technique="reward-model", formatter="preference", backbone="lora",
                      output_dir=tmp_path / "out", learning_rate=1e-2, r=4, target_modules=["q_proj", "v_proj"],
                      **FAST)
    result = trainer.fit(TRAIN, eval_data=HELD_OUT)
    m = result.metrics
    assert m["pairwise_accuracy"] >= 0.9, m
    assert m["trainable_parameters"] > 65  # LoRA adapters as well as the head
    assert (result.output_dir / "adapter_model.safetensors").is_file()
    completions = [p["chosen"] for p in HELD_OUT[:6]] + [p["rejected"] for p in HELD_OUT[:6]]
    prompts = [p["prompt"] for p in HELD_OUT[:6]] * 2
    expected = trainer.current_model().score(prompts, completions)
    assert finetune_sdk.load(result.output_dir).score(prompts, completions) == pytest.approx(expected, abs=1e-5)


@pytest.mark.usefixtures("hub_online")
def test_registry_and_hub_refs_score_like_the_folder(frozen, tmp_path, monkeypatch):
    from finetune_sdk.registry import Registry
    from tests.hub_server import HubTestServer

    _, result = frozen
    registry = Registry(tmp_path / "registry")
    version = result.publish("helpful-rm", registry=registry, aliases=["production"])
    assert version.ref == "helpful-rm@1"
    prompts, completions = ["tell me about the cat"] * 2, ["cat indeed blue one.", "cat red blue one."]
    expected = finetune_sdk.load(result.output_dir).score(prompts, completions)
    for ref in ("helpful-rm@1", "helpful-rm@production"):
        assert finetune_sdk.load(ref, registry=registry).score(prompts, completions) == pytest.approx(expected)
    with HubTestServer(tmp_path / "hub", tokens={"hf_test_rm"}) as hub:
        monkeypatch.setenv("HF_TOKEN", "hf_test_rm")
        registry.push("helpful-rm@1", "team/helpful-rm", endpoint=hub.url)
        card = hub.read_file("team/helpful-rm", "README.md", "v1").decode()
        assert "pipeline_tag: text-classification" in card and "model.score(" in card
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        fresh = Registry(tmp_path / "fresh")
        pulled = finetune_sdk.load("hf://team/helpful-rm@v1", registry=fresh)
        assert pulled.score(prompts, completions) == pytest.approx(expected)


def test_compare_base_reports_the_untrained_head(frozen, tmp_path):
    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in HELD_OUT))
    out = CliRunner().invoke(cli, ["eval", str(frozen[1].output_dir), str(data), "--compare-base"])
    assert out.exit_code == 0, out.output
    assert "pairwise_accuracy" in out.output


def test_a_4bit_backbone_with_lora_trains_and_reloads(tmp_path, tiny_models):
    """QLoRA-style: the backbone loaded in NF4, LoRA adapters and the head trained; loaded again in 4-bit."""
    out = tmp_path / "qrm"
    trainer = Trainer(tiny_models("llama", hidden_size=96), technique="reward-model", formatter="preference",
                      quantizer="nf4", backbone="lora", output_dir=out, learning_rate=1e-2, **FAST)
    result = trainer.fit(TRAIN, eval_data=HELD_OUT)
    assert result.metrics["pairwise_accuracy"] >= 0.9, result.metrics
    prompts, completions = ["tell me about the cat"] * 2, ["cat indeed blue one.", "cat red blue one."]
    loaded = finetune_sdk.load(out)
    assert json.loads((out / "finetune_manifest.json").read_text())["quantizer"] == "nf4"
    assert loaded.score(prompts, completions) == pytest.approx(trainer.current_model().score(prompts, completions),
                                                               abs=1e-4)


def test_feature_cache_and_full_forward_train_the_same_head(tmp_path, tiny_models):
    """The frozen backbone's cached features (the default) and running it every step give the same losses."""
    def losses(cache: bool) -> list[float]:
        result = Trainer(tiny_models("llama"), technique="reward-model", formatter="preference", max_steps=3,
                         output_dir=tmp_path / f"cache-{cache}", cache_features=cache,
                         **{**FAST, "num_train_epochs": 1}).fit(TRAIN[:24])
        return [e["loss"] for e in result.log_history if "loss" in e]

    cached, direct = losses(True), losses(False)
    assert len(cached) == 3 and cached == pytest.approx(direct, rel=1e-4)


def test_gradient_checkpointing_on_a_lora_backbone_changes_no_loss(tmp_path, tiny_models):
    """The transformers Trainer recomputes the LoRA backbone's activations through the reward model: same losses."""
    def run(checkpointing: bool):
        trainer = Trainer(tiny_models("llama"), technique="reward-model", formatter="preference", backbone="lora",
                          lora_dropout=0.0, learning_rate=1e-2, max_steps=3, output_dir=tmp_path / str(checkpointing),
                          gradient_checkpointing=checkpointing, **{**FAST, "num_train_epochs": 1})
        result = trainer.fit(TRAIN[:24])
        backbone = trainer.current_model().model.backbone.get_base_model()
        return [e["loss"] for e in result.log_history if "loss" in e], backbone.is_activation_checkpointing

    (plain, off), (recomputed, on) = run(False), run(True)
    assert not off and on
    assert len(plain) == 3 and recomputed == pytest.approx(plain, rel=1e-5)


@pytest.mark.parametrize("call,error,message", [
    (lambda m: m.score(["a", "b"], ["x"]), ConfigError, "2 prompts but 1 completions"),
    (lambda m: m.score("a", "x"), ConfigError, "give lists"),
    (lambda m: m.score(["a"], [3]), ConfigError, r"completions\[0\] is int"),
])
def test_bad_score_calls_are_one_line(frozen, call, error, message):
    loaded = finetune_sdk.load(frozen[1].output_dir)
    with pytest.raises(error, match=message) as info:
        call(loaded)
    assert "\n" not in str(info.value)


def test_bad_training_input_is_refused_before_the_model_loads(tmp_path, tiny_models):
    with pytest.raises(ConfigError, match="formatter 'chatml'"):
        Trainer(tiny_models("llama"), technique="reward-model", formatter="chatml", output_dir=tmp_path / "a")
    rows = [{"prompt": "p", "completion": "c"}] * 4
    with pytest.raises(DataError, match="a reward model trains on preference pairs") as info:
        Trainer(tiny_models("llama"), technique="reward-model", output_dir=tmp_path / "b", progress=False).fit(rows)
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="line 2"):
        bad = tmp_path / "pairs.jsonl"
        bad.write_text(json.dumps(TRAIN[0]) + "\n" + json.dumps({"prompt": "p", "chosen": "c"}) + "\n")
        Trainer(tiny_models("llama"), technique="reward-model", formatter="preference", output_dir=tmp_path / "c",
                progress=False).fit(str(bad))
    assert not (tmp_path / "c").exists()
    with pytest.raises(ConfigError, match="backbone"):
        Trainer(tiny_models("llama"), technique="reward-model", backbone="full", output_dir=tmp_path / "d")
    with pytest.raises(ConfigError, match="score\\(\\) is for reward models"):
        LoadedModel(None, None, task="causal-lm", formatter=None, options={}).score(["a"], ["b"])


def test_cli_trains_and_predicts_rewards(tmp_path, tiny_models):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in TRAIN))
    out = tmp_path / "rm"
    runner = CliRunner()
    result = runner.invoke(cli, ["train", "-m", str(tiny_models("llama")), "--data", str(data), "-t", "reward-model",
                                 "--formatter", "preference", "-o", str(out), "--num-train-epochs", "1"])
    assert result.exit_code == 0, result.output
    pred = runner.invoke(cli, ["predict", str(out), "cat indeed blue one.", "cat red blue one."])
    assert pred.exit_code == 0, pred.output
    assert "reward" in pred.output and "cat indeed blue one." in pred.output
    scored = runner.invoke(cli, ["predict", str(out), "--prompt", "tell me about the cat", "cat indeed blue one."])
    assert scored.exit_code == 0 and "completion" in scored.output, scored.output
    bad = runner.invoke(cli, ["train", "-m", str(tiny_models("llama")), "--data", str(data), "-t", "reward-model",
                              "--formatter", "chatml", "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "Traceback" not in bad.output and "chatml" in bad.output


def test_memory_estimate_and_advice_know_the_reward_model():
    from transformers import LlamaConfig

    from finetune_sdk.advice.memory import estimate_for_options, estimated_technique

    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=8000)
    options = {"per_device_train_batch_size": 4, "max_length": 256, "dtype": "float32"}
    frozen = estimate_for_options(config, "reward-model", None, options, device="cpu")
    lora = estimate_for_options(config, "reward-model", None, {**options, "backbone": "lora"}, device="cpu")
    classifier = estimate_for_options(config, "classifier", None, {**options, "per_device_train_batch_size": 8,
                                                                   "num_labels": 1}, device="cpu")
    assert frozen.batch_size == 4 and frozen.total == classifier.total  # both answers of 4 pairs, one output
    assert frozen.trainable_parameters == 256 + 1
    assert lora.trainable_parameters > frozen.trainable_parameters and lora.total > frozen.total
    causal = estimate_for_options(config, "lora", None, {**options, "per_device_train_batch_size": 8}, device="cpu")
    assert lora.parameters < causal.parameters  # no LM head
    assert estimated_technique(finetune_sdk.plugin_manager.get_plugin_host().create("technique", "reward-model")) \
        == "reward-model"
    advice = finetune_sdk.advise(config, task="reward", dataset_rows=2000, memory_bytes=8 * 2**30, device="cpu")
    assert advice.technique == "reward-model" and advice.options["backbone"] == "frozen"
    assert any("Bradley-Terry" in reason for reason in advice.reasons)
    assert "--technique reward-model" in advice.command() and "--backbone frozen" in advice.command()


def test_center_rewards_coefficient_keeps_rewards_near_zero(frozen, tmp_path, tiny_models):
    """TRL's centring term: the same run with center_rewards_coefficient has a mean reward nearer 0."""
    plain = frozen[1].metrics
    centred = Trainer(tiny_models("llama"), technique="reward-model", formatter="preference", learning_rate=3e-2,
                      center_rewards_coefficient=0.5, output_dir=tmp_path / "c", **FAST).fit(TRAIN, HELD_OUT).metrics
    assert abs(centred["mean_reward"]) < abs(plain["mean_reward"]) / 2, (centred, plain)
    assert centred["pairwise_accuracy"] >= 0.9


@pytest.mark.slow  # Flower's import and two rounds: tens of seconds on a loaded CPU
def test_federated_rounds_train_a_reward_model(tmp_path, tiny_models):
    """Two data owners, Flower rounds on an in-process grid: only the head travels; the result is a reward model."""
    pytest.importorskip("flwr")
    from finetune_sdk.federated.job import FederatedJob
    from finetune_sdk.federated.settings import FederatedSettings
    from finetune_sdk.testing.federated import run_in_process

    clients = {}
    for i, name in enumerate(["clinic-a", "clinic-b"]):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in TRAIN[i * 24:(i + 1) * 24]))
        clients[name] = (str(path), None)
    job = FederatedJob(str(tiny_models("llama")), "reward-model", None, "preference",
                       {"learning_rate": 3e-2, "seed": 7, "per_device_train_batch_size": 8},
                       FederatedSettings(rounds=2, local_epochs=3).validate(2), str(tmp_path / "fed"),
                       expected_clients=sorted(clients), run_token="test")
    manifest = run_in_process(job, clients)
    assert manifest["technique"] == "reward-model" and manifest["task"] == "reward"
    from finetune_sdk.federated.params import NPY_HEADER_BYTES

    head_bytes = (64 + 1) * 4 + 2 * NPY_HEADER_BYTES  # the head's weight [1, 64] and bias [1], float32
    assert manifest["federated"]["history"][0]["clients"]["clinic-a"]["bytes_sent"] == head_bytes
    assert finetune_sdk.load(tmp_path / "fed").evaluate(HELD_OUT)["pairwise_accuracy"] >= 0.9

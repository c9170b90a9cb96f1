"""GRPO (issue 15): online RL against reward functions, plugin reward functions, reward errors, resume after SIGKILL.

The task is learnable in a second: a word-level tokenizer of 16 tokens, prompts of two words, completions of at
most 4 tokens, and a verifiable reward (1 when the completion contains the word "cat")."""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap

import pytest

import finetune_sdk
from finetune_sdk import Stage, Trainer
from finetune_sdk.errors import ConfigError
from finetune_sdk.objectives.reward_functions import RewardError

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
WORDS = ["user", "assistant", "system", "red", "blue", "green", "sun", "moon", "dog", "cat"]
PAIRS = list(itertools.product(["red", "blue", "green", "sun", "moon", "dog"], repeat=2))
random.Random(0).shuffle(PAIRS)
TRAIN = [{"prompt": f"{a} {b}"} for a, b in PAIRS[:24]]
HELD_OUT = [{"prompt": f"{a} {b}"} for a, b in PAIRS[24:]]
FAST = dict(num_generations=8, max_completion_length=4, per_device_train_batch_size=4, max_length=32,
            logging_steps=2, save_steps=0, progress=False)


def has_cat(prompts, completions, **columns):
    """1.0 when the completion contains the word "cat"."""
    return [1.0 if "cat" in completion.split() else 0.0 for completion in completions]


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])


@pytest.fixture(scope="module")
def word_model(tmp_path_factory):
    """A tiny Llama over the 16-word vocabulary, saved as a model folder."""
    from finetune_sdk.testing.tiny import tiny_model

    folder = tmp_path_factory.mktemp("word-llama")
    tokenizer = word_tokenizer()
    model = tiny_model("llama", tokenizer, seed=3)  # its greedy answers never say "cat"
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def greedy_reward(trainer):
    answers = trainer.generate([row["prompt"] for row in HELD_OUT], max_new_tokens=4)
    return sum(has_cat(None, answers)) / len(answers)


@pytest.mark.parametrize("technique, learning_rate", [("lora", 2e-2), ("full", 3e-3),
                                                     pytest.param("qlora", 2e-2, marks=pytest.mark.slow)])
def test_grpo_with_a_verifiable_reward_raises_the_greedy_reward_on_held_out_prompts(word_model, tmp_path, technique,
                                                                                      learning_rate):
    trainer = Trainer(word_model, technique=technique, formatter="prompt", output_dir=tmp_path / "run",
                      reward_funcs=[has_cat], max_steps=24, learning_rate=learning_rate, **FAST)
    before = greedy_reward(trainer)
    result = trainer.fit(TRAIN, eval_data=HELD_OUT)
    after = greedy_reward(trainer)
    assert before == 0.0 and after >= 0.9, (before, after)
    assert result.manifest["objective"] == "grpo" and result.manifest["formatter"] == "prompt"
    assert result.manifest["options"]["reward_funcs"] == [f"{__name__}.has_cat"]
    assert result.metrics["eval_reward_start"] == pytest.approx(before)  # greedy completions of the start policy
    assert result.metrics["eval_reward"] == pytest.approx(after) and result.metrics["eval_rows_scored"] == 12
    during = [entry["eval_reward"] for entry in result.log_history if "eval_reward" in entry]
    assert len(during) == 4 and during[-1] == pytest.approx(after)  # evaluated at the end of each epoch too
    logged = [entry for entry in result.log_history if "loss" in entry]
    assert len(logged) == 12
    for key in ("reward", "reward_std", "kl", "completion_length", "rewards/has_cat", "generated_tokens_per_second",
                "trained_tokens_per_second"):
        assert all(math.isfinite(entry[key]) and entry[key] >= 0 for entry in logged), key
    assert all(entry["generated_tokens_per_second"] > 0 and entry["trained_tokens_per_second"] > 0 for entry in logged)
    assert logged[-1]["reward"] > logged[0]["reward"]  # the sampled completions earn more as the policy learns
    assert 0 < logged[-1]["completion_length"] <= 4 and logged[-1]["kl"] > 0
    assert all(entry["clip_ratio"] == 0 for entry in logged)  # one step per sampled group: the ratio stays 1
    prompts = [row["prompt"] for row in HELD_OUT]  # the saved result answers as the trained model did
    assert finetune_sdk.load(result.output_dir).generate(prompts, max_new_tokens=4) == \
        trainer.generate(prompts, max_new_tokens=4)


def test_num_iterations_optimises_each_sampled_group_several_times_within_the_clip(word_model, tmp_path):
    sampled = []

    def counting_has_cat(prompts, completions, **columns):
        sampled.append(len(completions))
        return has_cat(prompts, completions)

    trainer = Trainer(word_model, technique="lora", formatter="prompt", output_dir=tmp_path / "run",
                      reward_funcs=[counting_has_cat], num_iterations=2, max_steps=24, learning_rate=2e-2,
                      **{**FAST, "gradient_accumulation_steps": 2, "per_device_train_batch_size": 2})
    result = trainer.fit(TRAIN)
    # 24 steps, each step's 2 x 2 prompts sampled at once (TRL's generation batch), each used on 2 steps
    assert sampled == [2 * 2 * 8] * 12
    logged = [entry for entry in result.log_history if "loss" in entry]
    assert any(entry["clip_ratio"] > 0 for entry in logged)  # the second step on a group moved past the clip
    assert greedy_reward(trainer) >= 0.9


def test_the_reference_is_the_policy_when_grpo_starts_even_after_an_sft_stage(word_model, tmp_path):
    """A GRPO stage with learning_rate=0 after SFT never moves: KL to its reference (the SFT policy, not the base
    with the adapter disabled) is exactly 0, and the reward of the policy is unchanged."""
    sft = [{"prompt": row["prompt"], "completion": "dog dog"} for row in TRAIN]
    trainer = Trainer(word_model, technique="lora", output_dir=tmp_path / "run", reward_funcs=[has_cat],
                      learning_rate=5e-2, **{**FAST, "max_steps": 6})
    result = trainer.fit([Stage(sft, formatter="chatml"), Stage(TRAIN, eval_data=HELD_OUT, learning_rate=0)])
    grpo = result.stages[1]
    assert grpo.manifest["objective"] == "grpo"
    logged = [entry for entry in grpo.log_history if "loss" in entry]
    assert logged and all(entry["kl"] == pytest.approx(0.0, abs=1e-6) for entry in logged)
    assert grpo.metrics["eval_reward"] == grpo.metrics["eval_reward_start"]


def test_reward_functions_from_a_plugin_through_the_hook(install, word_model, tmp_path):
    from tests.test_plugins import FakeEntryPoint, plugin_module

    from finetune_sdk.cli.plugins_command import plugin_report
    from finetune_sdk.testing import RewardFunctionContract

    def register_reward_functions(register):
        register(has_cat)
        register(lambda prompts, completions, **columns: [float(len(c)) for c in completions], name="length")

    host = install(FakeEntryPoint("rewards", lambda: plugin_module(
        "finetune_sdk_rewards", register_reward_functions=register_reward_functions), "finetune-sdk-rewards"))
    assert host.names("reward") == ["has_cat", "length"]
    rows = {r["name"]: r for r in plugin_report()["rewards"]}
    assert rows["has_cat"]["distribution"] == "finetune-sdk-rewards"
    assert rows["has_cat"]["description"].startswith("1.0 when the completion")

    class TestHasCat(RewardFunctionContract):
        name = "has_cat"

    contract = TestHasCat()
    contract.test_registered_as_a_function()
    contract.test_returns_one_finite_float_per_completion()

    trainer = Trainer(word_model, technique="lora", output_dir=tmp_path / "run", reward_funcs=["has_cat", "length"],
                      reward_weights=[2.0, 0.0], max_steps=24, learning_rate=2e-2, **FAST)
    result = trainer.fit(TRAIN)
    assert result.manifest["options"]["reward_funcs"] == ["has_cat", "length"]
    for entry in (e for e in result.log_history if "reward" in e):  # the total is the weighted sum
        assert entry["reward"] == pytest.approx(2 * entry["rewards/has_cat"]) and entry["rewards/length"] > 0
    assert greedy_reward(trainer) >= 0.9
    with pytest.raises(ConfigError, match="unknown reward 'has_cats'.*has_cat"):
        Trainer(word_model, output_dir=tmp_path / "typo", reward_funcs=["has_cats"], **FAST).fit(TRAIN)


def test_cli_trains_with_reward_names_and_refuses_an_unknown_one_in_one_line(install, word_model, tmp_path):
    from click.testing import CliRunner
    from tests.test_plugins import FakeEntryPoint, plugin_module

    from finetune_sdk.cli import cli

    install(FakeEntryPoint("rewards", lambda: plugin_module(
        "finetune_sdk_rewards", register_reward_functions=lambda register: register(has_cat))))
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in TRAIN))
    args = ["train", "--model", str(word_model), "--data", str(data), "--num-generations", "4",
            "--max-completion-length", "4", "--max-length", "32", "--max-steps", "2", "--save-steps", "0"]
    runner = CliRunner()
    result = runner.invoke(cli, [*args, "--reward", "has_cat", "-o", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "run" / "finetune_manifest.json").read_text())
    assert manifest["objective"] == "grpo" and manifest["options"]["reward_funcs"] == ["has_cat"]
    assert manifest["options"]["num_generations"] == 4

    bad = runner.invoke(cli, [*args, "--reward", "has_cats", "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    assert bad.output.strip().splitlines() == [
        "Error: unknown reward 'has_cats' (did you mean 'has_cat'?); available: has_cat"]
    assert not (tmp_path / "bad").exists()

    listed = runner.invoke(cli, ["plugins"])
    assert listed.exit_code == 0 and "reward functions" in listed.output and "has_cat" in listed.output

    advice = runner.invoke(cli, ["advise", str(word_model), "--num-generations", "8", "--seq-len", "32",
                                 "--memory", "8GiB", "--json"])
    assert advice.exit_code == 0, advice.output
    assert json.loads(advice.output)["options"]["num_generations"] == 8


@pytest.mark.parametrize("bad, message", [
    (lambda prompts, completions: [1.0] * 3, "reward function 'short' returned 3 rewards for 8 completions; it must "
                                              "return one float per completion"),
    (lambda prompts, completions: [math.nan] * len(completions), "reward function 'short' returned nan for "
                                                                  "completion 0"),
    (lambda prompts, completions: 1 / 0, "reward function 'short' raised ZeroDivisionError: division by zero"),
])
def test_a_bad_reward_function_is_one_clear_line_naming_it_and_leaves_no_result(word_model, tmp_path, bad, message):
    bad.__name__ = "short"
    trainer = Trainer(word_model, output_dir=tmp_path / "run", reward_funcs=[has_cat, bad], max_steps=2,
                      **{**FAST, "per_device_train_batch_size": 1})
    with pytest.raises(RewardError) as error:
        trainer.fit(TRAIN)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()


def test_grpo_without_a_reward_or_with_a_missing_reward_model_is_refused_before_the_model_loads(word_model, tmp_path,
                                                                                                 monkeypatch):
    from finetune_sdk.models import sources as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match="GRPO needs a reward: pass reward_funcs="):
        Trainer(word_model, output_dir=tmp_path / "a", **FAST).fit(TRAIN)
    with pytest.raises(ConfigError, match="reward_model .*no-such-rm"):
        Trainer(word_model, output_dir=tmp_path / "b", reward_model=str(tmp_path / "no-such-rm"), **FAST).fit(TRAIN)
    with pytest.raises(ConfigError, match="option 'num_generations' must be at least 2"):
        Trainer(word_model, reward_funcs=[has_cat], num_generations=1)
    with pytest.raises(ConfigError, match=r"reward_weights has 2 finite weight\(s\) for 1 reward\(s\)"):
        Trainer(word_model, output_dir=tmp_path / "d", reward_funcs=[has_cat], reward_weights=[1, 2], **FAST).fit(TRAIN)
    with pytest.raises(ConfigError, match="max_length .* must exceed max_completion_length"):
        Trainer(word_model, output_dir=tmp_path / "c", reward_funcs=[has_cat],
                **{**FAST, "max_completion_length": 64}).fit(TRAIN)


RESUME_SCRIPT = """
import sys
from finetune_sdk import Trainer

def has_cat(prompts, completions, **columns):
    return [1.0 if "cat" in c.split() else 0.0 for c in completions]

rows = {rows!r}
Trainer({model!r}, technique="lora", output_dir=sys.argv[1], reward_funcs=[has_cat], max_steps=12,
        save_steps={save_steps}, num_iterations={num_iterations}, learning_rate=2e-2, seed=3, num_generations=8,
        max_completion_length=4, per_device_train_batch_size=4, max_length=32, logging_steps=2, lora_dropout=0.1,
        progress=False).fit(rows, resume=sys.argv[2] == "resume")
"""


@pytest.mark.slow
@pytest.mark.parametrize("num_iterations, save_steps", [(1, 5), (2, 4)])
def test_a_killed_grpo_run_resumes_to_the_uninterrupted_weights(word_model, tmp_path, num_iterations, save_steps):
    """Same weights within 1e-6: the seed fixes the data order and the first samples, and every checkpoint holds
    the torch RNG state the completions are sampled from (and LoRA dropout, off while GRPO trains, draws nothing),
    so the resumed run samples exactly the completions the uninterrupted one did. With num_iterations=2 and
    save_steps a multiple of it, every checkpoint falls at the start of a sampled group."""
    import torch
    from safetensors.torch import load_file

    script = tmp_path / "grpo_run.py"
    script.write_text(textwrap.dedent(RESUME_SCRIPT.format(rows=TRAIN, model=str(word_model), save_steps=save_steps,
                                                           num_iterations=num_iterations)))

    def run(out, crash_at=None, resume=False):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("FINETUNE_SDK_CRASH_AT_STEP", None)
        if crash_at:
            env["FINETUNE_SDK_CRASH_AT_STEP"] = str(crash_at)
        return subprocess.run([sys.executable, str(script), str(out), "resume" if resume else "fresh"], env=env,
                              capture_output=True, text=True, timeout=600)

    reference = run(tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-2000:]
    out = tmp_path / "crashed"
    assert run(out, crash_at=7).returncode == -signal.SIGKILL
    assert not out.exists()
    resumed = run(out, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"checkpoint-{save_steps}" in resumed.stderr and "sampling afresh" not in resumed.stderr
    expected, actual = (load_file(str(p / "adapter_model.safetensors")) for p in (tmp_path / "reference", out))
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.allclose(expected[key], actual[key], atol=1e-6), (key, (expected[key] - actual[key]).abs().max())
    def rewards(folder):  # the logged means after step 6 (step 6's mean spans the checkpoint at step 5)
        return {e["step"]: e["reward"] for e in json.loads((folder / "training_log.json").read_text())
                if "reward" in e and e["step"] > 6}

    assert rewards(out) == rewards(tmp_path / "reference") and len(rewards(out)) == 3


def test_memory_estimate_and_advice_know_grpo_groups_and_the_reference():
    from transformers import LlamaConfig

    from finetune_sdk.advice.advisor import advise
    from finetune_sdk.advice.memory import estimate_for_options, estimate_training_memory

    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=8000)
    sft = estimate_training_memory(config, technique="full", batch_size=2, seq_len=128, chunked_loss=False)
    grpo = estimate_training_memory(config, technique="full", batch_size=2, seq_len=128, num_generations=8,
                                    reference_weights=True)
    assert grpo.activations > 6 * sft.activations  # 16 sequences instead of 2
    assert grpo.weights == sft.weights + grpo.trainable_parameters * 4  # the reference's copy of every weight
    assert any("2 prompt(s) x 8 completions = 16 sequences" in note for note in grpo.notes)
    options = {"per_device_train_batch_size": 2, "max_length": 128, "dtype": "float32", "num_generations": 8,
               "beta": 0.04}
    assert estimate_for_options(config, "full", None, options, objective="grpo", device="cpu").total == grpo.total
    assert estimate_for_options(config, "full", None, {**options, "beta": 0.0}, objective="grpo",
                                device="cpu").weights == sft.weights

    advice = advise(config, memory_bytes=64 * 2**30, device="cpu", seq_len=128, num_generations=8)
    assert advice.options["num_generations"] == 8
    assert advice.options["per_device_train_batch_size"] * advice.options["gradient_accumulation_steps"] == 2
    assert any(reason.startswith("GRPO samples 8 completions per prompt") for reason in advice.reasons)


def test_grpo_against_a_trained_pairwise_reward_model_raises_its_preference(word_model, tiny_models, tmp_path):
    """The reward model (issue 15's pairwise Bradley-Terry model, on another tokenizer) learnt to prefer answers
    with "cat"; GRPO against it, scored through ``finetune_sdk.load(ref).score``, raises both its score and the
    share of greedy held-out answers that say "cat"."""
    rng = random.Random(5)

    def answer(cat):
        words = [rng.choice(WORDS[:-1]) for _ in range(rng.randint(1, 4))]
        if cat:
            words[rng.randrange(len(words))] = "cat"
        return " ".join(words)

    pairs = [{"prompt": rng.choice(TRAIN)["prompt"], "chosen": answer(True), "rejected": answer(False)}
             for _ in range(64)]
    judge = Trainer(tiny_models("llama"), technique="reward-model", formatter="preference", backbone="lora", r=4,
                    target_modules=["q_proj", "v_proj"], output_dir=tmp_path / "rm", learning_rate=1e-2,
                    per_device_train_batch_size=8, num_train_epochs=6, save_steps=0, progress=False,
                    seed=0).fit(pairs[:48], eval_data=pairs[48:])
    assert judge.metrics["pairwise_accuracy"] >= 0.9

    trainer = Trainer(word_model, technique="lora", formatter="prompt", output_dir=tmp_path / "run",
                      reward_model=str(tmp_path / "rm"), max_steps=24, learning_rate=2e-2, **FAST)
    prompts = [row["prompt"] for row in HELD_OUT]
    scorer = finetune_sdk.load(tmp_path / "rm")
    before = trainer.generate(prompts, max_new_tokens=4)
    result = trainer.fit(TRAIN, eval_data=HELD_OUT)
    after = trainer.generate(prompts, max_new_tokens=4)
    assert sum(scorer.score(prompts, after)) > sum(scorer.score(prompts, before))
    assert sum(has_cat(None, after)) / len(after) >= 0.75 > sum(has_cat(None, before)) / len(before)
    assert result.metrics["eval_reward"] > result.metrics["eval_reward_start"]
    assert result.manifest["options"]["reward_model"] == str(tmp_path / "rm")
    assert any(key.startswith("rewards/reward_model:") for key in result.log_history[0])


def test_the_progress_line_shows_the_mean_reward():
    from types import SimpleNamespace

    from finetune_sdk.training.callbacks import RichProgressCallback

    progress = RichProgressCallback(tokens_per_step=100)
    progress.on_log(None, SimpleNamespace(global_step=3, max_steps=10), None, logs={"loss": 0.01, "reward": 0.625})
    assert "loss 0.0100  reward 0.625" in progress.stats(3, 10)


def test_grpo_speed_times_sampling_apart_from_training(monkeypatch):
    """Generated tokens / sampling seconds and trained tokens / the other seconds, reset at each log (issue 23)."""
    from types import SimpleNamespace

    import torch

    from finetune_sdk.objectives import grpo_loss
    from finetune_sdk.training.callbacks import RichProgressCallback

    clock = iter([0.0, 1.0, 3.0, 10.0, 10.0])  # start; sampling from 1 to 3 (2 s); the log at 10: 8 s training
    monkeypatch.setattr(grpo_loss.time, "perf_counter", lambda: next(clock))  # the time module: for both
    speed = grpo_loss.GRPOSpeed()
    group = SimpleNamespace(group=SimpleNamespace(completion_mask=torch.ones(4, 5)))
    assert speed.timed_sampling(lambda: [group, group]) == [group, group]
    speed.trained += 700
    assert speed.rates() == {"generated_tokens_per_second": 40 / 2, "trained_tokens_per_second": 700 / 8}
    assert (speed.generated, speed.trained, speed.sampling, speed.since) == (0, 0, 0.0, 10.0)
    monkeypatch.setattr(grpo_loss.time, "perf_counter", lambda: 30.0)
    progress = RichProgressCallback(tokens_per_step=100)
    progress.on_log(None, SimpleNamespace(global_step=3, max_steps=10), None,
                    logs={"loss": 0.01, "reward": 0.5, "generated_tokens_per_second": 20.0,
                          "trained_tokens_per_second": 100.0})
    progress.start = 0.0
    line = progress.stats(3, 10)
    assert "generated 20 tok/s  trained 100 tok/s" in line and "  3 tok/s" not in line

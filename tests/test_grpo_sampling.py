"""Issue 22, kind 3: GRPO samples from exactly the distribution its loss assumes.

A base whose generation_config.json carries sampling settings (a repetition penalty, top-k, no_repeat_ngram_size,
min_new_tokens, banned words, another temperature) trains exactly as the same base without them; TRL's sampling
options, when stated, are both what generate samples from and what the loss scores; user-facing generation keeps
the model's chat defaults but not over the SDK's stop and length."""

from __future__ import annotations

import json
import shutil

import pytest

from finetune_sdk import Trainer
from finetune_sdk.errors import ConfigError
from finetune_sdk.models.sampling import SamplingSettings, only_these_settings
from tests.test_grpo import FAST, TRAIN, word_tokenizer


def hostile_generation_config(tokenizer) -> dict:
    """Everything a model's generation_config.json may carry that changes what generate samples."""
    cat, dog = tokenizer.convert_tokens_to_ids("cat"), tokenizer.convert_tokens_to_ids("dog")
    return {"do_sample": False, "temperature": 0.3, "top_k": 2, "top_p": 0.5, "typical_p": 0.6,
            "repetition_penalty": 1.8, "no_repeat_ngram_size": 1, "min_new_tokens": 3, "min_length": 12,
            "bad_words_ids": [[cat]], "suppress_tokens": [dog], "max_length": 6, "max_new_tokens": 1,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


@pytest.fixture(scope="module")
def twin_models(tmp_path_factory):
    """The same tiny Llama twice: as saved, and with a hostile generation_config.json."""
    from finetune_sdk.testing.tiny import tiny_model

    plain = tmp_path_factory.mktemp("plain")
    tokenizer = word_tokenizer()
    model = tiny_model("llama", tokenizer, seed=3)
    model.save_pretrained(plain, safe_serialization=True)
    tokenizer.save_pretrained(plain)
    (plain / "generation_config.json").unlink(missing_ok=True)
    hostile = tmp_path_factory.mktemp("hostile")
    for path in plain.iterdir():
        shutil.copy(path, hostile / path.name)
    (hostile / "generation_config.json").write_text(json.dumps(hostile_generation_config(tokenizer)))
    return plain, hostile


def train_and_record(model_dir, out, **options):
    import torch
    from safetensors.torch import load_file

    seen = []

    def has_cat(prompts, completions, **columns):
        seen.append(list(completions))
        return [1.0 if "cat" in c.split() else 0.0 for c in completions]

    result = Trainer(model_dir, technique="lora", formatter="prompt", output_dir=out, reward_funcs=[has_cat],
                     learning_rate=2e-2, **{**FAST, "max_steps": 4, "logging_steps": 1, **options}).fit(TRAIN[:8])
    logged = [(e["loss"], e["kl"], e["reward"]) for e in result.log_history if "loss" in e]
    weights = load_file(str(out / "adapter_model.safetensors"))
    return seen, logged, {k: v.to(torch.float32) for k, v in weights.items()}


@pytest.mark.parametrize("options", [{}, {"temperature": 0.7, "top_k": 6, "top_p": 0.95, "min_p": 0.02,
                                          "repetition_penalty": 1.3, "num_iterations": 2}],
                         ids=["defaults", "stated-sampling-options"])
def test_a_hostile_generation_config_trains_exactly_as_none(twin_models, tmp_path, options):
    import torch

    plain, hostile = twin_models
    completions, losses, weights = train_and_record(plain, tmp_path / "plain", **options)
    hostile_completions, hostile_losses, hostile_weights = train_and_record(hostile, tmp_path / "hostile", **options)
    assert hostile_completions == completions  # the same samples, token for token
    assert any("cat" in c.split() for batch in completions for c in batch)  # bad_words_ids would have banned it
    assert max(len(c.split()) for batch in completions for c in batch) > 1  # max_new_tokens=1 would have cut it
    assert hostile_losses == losses and len(losses) == 4
    assert weights.keys() == hostile_weights.keys()
    assert all(torch.equal(weights[k], hostile_weights[k]) for k in weights)
    if options:
        assert [step[1] for step in losses][0] == 0.0  # the first group's reference is the sampling policy itself


SETTINGS = [SamplingSettings(), SamplingSettings(temperature=0.7),
            SamplingSettings(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3),
            SamplingSettings(repetition_penalty=0.8), SamplingSettings(top_p=0.5), SamplingSettings(top_k=3),
            SamplingSettings(min_p=0.2, temperature=1.5)]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.describe().items()
                                                                       if v != SamplingSettings().describe()[k])
                         or "defaults")
def test_the_loss_scores_the_distribution_generate_sampled_from(settings):
    """The log-probabilities of the loss (one forward pass, processors replayed) equal those of generate's own
    processed scores at every sampled token (left-padded prompts of different lengths, so the repetition penalty's
    prompt excludes the padding)."""
    import torch

    from finetune_sdk.objectives.grpo_training import left_padded
    from finetune_sdk.objectives.grpo_loss import completion_logps
    from finetune_sdk.testing.tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model("llama", tok, seed=1).eval()
    prompts = [tok("hello world how are you")["input_ids"], tok("the cat")["input_ids"]] * 2
    ids, mask = left_padded(prompts, tok.pad_token_id, "cpu")
    config = settings.generation_config(max_new_tokens=12, stop_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
    config.output_scores = config.return_dict_in_generate = True
    torch.manual_seed(0)
    with torch.no_grad(), only_these_settings(model, config):
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    completion = out.sequences[:, ids.shape[1]:]
    scores = torch.stack(out.scores, 1).float()
    sampled = torch.log_softmax(scores, -1).gather(2, completion.unsqueeze(-1)).squeeze(-1)
    is_eos = (completion == tok.eos_token_id).int()
    valid = (is_eos.cumsum(1) - is_eos) == 0  # up to and including the stop token
    group = type("Group", (), {"prompt_ids": ids, "prompt_mask": mask, "completion_ids": completion,
                               "completion_mask": valid.long()})()
    with torch.no_grad():
        logps = completion_logps(model, group, settings)
    assert valid.sum() >= 30 and torch.isfinite(sampled[valid]).all()
    assert (logps - sampled)[valid].abs().max() < 1e-5


def test_a_token_the_truncation_drops_keeps_its_logit_so_the_loss_stays_finite():
    import torch

    logits = torch.tensor([[[3.0, 1.0, 0.0, -1.0]]])
    one = torch.ones(1, 1, dtype=torch.long)
    kept = SamplingSettings(top_k=1).logps(logits, one, one, torch.tensor([[2]]))
    assert torch.allclose(kept, torch.log_softmax(torch.tensor([3.0, 0.0]), 0)[1:])  # support {top, sampled}
    assert SamplingSettings(top_k=1).logps(logits, one, one, torch.tensor([[0]])).item() == 0.0
    full = SamplingSettings().logps(logits, one, one, torch.tensor([[2]]))
    assert torch.allclose(full, torch.log_softmax(logits[0, 0], 0)[2:3])


@pytest.mark.parametrize("option, value, message", [
    ("top_p", 0, "option 'top_p' must be greater than 0"), ("top_p", 1.5, "option 'top_p' must be at most 1"),
    ("top_k", -1, "option 'top_k' must be at least 0"), ("min_p", 2, "option 'min_p' must be at most 1"),
    ("repetition_penalty", 0, "option 'repetition_penalty' must be greater than 0"),
    ("top_k", 2.5, "option 'top_k' must be int")])
def test_sampling_options_are_checked_before_the_model_loads(tmp_path, option, value, message):
    with pytest.raises(ConfigError, match=message):
        Trainer(tmp_path / "no-model-here", output_dir=tmp_path / "out", **{option: value})


def test_the_manifest_records_the_sampling_options(twin_models, tmp_path):
    plain, _ = twin_models
    def nothing(prompts, completions, **columns):
        return [0.0] * len(completions)

    result = Trainer(plain, technique="lora", formatter="prompt", output_dir=tmp_path / "run", reward_funcs=[nothing],
                     top_k=5, repetition_penalty=1.1, **{**FAST, "max_steps": 1}).fit(TRAIN[:4])
    options = result.manifest["options"]
    assert (options["top_k"], options["top_p"], options["min_p"], options["repetition_penalty"]) == (5, 1.0, None, 1.1)


def test_user_facing_generate_keeps_the_models_chat_defaults_but_the_sdks_stop_and_length(tmp_path):
    """A rating session or a chat gets the model's own repetition_penalty (and top_k when sampling) under the
    call's settings; the model's min_new_tokens/min_length and max_length never hold back the end of turn or cut
    max_new_tokens; generation_settings reports what generate used."""
    from finetune_sdk.feedback.session import answer_settings, collect_feedback
    from finetune_sdk.models.inference import LoadedModel
    from finetune_sdk.plugin_manager import get_plugin_host
    from finetune_sdk.testing.turns import plain_token_ids, scripted_model
    from finetune_sdk.testing.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    a, b = plain_token_ids(tok, 2)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    model = scripted_model(tok, {a: b, b: end}, default=a)
    model.generation_config.update(min_new_tokens=6, min_length=40, max_length=3, repetition_penalty=1.05, top_k=7,
                                   temperature=0.6, do_sample=True)
    loaded = LoadedModel(model, tok, task="causal-lm", formatter=get_plugin_host().create("formatter", "chatml"),
                         options={"max_length": 64})
    assert loaded.generate("hello", max_new_tokens=10) == tok.decode([a, b]).strip()  # stops at <|im_end|>
    assert loaded.generate("hello", max_new_tokens=10, do_sample=True) == tok.decode([a, b]).strip()
    greedy = loaded.generation_settings(max_new_tokens=10)
    assert greedy["do_sample"] is False and greedy["repetition_penalty"] == 1.05 and "top_k" not in greedy
    assert greedy["max_new_tokens"] == 10 and greedy["stop_token_ids"] == [tok.eos_token_id, end]
    sampled = answer_settings(loaded, max_new_tokens=16, temperature=0.8)
    out = tmp_path / "ratings.jsonl"  # the rows of a rating session record them
    collect_feedback(loaded, ["hello"], out, max_new_tokens=16, ask=lambda prompt, answers: True)
    assert sampled == {"do_sample": True, "temperature": 0.8, "max_new_tokens": 16, "top_k": 7,
                       "repetition_penalty": 1.05, "stop_token_ids": [tok.eos_token_id, end]}
    assert json.loads(out.read_text())["sampling"] == {**sampled, "seed": 0}
    model.generation_config.top_k = None  # no top_k of its own: transformers' default, 50, is what samples
    assert answer_settings(loaded, max_new_tokens=16, temperature=0.8)["top_k"] == 50
    assert model.generation_config.min_new_tokens == 6  # the model's own file is left as it was

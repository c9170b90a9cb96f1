"""Issue 22, kind 4: generation stops where the model's turn ends.

Models whose end of turn is not EOS (Llama 3's <|eot_id|>, Gemma's <end_of_turn>, Phi-3's <|end|>) or whose
generation_config lists several EOS ids stop there on every path that generates: generate(), the CLI, rating
sessions and GRPO's sampling (training and evaluation). The models are scripted to say two words and an end token
over and over, so an answer that runs past its turn shows the words again."""

from __future__ import annotations

import pytest

from finetune_sdk.models.inference import LoadedModel
from finetune_sdk.plugin_manager import get_plugin_host
from finetune_sdk.models.stop_tokens import stop_token_ids, template_end_of_turn
from finetune_sdk.testing.turns import plain_token_ids, scripted_model, turn_tokenizer

TURN_ENDS = {"llama3": "<|eot_id|>", "gemma": "<end_of_turn>", "phi3": "<|end|>", "chatml": "<|im_end|>"}


def scripted(chat_format: str, end_token: str | None = None):
    """(tokenizer, model, first, second, end): the model says first, second, end, first, second, end..."""
    tok = turn_tokenizer(chat_format)
    end = tok.convert_tokens_to_ids(end_token or TURN_ENDS[chat_format])
    first, second = plain_token_ids(tok, 2)
    return tok, scripted_model(tok, {first: second, second: end}, default=first), first, second, end


def formatter(name: str):
    return get_plugin_host().create("formatter", name)


@pytest.mark.parametrize("chat_format", ["llama3", "gemma", "phi3"])
def test_the_chat_templates_end_of_turn_is_found_and_is_a_stop_id(chat_format):
    tok = turn_tokenizer(chat_format)
    assert template_end_of_turn(tok) == [TURN_ENDS[chat_format]]
    assert tok.eos_token != TURN_ENDS[chat_format]
    expected = tok.convert_tokens_to_ids([tok.eos_token, TURN_ENDS[chat_format]])
    for name in ("chat-template", "prompt", "preference", "kto"):
        assert stop_token_ids(tok, None, formatter(name)) == expected, name
    assert stop_token_ids(tok) == expected  # no formatter: the tokenizer's own template
    assert stop_token_ids(tok, None, formatter("chatml")) == tok.convert_tokens_to_ids([tok.eos_token, "<|im_end|>"])


def test_templates_that_end_turns_with_eos_or_nothing_give_eos():
    tok = turn_tokenizer("chatml")
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                         "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")  # Mistral's shape
    assert template_end_of_turn(tok) == ["</s>"]
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert template_end_of_turn(tok) == [] and formatter("chat-template").end_of_turn(tok) == ["</s>"]
    tok.chat_template = "{{ raise_exception('only system/user/assistant in turns') }}"
    assert template_end_of_turn(tok) == []


@pytest.mark.parametrize("chat_format", ["llama3", "gemma", "phi3"])
@pytest.mark.parametrize("name", ["chat-template", "prompt"])
def test_generate_stops_at_the_end_of_turn(chat_format, name):
    tok, model, first, second, _ = scripted(chat_format)
    loaded = LoadedModel(model, tok, task="causal-lm", formatter=formatter(name), options={"max_length": 128})
    assert loaded.generate("hello there", max_new_tokens=9) == tok.decode([first, second])
    assert loaded.generate(["hi", "hello there"], max_new_tokens=9, do_sample=True) == [tok.decode([first, second])] * 2


def test_a_list_of_eos_ids_in_the_generation_config_stops_generation():
    """Llama 3 Instruct's generation_config lists <|end_of_text|>, <|eom_id|> and <|eot_id|>: each one stops."""
    tok, model, first, second, eom = scripted("llama3", "<|eom_id|>")
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    model.generation_config.eos_token_id = [tok.eos_token_id, eom, eot]
    loaded = LoadedModel(model, tok, task="causal-lm", formatter=formatter("alpaca"), options={"max_length": 128})
    assert loaded.stop_ids() == [tok.eos_token_id, eom, eot]
    assert loaded.generate("hello there", max_new_tokens=9) == tok.decode([first, second])
    model.generation_config.eos_token_id = tok.eos_token_id
    assert loaded.generate("hello there", max_new_tokens=9) == tok.decode([first, second] * 3)  # no stop: runs on


def test_the_cli_and_a_rating_session_stop_at_the_end_of_turn(tmp_path):
    from click.testing import CliRunner

    from finetune_sdk.cli.main import cli
    from finetune_sdk.feedback.session import collect_feedback

    tok, model, first, second, _ = scripted("gemma")
    folder = tmp_path / "gemma-like"
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    answer = tok.decode([first, second])
    result = CliRunner().invoke(cli, ["generate", str(folder), "hello", "-f", "chat-template", "--max-new-tokens", "9"])
    assert result.exit_code == 0, result.output
    assert answer in result.output and answer + answer not in result.output.replace(" ", "").replace("│", "")
    shown = []
    collect_feedback(str(folder), ["hello", "bye"], tmp_path / "ratings.jsonl", formatter="chat-template",
                     max_new_tokens=9, ask=lambda prompt, answers: shown.extend(answers) or True)
    assert shown == [answer, answer]


def test_grpo_samples_end_at_the_end_of_turn_in_training_and_evaluation(tmp_path):
    """Each completion is the two words and <|eot_id|> (3 tokens, the stop included), in the groups the loss
    trains on and in the greedy evaluation; the rewards see the two words only."""
    from finetune_sdk import Trainer
    from finetune_sdk.objectives.grpo_training import GRPOSettings, sample_completions

    tok, model, first, second, eot = scripted("llama3")
    prompt_formatter = formatter("prompt")
    settings = GRPOSettings(max_completion_length=8, stop_ids=tuple(stop_token_ids(tok, model, prompt_formatter)))
    from finetune_sdk.data.encoding import encode_segments

    ids = encode_segments(prompt_formatter.prompt_segments("hello", tok, {}), tok, None)["input_ids"]
    group = sample_completions(model, [ids, ids[:-1]], tok, settings)
    assert group.completion_mask.sum(1).tolist() == [3, 3]
    assert group.completion_ids[0, :3].tolist() == [first, second, eot]
    assert group.texts == [tok.decode([first, second])] * 2

    folder = tmp_path / "llama3-like"
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    seen = []

    def record(prompts, completions, **columns):
        seen.extend(completions)
        return [float(len(c)) for c in completions]

    rows = [{"prompt": p} for p in ("red sun", "blue moon", "green dog", "a cat")]
    result = Trainer(folder, technique="lora", formatter="prompt", output_dir=tmp_path / "run", reward_funcs=[record],
                     num_generations=2, max_completion_length=8, per_device_train_batch_size=2, max_length=64,
                     max_steps=2, learning_rate=0.0, logging_steps=1, save_steps=0, progress=False).fit(
        rows, eval_data=rows[:2])
    assert set(seen) == {tok.decode([first, second])} and len(seen) == 2 * 2 * 2 + 2 * 3  # train + 3 evaluations
    logged = [e for e in result.log_history if "completion_length" in e]
    assert [e["completion_length"] for e in logged] == [3.0, 3.0]
    assert result.metrics["eval_completion_length"] == 3.0

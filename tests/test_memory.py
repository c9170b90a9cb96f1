"""The training-memory estimate, the advisor and ``finetune advise``: fast, offline, no model trained."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from finetune_sdk.advice.advisor import BUDGET, advise
from finetune_sdk.cli.advise_command import advise_command
from finetune_sdk.errors import ConfigError
from finetune_sdk.log import known_dependency_warnings
from finetune_sdk.advice.memory import (MemoryEstimate, ModelShape, available_memory, estimate_for_options,
                                 estimate_training_memory, parse_memory)
from finetune_sdk.testing.tiny import tiny_config, tiny_tokenizer

GiB = 2**30


def llama(hidden: int = 512, layers: int = 6, vocab: int = 16000, kv_heads: int = 4) -> object:
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                       num_attention_heads=hidden // 64, num_key_value_heads=kv_heads, vocab_size=vocab)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# -- parameters and weights ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2", "bert"])
def test_parameter_count_matches_a_model_built_from_the_config(family, tok):
    import torch
    import transformers

    config = tiny_config(family, tok, hidden_size=64, layers=3)
    with torch.device("meta"):
        model = transformers.BertModel(config) if family == "bert" else \
            transformers.AutoModelForCausalLM.from_config(config)
    real = sum(p.numel() for p in model.parameters())
    counted = ModelShape.from_config(config).parameter_counts(lm_head=family != "bert")["total"]
    assert abs(counted - real) / real < 0.01, (counted, real)


def test_untied_lm_head_counts_and_the_classifier_drops_it(tok):
    shape = ModelShape.from_config(tiny_config("qwen2", tok))  # the tiny qwen2 config is untied
    with_head, backbone = shape.parameter_counts(lm_head=True), shape.parameter_counts(lm_head=False)
    assert with_head["total"] - backbone["total"] == shape.vocab_size * shape.hidden


def test_storage_formats_order_nf4_int8_bf16_fp32():
    config = llama(hidden=1024, layers=8, vocab=4000)  # linears dominate, as in real models
    weights = {name: estimate_training_memory(config, technique="lora", **kw).weights for name, kw in {
        "nf4": dict(quantizer="nf4"), "int8": dict(quantizer="int8"), "bf16": dict(dtype="bfloat16"),
        "fp32": dict(dtype="float32")}.items()}
    assert weights["nf4"] < weights["int8"] < weights["bf16"] < weights["fp32"]
    assert weights["fp32"] == pytest.approx(2 * weights["bf16"])


def test_nf4_weights_match_what_bitsandbytes_stores(tmp_path, tok):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from finetune_sdk.testing.tiny import save_tiny_model

    folder = save_tiny_model(tmp_path / "m", "llama", hidden_size=128, layers=2)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, device_map="cpu",
                                                 dtype=torch.float32)
    stored = sum(p.numel() * p.element_size() for p in model.parameters())
    stored += sum(getattr(p, "quant_state", None).absmax.numel() for p in model.parameters()
                  if getattr(p, "quant_state", None) is not None)
    estimated = estimate_training_memory(model.config, technique="qlora").weights
    assert estimated == pytest.approx(stored, rel=0.05)


def test_lora_adapter_size_matches_peft(tok):
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    config = tiny_config("llama", tok, hidden_size=64, layers=2)
    for r, targets, peft_targets in ((8, "attention", None), (64, "all-linear", "all-linear")):
        torch.manual_seed(0)
        with known_dependency_warnings():
            model = get_peft_model(transformers.AutoModelForCausalLM.from_config(config),
                                   LoraConfig(r=r, target_modules=peft_targets, task_type="CAUSAL_LM"))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        est = estimate_training_memory(config, technique="lora", lora_r=r, lora_targets=targets)
        assert est.trainable_parameters == trainable


# -- activations, gradients, optimizer --------------------------------------------------------------------------
def test_doubling_the_batch_roughly_doubles_activations():
    config = llama()
    small, large = (estimate_training_memory(config, batch_size=b, seq_len=256, chunked_loss=False) for b in (4, 8))
    assert 1.9 < large.activations / small.activations < 2.1
    assert large.weights == small.weights


def test_the_chunked_loss_drops_the_full_logits_from_the_estimate():
    config = llama(vocab=49152)
    plain, chunked = (estimate_training_memory(config, batch_size=8, seq_len=512, chunked_loss=c) for c in (False, True))
    full_logits = 3 * 8 * 512 * 49152 * 4
    assert plain.activations - chunked.activations > 0.8 * full_logits
    assert estimate_for_options(config, "lora", None, {"chunked_loss": False, "dtype": "float32"}).total > \
        estimate_for_options(config, "lora", None, {"dtype": "float32"}).total


def test_gradient_checkpointing_lowers_activations():
    config = llama(vocab=4000)
    for technique in ("lora", "full"):
        plain, checkpointed = (estimate_training_memory(config, technique=technique, gradient_checkpointing=gc)
                               for gc in (False, True))
        assert checkpointed.activations < 0.5 * plain.activations


def test_adapter_optimizer_states_are_tiny_next_to_full_fine_tuning():
    config = llama()
    lora, full = (estimate_training_memory(config, technique=t) for t in ("lora", "full"))
    assert lora.optimizer < 0.01 * full.optimizer
    assert full.optimizer >= 2 * full.weights  # AdamW: two fp32 states per weight
    assert estimate_training_memory(config, technique="full", optimizer="adamw_8bit").optimizer < full.optimizer / 3


@pytest.mark.parametrize("family,technique,targets,dropout", [
    ("llama", "full", None, 0.0), ("llama", "lora", "attention", 0.05), ("llama", "lora", "all-linear", 0.0),
    ("gpt2", "lora", "attention", 0.0), ("gpt2", "full", None, 0.0)])
def test_saved_activations_match_what_autograd_saves(family, technique, targets, dropout, tok):
    """The per-layer formulas against the tensors autograd really keeps for the backward pass."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    config = tiny_config(family, tok, hidden_size=128, layers=4)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    if technique == "lora":
        with known_dependency_warnings():
            model = get_peft_model(model, LoraConfig(r=8, lora_dropout=dropout, task_type="CAUSAL_LM",
                                                     target_modules=None if targets == "attention" else targets))
        from finetune_sdk.speed.fused_lora import use_fused_lora

        use_fused_lora(model)  # as the run engine does
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    batch, seq = 2, 64
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    traced = sum(seen.values()) - batch * seq * config.vocab_size * 4  # minus the log-softmax output
    shape = ModelShape.from_config(config)
    names = [n for n, _, _ in shape.lora_targets(targets)] if technique == "lora" else []
    saved, _, _ = shape.activation_elements(technique, names, seq, lora_r=8, lora_dropout=dropout)
    assert saved * batch * seq * 4 == pytest.approx(traced, rel=0.08)


def test_classifier_has_no_lm_head_and_trains_only_a_head(tok):
    config = tiny_config("bert", tok)
    est = estimate_training_memory(config, technique="classifier", num_labels=3)
    assert est.trainable_parameters == config.hidden_size * 3 + 3
    with pytest.raises(ConfigError, match="encoder"):
        estimate_training_memory(config, technique="lora")


def test_estimate_is_a_sum_and_shows(tok):
    from finetune_sdk.cli.render import memory_table

    est = estimate_training_memory(llama(), technique="qlora", gradient_checkpointing=True)
    assert isinstance(est, MemoryEstimate)
    assert est.total == sum(est.as_dict()[k] for k in MemoryEstimate.COMPONENTS)
    assert json.loads(json.dumps(est.as_dict()))["total"] == est.total
    assert "GiB" in str(est) or "MiB" in str(est)
    assert memory_table(est).row_count == len(MemoryEstimate.COMPONENTS) + 1


def test_estimate_for_options_maps_sdk_option_names():
    config = llama()
    est = estimate_for_options(config, "lora", "none", {
        "r": 16, "target_modules": ["q_proj", "k_proj"], "per_device_train_batch_size": 2,
        "gradient_checkpointing": True, "dtype": "bfloat16", "optim": "adamw_8bit", "max_length": 256},
        device="cpu")
    direct = estimate_training_memory(config, lora_r=16, lora_targets=["q_proj", "k_proj"], batch_size=2,
                                      seq_len=256, gradient_checkpointing=True, dtype="bfloat16",
                                      optimizer="adamw_8bit")
    assert est.total == direct.total
    qlora = estimate_for_options(config, "qlora", "nf4", {}, 512, device="cpu")
    assert qlora.trainable_parameters == estimate_training_memory(
        config, technique="qlora", lora_r=64, lora_targets="all-linear").trainable_parameters


def test_bad_inputs_are_config_errors():
    with pytest.raises(ConfigError, match="technique"):
        estimate_training_memory(llama(), technique="dora-xl")
    with pytest.raises(ConfigError, match="full"):
        estimate_training_memory(llama(), technique="full", quantizer="nf4")
    with pytest.raises(ConfigError, match="match no layer"):
        estimate_training_memory(llama(), lora_targets=["nonexistent_proj"])


@pytest.mark.parametrize("text,expected", [("8GiB", 8 * GiB), ("8 GB", 8_000_000_000), ("8000MB", 8_000_000_000),
                                           ("512MiB", 512 * 2**20), ("1.5g", 1_500_000_000), ("4096", 4096)])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


def test_available_memory_and_no_torch_at_import():
    assert available_memory("cpu") > 0
    code = ("import sys, finetune_sdk.advice.memory, finetune_sdk.advice.advisor, finetune_sdk.cli.advise_command; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# -- the advisor --------------------------------------------------------------------------------------------------
def test_little_memory_gets_qlora_with_gradient_checkpointing():
    config = llama(hidden=3072, layers=28, vocab=32000)  # 3B-sized: the weights dominate (with the chunked loss)
    kw = dict(batch_size=1, seq_len=2048, device="cuda", dtype="bfloat16")
    qlora_gc = estimate_training_memory(config, technique="qlora", lora_r=64, lora_targets="all-linear",
                                        gradient_checkpointing=True, **kw)
    memory = int(qlora_gc.total / BUDGET) + 2**20
    assert estimate_training_memory(config, technique="qlora", lora_r=64, lora_targets="all-linear",
                                    **kw).total > BUDGET * memory
    assert estimate_training_memory(config, gradient_checkpointing=True, **kw).total > BUDGET * memory
    advice = advise(config, dataset_rows=2000, memory_bytes=memory, device="cuda", seq_len=2048)
    assert (advice.technique, advice.quantizer) == ("qlora", "nf4")
    assert advice.options["gradient_checkpointing"] is True
    assert advice.options["per_device_train_batch_size"] == 1
    assert advice.options["gradient_accumulation_steps"] == 16
    assert any("QLoRA" in r for r in advice.reasons)


def test_plenty_of_memory_gets_lora_at_the_largest_batch():
    advice = advise(llama(), dataset_rows=5000, memory_bytes=64 * GiB, device="cpu")
    assert (advice.technique, advice.quantizer) == ("lora", None)
    assert advice.options["per_device_train_batch_size"] == 16
    assert advice.options["gradient_checkpointing"] is False
    assert advice.estimate.total <= BUDGET * 64 * GiB


def test_classification_gets_the_classifier(tok):
    advice = advise(tiny_config("bert", tok), dataset_rows=800, memory_bytes=8 * GiB, device="cpu",
                    task="classification")
    assert advice.technique == "classifier"
    assert "gradient_checkpointing" not in advice.options
    decoder = advise(llama(), dataset_rows=800, memory_bytes=8 * GiB, device="cpu", task="classification")
    assert decoder.technique == "classifier"


def test_huge_data_and_memory_get_full_fine_tuning_unless_the_base_must_stay():
    config = llama(hidden=256, layers=4, vocab=8000)
    full = advise(config, dataset_rows=1_000_000, memory_bytes=256 * GiB, device="cpu")
    assert full.technique == "full" and full.quantizer is None
    assert any("a lot of data" in r for r in full.reasons)
    kept = advise(config, dataset_rows=1_000_000, memory_bytes=256 * GiB, device="cpu", must_keep_base=True)
    assert kept.technique != "full"
    small = advise(config, dataset_tokens=100_000, memory_bytes=256 * GiB, device="cpu")
    assert small.technique == "lora"


def test_reasons_cover_data_memory_base_and_privacy():
    advice = advise(llama(), dataset_rows=300, memory_bytes=16 * GiB, device="cpu", must_keep_base=True,
                    private_data=True)
    text = " ".join(advice.reasons)
    assert "300 examples" in text and "little data" in text
    assert "of 16.0 GiB RAM" in text
    assert "base model must stay untouched" in text
    assert "nothing leaves" in text and "never publish" in text
    assert json.loads(json.dumps(advice.as_dict()))["technique"] == "lora"
    assert advice.command("./m").startswith("finetune train --model ./m --data train.jsonl --technique lora")


def test_nothing_fits_says_so():
    advice = advise(llama(hidden=2048, layers=22, vocab=32000), dataset_rows=100, memory_bytes=GiB, device="cpu")
    assert not advice.fits and advice.technique == "qlora"
    assert any("more memory" in r for r in advice.reasons)


# -- the command --------------------------------------------------------------------------------------------------
def test_advise_command_prints_a_recommendation(llama_dir):
    result = CliRunner().invoke(advise_command, [str(llama_dir), "--rows", "300", "--memory", "8GiB", "--device",
                                                 "cpu", "--private"])
    assert result.exit_code == 0, result.output
    assert "recommendation" in result.output and "lora" in result.output and "finetune train" in result.output


def test_advise_command_json(llama_dir):
    result = CliRunner().invoke(advise_command, [str(llama_dir), "--tokens", "50000", "--memory", "8000MB",
                                                 "--device", "cpu", "--json", "--keep-base"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["technique"] == "lora" and data["memory_bytes"] == 8_000_000_000
    assert data["estimate"]["total"] > 0 and data["reasons"]


@pytest.mark.parametrize("args,message", [(["--memory", "8 bananas"], "--memory"),
                                          (["--memory", "0GB"], "--memory")])
def test_advise_command_bad_memory_exits_2(llama_dir, args, message):
    result = CliRunner().invoke(advise_command, [str(llama_dir), "--device", "cpu", *args])
    assert result.exit_code == 2
    error = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(error) == 1 and message in error[0]


def test_advise_command_missing_model_exits_2():
    result = CliRunner().invoke(advise_command, ["/no/such/model", "--memory", "8GiB", "--device", "cpu"])
    assert result.exit_code == 2
    assert result.output.strip() == "Error: model path /no/such/model does not exist"


# -- the check before training ------------------------------------------------------------------------------------
def test_preflight_refuses_a_run_that_cannot_fit_and_names_settings_that_would(monkeypatch):
    import finetune_sdk.advice.advisor as memory  # the check before a run is the advisor's

    config = llama(hidden=2048, layers=22, vocab=32000)
    options = {"per_device_train_batch_size": 8, "max_length": 1024}
    monkeypatch.setattr(memory, "available_memory", lambda device="auto": 64 * GiB)
    assert memory.preflight(config, "lora", None, options, device="cpu").total < 64 * GiB
    monkeypatch.setattr(memory, "available_memory", lambda device="auto": 6 * GiB)
    with pytest.raises(ConfigError, match="would fit") as error:
        memory.preflight(config, "lora", None, options, device="cpu")
    assert "\n" not in str(error.value) and "gradient_checkpointing=True" in str(error.value)
    monkeypatch.setenv("FINETUNE_SDK_SKIP_MEMORY_CHECK", "1")
    assert memory.preflight(config, "lora", None, options, device="cpu") is not None
    assert memory.preflight(config, "some-plugin-technique", None, options, device="cpu") is None
    assert memory.preflight("/no/such/model", "lora", None, options, device="cpu") is None


def test_the_package_level_advise_stays_a_function(tiny_models):
    import finetune_sdk

    first = finetune_sdk.advise(tiny_models("llama"), dataset_rows=100, memory_bytes=8 * 2**30)
    second = finetune_sdk.advise(tiny_models("llama"), dataset_rows=100, memory_bytes=8 * 2**30)
    assert callable(finetune_sdk.advise) and first.technique == second.technique


def test_trainer_shows_the_estimate_and_fails_early_when_the_job_cannot_fit(tiny_models, tmp_path, monkeypatch,
                                                                          caplog, qa_rows):
    import logging

    import finetune_sdk.advice.advisor as memory  # the check before a run is the advisor's
    from finetune_sdk import Trainer

    caplog.set_level("INFO", logger="finetune_sdk")
    logging.getLogger("finetune_sdk").propagate = True
    trainer = Trainer(tiny_models("llama"), formatter="chatml", output_dir=tmp_path / "ok", max_steps=1,
                      progress=False)
    trainer.fit(qa_rows)
    assert "estimated training memory:" in caplog.text
    monkeypatch.setattr(memory, "available_memory", lambda device="auto": 64 * 2**20)
    refused = Trainer(tiny_models("llama"), formatter="chatml", output_dir=tmp_path / "no", max_steps=1,
                      progress=False)
    with pytest.raises(ConfigError, match="training needs about .* but only 64 MiB of RAM is free"):
        refused.fit(qa_rows)
    assert refused._current_model is None and not (tmp_path / "no").exists()  # before any model was loaded

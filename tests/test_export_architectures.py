"""GGUF export of Qwen3, Gemma 2, Gemma 3, Phi-3 and Llama with RoPE scaling: tiny models built here, written with
``write_gguf`` and read back by transformers' GGUF loader (an implementation this project did not write)."""

from __future__ import annotations

import math

import pytest
import torch

from finetune_sdk.errors import ConfigError
from finetune_sdk.testing.tiny import tiny_tokenizer
from finetune_sdk.testing.tiny_sentencepiece import tiny_sentencepiece_tokenizer

gguf = pytest.importorskip("gguf")

F32_LOGIT_BOUND = 1e-4
F16_LOGIT_BOUND = 1e-2
TEXTS = ["plain ascii text, the cat sat.", "héllo 日本語 ☃ émojis 🦙", "digits 12345 and 9876543210",
         " leading space", "  two  spaces\tand\ttabs\n\nnewlines", "<s>special<|im_start|>user\nhi<|im_end|></s>"]
PROMPT = "the quick brown fox"


def _gemma_style_tokenizer():
    """The tiny SentencePiece vocabulary as transformers' ``GemmaTokenizer`` (no prefix space), as Gemma ships."""
    from transformers import GemmaTokenizer

    from finetune_sdk.testing.tiny_sentencepiece import _vocab_and_merges

    vocab, merges = _vocab_and_merges(600)
    tok = GemmaTokenizer(vocab=dict(vocab), merges=list(merges), unk_token="<unk>", bos_token="<s>",
                         eos_token="</s>", pad_token="<unk>")
    tok.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tok


def _phi3_style_tokenizer():
    """Phi-3's ``tokenizer.json`` shape: the prefix space and ``▁`` come from the normalizer (Llama 2 legacy)."""
    from tokenizers import normalizers

    tok = tiny_sentencepiece_tokenizer()
    tok.backend_tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                                             normalizers.Replace(" ", "\u2581")])
    tok.backend_tokenizer.pre_tokenizer = None
    return tok


TOKENIZERS = {"bpe": tiny_tokenizer, "gemma": _gemma_style_tokenizer, "phi3": _phi3_style_tokenizer}


def _config(family: str, tokenizer, **overrides):
    import transformers

    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    if family == "qwen3":  # head_dim 128 != hidden/heads, as in every Qwen3 (written as key_length/value_length;
        # transformers' GGUF loader doesn't read key_length and takes Qwen3Config's default, 128)
        return transformers.Qwen3Config(**common, head_dim=128, tie_word_embeddings=True, **overrides)
    if family == "gemma2":  # query_pre_attn_scalar = head_dim, as llama.cpp assumes for Gemma 2 2B/9B
        return transformers.Gemma2Config(**common, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
                                         attn_logit_softcapping=50.0, final_logit_softcapping=30.0, **overrides)
    if family == "gemma3":
        return transformers.Gemma3TextConfig(**common, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
                                             **overrides)
    if family == "phi3":
        return transformers.Phi3Config(**common, original_max_position_embeddings=1024, sliding_window=None,
                                       **overrides)
    if family == "llama":
        return transformers.LlamaConfig(**common, **overrides)
    raise ValueError(family)


def _model(family: str, tokenizer, **overrides):
    import transformers

    torch.manual_seed(0)
    config = _config(family, tokenizer, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # non-trivial norm weights, so the Gemma +1 and the q/k norms are really checked
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def _write_and_reload(tmp_path, model, tokenizer, quantization="f32", **load_kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_sdk.exporting.gguf_file import write_gguf

    path = tmp_path / f"model-{quantization}.gguf"
    summary = write_gguf(model, tokenizer, path, quantization=quantization, name="tiny")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32,
                                                    attn_implementation="eager", **load_kwargs).eval()
    return path, summary, reloaded, AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def _greedy(model, ids, steps=8):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def _fields(path):
    reader = gguf.GGUFReader(path)
    return reader, {key: field.contents() for key, field in reader.fields.items() if not key.startswith("tokenizer")}


FAMILIES = [("qwen3", "bpe"), ("gemma2", "gemma"), ("gemma3", "gemma"), ("phi3", "phi3")]


@pytest.mark.parametrize("family,tokenizer_kind", FAMILIES)
def test_new_architectures_round_trip_through_transformers(tmp_path, family, tokenizer_kind):
    tokenizer = TOKENIZERS[tokenizer_kind]()
    model = _model(family, tokenizer)
    ids = tokenizer(PROMPT + " " + TEXTS[1])["input_ids"]
    path, summary, reloaded, gguf_tokenizer = _write_and_reload(tmp_path, model, tokenizer)
    assert _logits(model, ids).sub(_logits(reloaded, ids)).abs().max().item() <= F32_LOGIT_BOUND
    assert _greedy(model, ids) == _greedy(reloaded, ids)
    for text in TEXTS:
        assert gguf_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"], text
    f16_path, _, f16_model, _ = _write_and_reload(tmp_path, model, tokenizer, quantization="f16")
    assert _logits(model, ids).sub(_logits(f16_model, ids)).abs().max().item() <= F16_LOGIT_BOUND
    reader, fields = _fields(path)
    names = {tensor.name for tensor in reader.tensors}
    arch = summary["architecture"]
    assert fields["general.architecture"] == arch == {"gemma3": "gemma3"}.get(family, family)
    if family == "qwen3":
        assert {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} <= names
        assert fields["qwen3.attention.key_length"] == 128 and "output.weight" not in names
    if family.startswith("gemma"):
        norm = next(t for t in reader.tensors if t.name == "blk.0.attn_norm.weight")
        hf_norm = model.model.layers[0].input_layernorm.weight.detach().numpy()
        assert abs(norm.data - (hf_norm + 1)).max() == 0  # llama.cpp's Gemma norms are stored plus one
        assert fields[f"{arch}.attention.sliding_window"] == 512 and "output.weight" not in names
        assert fields[f"{arch}.attention.key_length"] == 256
    if family == "gemma2":
        assert fields["gemma2.attn_logit_softcapping"] == 50.0 and fields["gemma2.final_logit_softcapping"] == 30.0
    if family == "gemma3":
        assert {"blk.0.attn_q_norm.weight", "blk.0.post_ffw_norm.weight"} <= names
    if family == "phi3":
        assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight"} <= names and "blk.0.attn_q.weight" not in names
        qkv = next(t for t in reader.tensors if t.name == "blk.0.attn_qkv.weight")
        assert tuple(qkv.shape) == (64, 64 + 2 * 32)  # gguf lists dimensions innermost first
        assert fields["phi3.rope.dimension_count"] == 16


def test_llama3_rope_scaling_writes_llama_cpps_rope_freqs(tmp_path):
    """Llama 3.1-style RoPE: the ``rope_freqs`` factors equal transformers' own llama3 frequency ratios.

    transformers' GGUF loader reads neither ``rope_freqs`` nor any RoPE scaling for llama (its reloaded model has
    plain RoPE: the logits differ), so the reloaded model is given the RoPE parameters back; everything else
    (weights, q/k permutations) comes from the file. A small original context makes the scaling matter at the
    test's ~30 positions.
    """
    from transformers import AutoModelForCausalLM
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    tokenizer = tiny_tokenizer()
    model = _model("llama", tokenizer, rope_parameters=rope)
    path, summary, reloaded, _ = _write_and_reload(tmp_path, model, tokenizer, rope_parameters=rope)
    reader, fields = _fields(path)
    freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    assert freqs.tensor_type.name == "F32" and "llama.rope.scaling.type" not in fields
    default = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    expected = (default / scaled).numpy()
    assert len(set(expected.round(4).tolist())) >= 3  # unscaled, smoothed and fully scaled frequencies all occur
    assert abs(freqs.data - expected).max() <= 1e-5 * expected.max()
    ids = tokenizer(PROMPT)["input_ids"] * 6
    assert _logits(model, ids).sub(_logits(reloaded, ids)).abs().max().item() <= F32_LOGIT_BOUND
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    assert _logits(model, ids).sub(_logits(plain, ids)).abs().max().item() > 1e-3  # the scaling is visible here


@pytest.mark.parametrize("rope,expected", [
    ({"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}, {"type": "linear", "factor": 2.0}),
    ({"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 256,
      "beta_fast": 32.0, "beta_slow": 1.0},
     {"type": "yarn", "factor": 4.0, "original_context_length": 256, "yarn_beta_fast": 32.0, "yarn_beta_slow": 1.0}),
])
def test_linear_and_yarn_rope_scaling_go_into_the_metadata(tmp_path, rope, expected):
    from finetune_sdk.exporting.gguf_file import write_gguf

    tokenizer = tiny_tokenizer()
    for family in ("llama", "qwen3"):
        path = tmp_path / f"{family}-{rope['rope_type']}.gguf"
        write_gguf(_model(family, tokenizer, rope_parameters=rope), tokenizer, path, quantization="f32")
        _, fields = _fields(path)
        arch = fields["general.architecture"]
        for key, value in expected.items():
            assert fields[f"{arch}.rope.scaling.{key}"] == (pytest.approx(value) if isinstance(value, float)
                                                              else value), (family, key)
        assert "rope_freqs.weight" not in {t.name for t in gguf.GGUFReader(path).tensors}


def test_linear_rope_scaling_round_trips_when_the_loader_is_told(tmp_path):
    """As for llama3: transformers' loader ignores ``rope.scaling.*`` for llama, so it is handed the parameters."""
    rope = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    tokenizer = tiny_tokenizer()
    model = _model("llama", tokenizer, rope_parameters=rope)
    _, _, reloaded, _ = _write_and_reload(tmp_path, model, tokenizer, rope_parameters=rope)
    ids = tokenizer(PROMPT)["input_ids"] * 6
    assert _logits(model, ids).sub(_logits(reloaded, ids)).abs().max().item() <= F32_LOGIT_BOUND


@pytest.mark.parametrize("family,rope,message", [
    ("llama", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
     "RoPE scaling 'dynamic' of this llama model is not supported; supported: default, linear, yarn, llama3"),
    ("qwen3", {"rope_type": "llama3", "factor": 8.0, "rope_theta": 10000.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
     "RoPE scaling 'llama3' of this qwen3 model is not supported; supported: default, linear, yarn"),
])
def test_unsupported_rope_is_one_line_and_writes_nothing(tmp_path, family, rope, message):
    from finetune_sdk.exporting.gguf_file import write_gguf

    tokenizer = tiny_tokenizer()
    with pytest.raises(ConfigError) as error:
        write_gguf(_model(family, tokenizer, rope_parameters=rope), tokenizer, tmp_path / "x.gguf")
    assert message in str(error.value) and "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_llama3_factors_match_the_formula_at_the_band_edges():
    from transformers import LlamaConfig

    from finetune_sdk.exporting.rope import llama3_rope_factors

    config = LlamaConfig(hidden_size=256, num_attention_heads=2, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    factors = llama3_rope_factors(config)
    wavelengths = [2 * math.pi * 500000.0 ** (2 * i / 128) for i in range(64)]
    for factor, wavelength in zip(factors, wavelengths):
        if wavelength < 8192 / 4:
            assert factor == 1.0
        elif wavelength > 8192:
            assert factor == 8.0
        else:
            smooth = (8192 / wavelength - 1.0) / (4.0 - 1.0)
            assert factor == pytest.approx(1 / ((1 - smooth) / 8.0 + smooth), rel=1e-5)


def test_cli_refuses_an_unsupported_rope_before_loading_the_model(tmp_path):
    """From the base's config.json, before any weights load: one line, exit 2, nothing written."""
    from click.testing import CliRunner

    from finetune_sdk import Trainer
    from finetune_sdk.cli import cli

    tokenizer = tiny_tokenizer()
    base = tmp_path / "base"
    _model("llama", tokenizer, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
           ).save_pretrained(base, safe_serialization=True)
    tokenizer.save_pretrained(base)
    result = Trainer(base, technique="lora", output_dir=tmp_path / "run", num_train_epochs=1, progress=False,
                     max_steps=1).fit([{"prompt": "a", "completion": "b"}] * 4).output_dir
    out = CliRunner().invoke(cli, ["export", str(result), "--out", str(tmp_path / "gguf")])
    assert out.exit_code == 2 and not (tmp_path / "gguf").exists()
    lines = out.output.strip().splitlines()
    assert len(lines) == 1 and "RoPE scaling 'dynamic'" in lines[0] and "convert_hf_to_gguf.py" in lines[0]


@pytest.mark.parametrize("family,tokenizer_kind,targets", [
    ("qwen3", "bpe", ["q_proj", "k_proj", "v_proj", "down_proj"]),
    pytest.param("phi3", "phi3", ["qkv_proj", "gate_up_proj", "o_proj"], marks=pytest.mark.slow),
    pytest.param("gemma2", "gemma", ["q_proj", "v_proj", "down_proj"], marks=pytest.mark.slow),
])
def test_lora_on_a_new_architecture_exports_merged_and_adapter_only(tmp_path, family, tokenizer_kind, targets):
    """Trained with LoRA through the SDK: the merged f32 export reloads with the merged model's logits, and the
    adapter-only files (base + alpha / r * B @ A, fused Phi-3 matrices included) equal the merged export."""
    import numpy as np

    import finetune_sdk
    from finetune_sdk import Trainer

    tokenizer = TOKENIZERS[tokenizer_kind]()
    base = tmp_path / "base"
    _model(family, tokenizer).save_pretrained(base, safe_serialization=True)
    tokenizer.save_pretrained(base)
    rows = [{"prompt": f"what is {a} plus {b}?", "completion": f"{a} plus {b} is {a + b}."} for a in range(3)
            for b in range(3)]
    result = Trainer(base, technique="lora", output_dir=tmp_path / "run", num_train_epochs=1, learning_rate=5e-2,
                     progress=False, dtype="float32", target_modules=targets, formatter="chatml").fit(rows).output_dir
    merged = finetune_sdk.export(result, tmp_path / "merged", quantization="f32")
    from transformers import AutoModelForCausalLM

    expected = finetune_sdk.load(result, quantized=False).model.merge_and_unload().eval()
    reloaded = AutoModelForCausalLM.from_pretrained(merged.directory, gguf_file=merged.gguf_path.name,
                                                    dtype=torch.float32, attn_implementation="eager").eval()
    ids = tokenizer(PROMPT)["input_ids"]
    assert _logits(expected, ids).sub(_logits(reloaded, ids)).abs().max().item() <= F32_LOGIT_BOUND
    done = finetune_sdk.export(result, tmp_path / "adapter", quantization="f32", adapter_only=True)

    def tensors(path):
        return {t.name: np.asarray(t.data, dtype=np.float32) for t in gguf.GGUFReader(path).tensors}

    lora, base_tensors, merged_tensors = tensors(done.files["adapter"]), tensors(done.files["base"]), tensors(
        merged.gguf_path)
    alpha = gguf.GGUFReader(done.files["adapter"]).fields["adapter.lora.alpha"].contents()
    adapted = [name.removesuffix(".lora_a") for name in lora if name.endswith(".lora_a")]
    assert len(adapted) == 2 * len(targets)
    for name in adapted:
        a, b = lora[name + ".lora_a"], lora[name + ".lora_b"]
        applied = base_tensors[name] + alpha / a.shape[0] * (b @ a)
        assert np.abs(applied - merged_tensors[name]).max() <= 1e-5, name

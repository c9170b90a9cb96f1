"""Adapter-only GGUF (llama.cpp's LoRA adapter format), several quantizations from one merge, and the model's own
settings in the Modelfile and the GGUF metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import finetune_sdk
from finetune_sdk import Trainer
from finetune_sdk.cli import cli
from finetune_sdk.errors import ConfigError
from finetune_sdk.testing.tiny import tiny_model, tiny_tokenizer

gguf = pytest.importorskip("gguf")
ROWS = [{"prompt": f"what is {a} plus {b}?", "completion": f"{a} plus {b} is {a + b}."}
        for a in range(4) for b in range(4)]


@pytest.fixture(scope="module")
def lora_result(tmp_path_factory) -> Path:
    """A tiny Llama base (with a model card license and sampling defaults) and a LoRA trained on it."""
    from transformers import GenerationConfig

    root = tmp_path_factory.mktemp("adapter")
    tokenizer = tiny_tokenizer()
    base = root / "base"
    tiny_model("llama", tokenizer).save_pretrained(base, safe_serialization=True)
    tokenizer.save_pretrained(base)
    GenerationConfig(temperature=0.6, top_p=0.9, top_k=40, repetition_penalty=1.1, do_sample=True).save_pretrained(base)
    (base / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: en\n---\n# tiny\n")
    return Trainer(base, technique="lora", output_dir=root / "run", formatter="chat-template", num_train_epochs=1,
                   learning_rate=5e-2, progress=False, dtype="float32", max_length=128,
                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]).fit(ROWS).output_dir


def _tensors(path: Path) -> dict[str, np.ndarray]:
    reader = gguf.GGUFReader(path)
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
            for t in reader.tensors}


def _field(path: Path, key: str):
    return gguf.GGUFReader(path).fields[key].contents()


def test_adapter_only_gguf_plus_base_equals_the_merged_export(lora_result, tmp_path):
    merged = finetune_sdk.export(lora_result, tmp_path / "merged", quantization="f32")
    done = finetune_sdk.export(lora_result, tmp_path / "adapter", quantization="f32", adapter_only=True)
    adapter, base = done.files["adapter"], done.files["base"]
    assert done.gguf_path == adapter and adapter.name == "run-lora.gguf" and base.name == "run-base-f32.gguf"
    assert _field(adapter, "general.type") == "adapter" and _field(adapter, "adapter.type") == "lora"
    assert _field(adapter, "general.architecture") == "llama"
    alpha = _field(adapter, "adapter.lora.alpha")
    config = json.loads((lora_result / "adapter_config.json").read_text())
    assert alpha == pytest.approx(config["lora_alpha"])
    lora, base_tensors, merged_tensors = _tensors(adapter), _tensors(base), _tensors(merged.gguf_path)
    adapted = sorted(name.removesuffix(".lora_a") for name in lora if name.endswith(".lora_a"))
    assert len(adapted) == 2 * 5 and "blk.0.attn_q.weight" in adapted and "blk.1.ffn_down.weight" in adapted
    for name in adapted:  # what llama.cpp computes: W + alpha / r * B @ A
        a, b = lora[name + ".lora_a"], lora[name + ".lora_b"]
        assert a.shape == (config["r"], base_tensors[name].shape[1]) and b.shape == (base_tensors[name].shape[0],
                                                                                     config["r"])
        applied = base_tensors[name] + alpha / a.shape[0] * (b @ a)
        assert np.abs(applied - merged_tensors[name]).max() <= 1e-5, name
        assert np.abs(base_tensors[name] - merged_tensors[name]).max() > 1e-4  # the adapter really changes it
    for name in set(base_tensors) - set(adapted):
        assert np.array_equal(base_tensors[name], merged_tensors[name]), name
    text = done.modelfile_path.read_text()
    assert text.startswith(f"FROM ./{base.name}\nADAPTER ./{adapter.name}\n")


def test_adapter_only_refuses_a_full_fine_tune_in_one_line(tmp_path):
    tokenizer = tiny_tokenizer()
    base = tmp_path / "base"
    tiny_model("llama", tokenizer).save_pretrained(base, safe_serialization=True)
    tokenizer.save_pretrained(base)
    full = Trainer(base, technique="full", output_dir=tmp_path / "full", num_train_epochs=1, progress=False,
                   max_steps=1).fit(ROWS[:4]).output_dir
    out = CliRunner().invoke(cli, ["export", str(full), "--adapter-only", "--out", str(tmp_path / "x")])
    assert out.exit_code == 2 and "Traceback" not in out.output and not (tmp_path / "x").exists()
    assert "holds no LoRA adapter (technique 'full')" in out.output and len(out.output.strip().splitlines()) == 1


def test_several_quantizations_share_one_merge(lora_result, tmp_path, monkeypatch):
    from finetune_sdk.exporting import pipeline

    calls = []
    original = pipeline.merged_causal_lm
    monkeypatch.setattr(pipeline, "merged_causal_lm", lambda *a, **k: calls.append(1) or original(*a, **k))
    done = finetune_sdk.export(lora_result, tmp_path / "both", quantization=["q8_0", "f16"])
    assert len(calls) == 1
    assert {q: p.name for q, p in done.files.items()} == {"q8_0": "run-q8_0.gguf", "f16": "run-f16.gguf"}
    assert sorted(p.name for p in done.directory.iterdir()) == [
        "Modelfile", "finetune_manifest.json", "run-f16.Modelfile", "run-f16.gguf", "run-q8_0.gguf"]
    assert (done.directory / "run-f16.Modelfile").read_text().startswith("FROM ./run-f16.gguf\n")
    assert _field(done.files["f16"], "general.file_type") == int(gguf.LlamaFileType.MOSTLY_F16)
    out = CliRunner().invoke(cli, ["export", str(lora_result), "-q", "q4_0", "-q", "Q8_0", "--out",
                                   str(tmp_path / "cli")])
    assert out.exit_code == 0, out.output
    assert "run-q4_0.gguf" in out.output and "run-q8_0.gguf" in out.output


def test_modelfile_and_metadata_carry_the_models_own_settings(lora_result, tmp_path):
    done = finetune_sdk.export(lora_result, tmp_path / "gguf", quantization="q8_0", name="Sum Bot")
    lines = done.modelfile_path.read_text().splitlines()
    for expected in ("PARAMETER num_ctx 128", "PARAMETER temperature 0.6", "PARAMETER top_p 0.9",
                     "PARAMETER top_k 40", "PARAMETER repeat_penalty 1.1"):
        assert expected in lines
    path = done.gguf_path
    assert _field(path, "general.basename") == "Sum Bot" and _field(path, "general.finetune") == "lora"
    assert _field(path, "general.license") == "apache-2.0"
    assert _field(path, "general.size_label") == gguf.size_label(
        sum(p.numel() for p in tiny_model("llama", tiny_tokenizer()).parameters()), 0, 0, 0)
    assert _field(path, "general.base_model.count") == 1
    assert _field(path, "general.base_model.0.name") == "base"


def test_num_ctx_is_capped_by_the_models_context():
    from types import SimpleNamespace

    from finetune_sdk.exporting.model_settings import modelfile_parameters

    text = modelfile_parameters(Path("/nonexistent"), SimpleNamespace(max_position_embeddings=256),
                                {"options": {"max_length": 4096}})
    assert text == "PARAMETER num_ctx 256\n"


def test_adapter_only_takes_one_quantization(lora_result, tmp_path):
    with pytest.raises(ConfigError, match="adapter_only writes one base file"):
        finetune_sdk.export(lora_result, tmp_path / "x", quantization=["q8_0", "f16"], adapter_only=True)

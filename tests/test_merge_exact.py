"""Merges and exports start from the base as stored, not from the training copy (issue 22, kind 1).

A run under ``dtype="bfloat16"`` (or ``"auto"`` on a bf16 CPU/GPU) holds its frozen base in bfloat16. The merge must
read the base again from disk in float32, apply the adapter in float32 (the reference: PEFT's ``merge_and_unload``
on a float32 base loaded from disk) and round the result once to its output type. Before the fix a tiny Llama's
float32 merge was 2.4e-4 off the reference in its weights and 1.0e-3 on the logits (the f32 export the same): every
weight, the untouched embeddings too, carried bf16 rounding.

Tolerances for the held-out loss against the result's reported ``eval_loss``: a float32 run reports the loss of
exactly the merged weights (relative 1e-6: the same computation, measured 0); a bfloat16 run reports the loss it
computed with every base weight rounded to bfloat16 (relative error up to 2^-9, bf16's unit roundoff), so the
float32 merge's loss may differ by that much relatively (measured 1e-5 relative with fp32 activations). An export's
loss equals the float32 merge's within its own type's rounding (f32: 1e-6 relative, f16: 2^-11).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import finetune_sdk
from finetune_sdk import Trainer
from finetune_sdk.testing.tiny import tiny_model, tiny_tokenizer

ROWS = [{"prompt": f"what is {a} plus {b}?", "completion": f"{a} plus {b} is {a + b}."}
        for a in range(5) for b in range(5)]
HELD_OUT = ROWS[::4]
TEXT = "<|im_start|>user\nwhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n2 plus 3 is 5."
BF16_UNIT_ROUNDOFF = 2.0 ** -9
F16_UNIT_ROUNDOFF = 2.0 ** -11


def _save_base(folder: Path, dtype: torch.dtype = torch.float32) -> Path:
    tok = tiny_tokenizer()
    tiny_model("llama", tok).to(dtype).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def _train(base: Path, out: Path, dtype: str, technique: str = "lora", **options) -> Path:
    options = {"formatter": "chatml", "num_train_epochs": 2, "learning_rate": 5e-2, "progress": False, "seed": 0,
               **options}
    Trainer(base, technique=technique, output_dir=out, dtype=dtype, **options).fit(ROWS, eval_data=HELD_OUT)
    return out


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return _save_base(tmp_path_factory.mktemp("merge-exact") / "base")


@pytest.fixture(scope="module")
def runs(base_dir, tmp_path_factory):
    """Results trained from ``base_dir`` by training dtype, trained once per module."""
    done: dict[str, Path] = {}

    def get(dtype: str) -> Path:
        if dtype not in done:
            done[dtype] = _train(base_dir, tmp_path_factory.mktemp(f"run-{dtype}") / "run", dtype)
        return done[dtype]

    return get


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "finetune_manifest.json").read_text(encoding="utf-8"))


def _peft_reference(base: Path, result: Path):
    """PEFT's merge_and_unload on a float32 base loaded from disk: the reference every merge must equal."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, result).merge_and_unload().eval()


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokenizer(TEXT)["input_ids"]])).logits


def _reload_gguf(export):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(export.directory), gguf_file=export.gguf_path.name,
                                                dtype=torch.float32).eval()


def _held_out_loss(model, result: Path) -> float:
    from finetune_sdk.models.inference import FineTunedModel
    from finetune_sdk.plugin_manager import get_plugin_host

    manifest = _manifest(result)
    wrapped = FineTunedModel(model, finetune_sdk.load(result).tokenizer, task="causal-lm",
                             formatter=get_plugin_host().create("formatter", manifest["formatter"]),
                             options=manifest["options"])
    return wrapped.evaluate(HELD_OUT)["eval_loss"]


@pytest.mark.parametrize("training_dtype", ["bfloat16", pytest.param("float32", marks=pytest.mark.slow)])
def test_float32_merge_equals_peft_merge_on_the_stored_base(base_dir, runs, tmp_path, training_dtype):
    result = runs(training_dtype)
    assert _manifest(result)["dtype"] == training_dtype
    out = finetune_sdk.merge(result, tmp_path / "merged", dtype="float32")
    merged, stored = _weights(out), _weights(base_dir)
    reference = _peft_reference(base_dir, result).state_dict()
    assert set(merged) == set(reference)
    for name, tensor in merged.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, reference[name]), f"{name}: {(tensor - reference[name]).abs().max():.3g} off"
    untouched = [n for n in merged if not n.endswith(("q_proj.weight", "v_proj.weight"))]  # LoRA's default targets
    assert "model.embed_tokens.weight" in untouched and "lm_head.weight" in untouched
    for name in untouched:  # bit-identical to the checkpoint on disk, no bf16 rounding anywhere
        assert torch.equal(merged[name], stored[name]), name
    adapted = [n for n in merged if n not in untouched]
    assert adapted and all(not torch.equal(merged[n], stored[n]) for n in adapted)  # the adapter is in there
    record = _manifest(out)["merged_from"]
    assert record["base_dtype_loaded"] == "float32" and record["base_dtype_stored"] == "float32"
    assert record["base_source"] == "local" and record["merged_in"] == "float32"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_16_bit_merge_is_the_float32_merge_rounded_once(base_dir, runs, tmp_path, dtype):
    result = runs("bfloat16")
    out = finetune_sdk.merge(result, tmp_path / "merged", dtype=dtype)
    reference = _peft_reference(base_dir, result).state_dict()
    merged = _weights(out)
    for name, tensor in merged.items():
        assert tensor.dtype == getattr(torch, dtype)
        assert torch.equal(tensor, reference[name].to(getattr(torch, dtype))), name
    assert _manifest(out)["dtype"] == dtype and _manifest(out)["merged_from"]["base_dtype_loaded"] == "float32"


def test_exports_are_the_float32_merge_rounded_once_to_their_type(base_dir, runs, tmp_path):
    result = runs("bfloat16")
    reference = _peft_reference(base_dir, result)
    tokenizer = tiny_tokenizer()
    expected = reference.state_dict()
    for quantization, matrix_dtype in (("f32", torch.float32), ("f16", torch.float16), ("bf16", torch.bfloat16)):
        export = finetune_sdk.export(result, tmp_path / quantization, format="gguf", quantization=quantization)
        reloaded = _reload_gguf(export)
        for name, tensor in reloaded.state_dict().items():  # matrices rounded once; norms stay float32
            once = expected[name].to(matrix_dtype).float() if tensor.dim() == 2 else expected[name]
            assert torch.equal(tensor, once), f"{quantization} {name}: {(tensor - once).abs().max():.3g} off"
        diff = (_logits(reloaded, tokenizer) - _logits(reference, tokenizer)).abs().max().item()
        if quantization == "f32":
            assert diff <= 1e-5, diff  # 1.0e-3 before the fix (bf16-rounded base)
        exported_from = _manifest(export.directory)["exported_from"]
        assert exported_from["base_dtype_loaded"] == "float32" and exported_from["base_dtype_stored"] == "float32"
        assert exported_from["merged_in"] == "float32"


@pytest.mark.slow
@pytest.mark.parametrize("training_dtype", ["auto", "bfloat16", "float32"])
def test_held_out_loss_of_merge_and_export_equals_the_reported_eval_loss(runs, tmp_path, training_dtype):
    result = runs(training_dtype)
    manifest = _manifest(result)
    reported = manifest["metrics"]["eval_loss"]
    merged = finetune_sdk.merge(result, tmp_path / "merged", dtype="float32")
    merged_loss = finetune_sdk.load(merged).evaluate(HELD_OUT)["eval_loss"]
    # a float32 run evaluated these very weights; a bf16 run evaluated them with its base rounded to bf16
    tolerance = 1e-6 if manifest["dtype"] == "float32" else BF16_UNIT_ROUNDOFF
    assert merged_loss == pytest.approx(reported, rel=tolerance)
    f32 = finetune_sdk.export(result, tmp_path / "f32", quantization="f32")
    assert _held_out_loss(_reload_gguf(f32), result) == pytest.approx(merged_loss, rel=1e-6)
    f16 = finetune_sdk.export(result, tmp_path / "f16", quantization="f16")
    assert _held_out_loss(_reload_gguf(f16), result) == pytest.approx(merged_loss, rel=F16_UNIT_ROUNDOFF)


def test_load_unquantized_reads_the_stored_base_in_float32(base_dir, runs):
    result = runs("bfloat16")
    as_trained = finetune_sdk.load(result).model.get_base_model()
    assert as_trained.model.embed_tokens.weight.dtype == torch.bfloat16  # computes as it trained
    full = finetune_sdk.load(result, quantized=False).model.get_base_model()
    stored = _weights(base_dir)
    assert full.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(full.model.embed_tokens.weight.detach(), stored["model.embed_tokens.weight"])
    assert torch.equal(full.model.layers[0].mlp.down_proj.weight.detach(),
                       stored["model.layers.0.mlp.down_proj.weight"])


def test_a_base_stored_in_bfloat16_is_merged_from_its_exact_values(tmp_path):
    base = _save_base(tmp_path / "base-bf16", torch.bfloat16)
    result = _train(base, tmp_path / "run", "float32", num_train_epochs=1)
    out = finetune_sdk.merge(result, tmp_path / "merged", dtype="float32")
    merged, stored = _weights(out), _weights(base)
    assert stored["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert torch.equal(merged["model.embed_tokens.weight"], stored["model.embed_tokens.weight"].float())
    reference = _peft_reference(base, result).state_dict()
    assert all(torch.equal(merged[name], reference[name]) for name in merged)
    assert _manifest(out)["merged_from"]["base_dtype_stored"] == "bfloat16"


@pytest.mark.slow
def test_a_full_fine_tune_exports_the_weights_it_saved(tmp_path, base_dir):
    result = _train(base_dir, tmp_path / "run", "bfloat16", technique="full", num_train_epochs=1,
                    learning_rate=1e-3)
    saved = _weights(result)
    assert saved["model.embed_tokens.weight"].dtype == torch.bfloat16
    export = finetune_sdk.export(result, tmp_path / "f32", quantization="f32")
    reloaded = _reload_gguf(export).state_dict()
    assert all(torch.equal(reloaded[name], saved[name].float()) for name in reloaded)
    exported_from = _manifest(export.directory)["exported_from"]
    assert exported_from["base_source"] == "result" and exported_from["base_dtype_stored"] == "bfloat16"
    assert exported_from["merged_in"] is None


@pytest.mark.slow
def test_qlora_merges_into_the_stored_float32_base(base_dir, tmp_path):
    result = _train(base_dir, tmp_path / "run", "auto", technique="qlora", num_train_epochs=1)
    out = finetune_sdk.merge(result, tmp_path / "merged", dtype="float32")
    reference = _peft_reference(base_dir, result).state_dict()
    merged = _weights(out)
    assert all(torch.equal(merged[name], reference[name]) for name in merged)
    assert torch.equal(merged["model.embed_tokens.weight"], _weights(base_dir)["model.embed_tokens.weight"])


@pytest.mark.slow
def test_a_gguf_base_by_registry_name_merges_from_its_dequantized_float32_folder(tmp_path, monkeypatch):
    from finetune_sdk.exporting.gguf_file import write_gguf
    from finetune_sdk.models.gguf_import import converted_folder
    from finetune_sdk.registry import Registry

    monkeypatch.setenv("FINETUNE_SDK_CACHE", str(tmp_path / "cache"))
    tok = tiny_tokenizer()
    write_gguf(tiny_model("llama", tok), tok, tmp_path / "base.gguf", quantization="q8_0",
               chat_template=tok.chat_template)
    registry = Registry(tmp_path / "registry")
    fit = Trainer(tmp_path / "base.gguf", technique="lora", formatter="chatml", output_dir=tmp_path / "run",
                  num_train_epochs=1, learning_rate=5e-2, progress=False, dtype="bfloat16", seed=0).fit(ROWS)
    fit.publish("adder", aliases=["production"], registry=registry)
    out = finetune_sdk.merge("adder@production", tmp_path / "merged", dtype="float32", registry=registry)
    folder = converted_folder(tmp_path / "base.gguf")
    reference = _peft_reference(folder, tmp_path / "run").state_dict()
    merged = _weights(out)
    assert all(torch.equal(merged[name], reference[name]) for name in merged)
    assert torch.equal(merged["model.embed_tokens.weight"], _weights(folder)["model.embed_tokens.weight"])
    record = _manifest(out)["merged_from"]
    assert record["base_source"] == "gguf" and record["base_dtype_stored"] == "float32"
    export = finetune_sdk.export("adder@production", tmp_path / "f32", quantization="f32", registry=registry)
    reloaded = _reload_gguf(export).state_dict()
    assert all(torch.equal(reloaded[name], merged[name]) for name in reloaded)

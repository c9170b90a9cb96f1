"""Sequence packing computes the same per-token loss as padding; it is on by default where it is correct."""

from __future__ import annotations

import pytest
import torch

from finetune_sdk import Trainer
from finetune_sdk.data.encoding import Collator
from finetune_sdk.data.packing import PackingCollator, packing_supported
from finetune_sdk.testing.tiny import tiny_model, tiny_tokenizer


def examples():
    torch.manual_seed(0)
    out = []
    for n in (5, 17, 9, 30, 3):
        ids = torch.randint(7, 300, (n,)).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    return out


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2"])
def test_packed_batch_has_the_same_loss_and_logits_as_padded(family):
    tok = tiny_tokenizer()
    model = tiny_model(family, tok).eval()
    exs = examples()
    padded, packed = Collator(tok.pad_token_id)(exs), PackingCollator()(exs)
    assert packed["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in exs))  # no padding at all
    with torch.no_grad():
        padded_out, packed_out = model(**padded), model(**packed)
    assert abs(padded_out.loss.item() - packed_out.loss.item()) < 1e-5
    offset = 0
    for example in PackingCollator().rows(exs)[0]:  # every example sees only itself
        row = next(i for i, e in enumerate(exs) if e is example)
        n = len(example["input_ids"])
        diff = (padded_out.logits[row, :n] - packed_out.logits[0, offset:offset + n]).abs().max().item()
        assert diff < 1e-4, (row, diff)
        offset += n
    assert packing_supported(model)


def test_packing_is_on_by_default_and_can_be_turned_off(tiny_models, tmp_path, qa_rows, caplog):
    packed = Trainer(tiny_models("llama"), formatter="chatml", output_dir=tmp_path / "a", max_steps=3, seed=0,
                     progress=False)
    result = packed.fit(qa_rows)
    padded = Trainer(tiny_models("llama"), formatter="chatml", output_dir=tmp_path / "b", max_steps=3, seed=0,
                     packing=False, progress=False)
    result_padded = padded.fit(qa_rows)
    assert result.manifest["options"]["packing"] is True and result_padded.manifest["options"]["packing"] is False
    assert result.metrics["train_tokens"] > 0


def test_unsupported_models_fall_back_to_length_grouping(tiny_models, tmp_path, qa_rows):
    from finetune_sdk.training.engine import decide_packing
    from finetune_sdk.training.plan import TrainingPlan

    trainer = Trainer(tiny_models("llama"), formatter="chatml", output_dir=tmp_path / "x", progress=False)
    model = trainer.current_model().model
    plan = TrainingPlan(train=None, formatter_name="chatml")
    assert decide_packing(trainer, plan, model)
    model.config.model_type = "some-new-arch"
    assert not decide_packing(trainer, plan, model)
    assert not decide_packing(trainer, TrainingPlan(train=None, formatter_name="preference", objective="dpo"), model)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_rows_of_bounded_length_keep_the_padded_loss(family):
    tok = tiny_tokenizer()
    model = tiny_model(family, tok).eval()
    exs = examples()
    collator = PackingCollator(row_length=32, pad_token_id=tok.pad_token_id)
    rows = collator.rows(exs)
    assert all(sum(len(e["input_ids"]) for e in row) <= 32 for row in rows)
    assert sorted(len(e["input_ids"]) for row in rows for e in row) == sorted(len(e["input_ids"]) for e in exs)
    packed = collator(exs)
    assert packed["input_ids"].shape[0] == len(rows) < len(exs)
    with torch.no_grad():
        padded_loss = model(**Collator(tok.pad_token_id)(exs)).loss.item()
        packed_loss = model(**packed).loss.item()
    assert abs(padded_loss - packed_loss) < 1e-5


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2"])
def test_attention_per_example_matches_padded_loss_and_gradients(family):
    """One row, no mask: varlen attention gives the padded batch's loss, logits and gradients."""
    from finetune_sdk.speed import varlen_attention

    tok = tiny_tokenizer()
    exs = examples()
    padded_model, varlen_model = tiny_model(family, tok).eval(), tiny_model(family, tok).eval()  # no dropout
    assert varlen_attention.applicable(varlen_model, row_length=None, device_type="cpu")
    assert not varlen_attention.applicable(varlen_model, row_length=None, device_type="cuda")
    assert varlen_attention.use(varlen_model, varlen_attention.ATTENTION_NAME) == "sdpa"
    packed = PackingCollator(varlen_kwargs=True)(exs)
    assert packed["cu_seq_lens_q"].tolist() == [0, 30, 47, 56, 61, 64]  # longest first
    padded_out, packed_out = padded_model(**Collator(tok.pad_token_id)(exs)), varlen_model(**packed)
    assert abs(padded_out.loss.item() - packed_out.loss.item()) < 1e-5
    padded_out.loss.backward()
    packed_out.loss.backward()
    for (name, a), b in zip(padded_model.named_parameters(), varlen_model.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name
    with torch.no_grad():  # a padded batch (attention mask, no spans) goes through plain SDPA unchanged
        again = varlen_model(**Collator(tok.pad_token_id)(exs))
    assert torch.allclose(again.logits, padded_out.logits, atol=1e-5)


def test_attention_per_example_with_several_rows_and_row_padding():
    from finetune_sdk.speed import varlen_attention

    tok = tiny_tokenizer()
    exs = examples()
    model = tiny_model("llama", tok).eval()
    varlen_attention.use(model, varlen_attention.ATTENTION_NAME)
    packed = PackingCollator(row_length=32, pad_token_id=tok.pad_token_id, varlen_kwargs=True)(exs)
    width = packed["input_ids"].shape[1]
    assert varlen_attention.row_spans(packed["cu_seq_lens_q"], width) == [[30, 1], [17, 9, 5], [3, 28]]
    with torch.no_grad():
        padded_loss = model(**Collator(tok.pad_token_id)(exs)).loss.item()
        packed_loss = model(**packed).loss.item()
    assert abs(padded_loss - packed_loss) < 1e-5


def test_attention_per_example_only_where_it_equals_the_mask():
    from finetune_sdk.speed.varlen_attention import applicable

    tok = tiny_tokenizer()
    windowed = tiny_model("mistral", tok)
    windowed.config.sliding_window = 64
    assert applicable(windowed, 64, "cpu") and not applicable(windowed, 1024, "cpu")
    assert not applicable(windowed, row_length=None, device_type="cpu")
    eager = tiny_model("llama", tok)
    eager.set_attn_implementation("eager")
    assert not applicable(eager, row_length=None, device_type="cpu")


def test_packed_training_matches_padded_training(tiny_models, tmp_path, qa_rows, caplog):
    """Same seed, same batches: packed (one row, attention per example) and padded runs train the same weights."""
    from safetensors.torch import load_file

    caplog.set_level("INFO", logger="finetune_sdk")
    # float32: precision auto's bf16 saved activations round differently when the batch's shape differs
    options = dict(formatter="chatml", max_steps=3, seed=0, progress=False, group_by_length=False,
                   learning_rate=1e-3, dtype="float32")
    packed = Trainer(tiny_models("llama"), output_dir=tmp_path / "packed", **options).fit(qa_rows)
    assert "each batch in one row, attention per example" in caplog.text
    padded = Trainer(tiny_models("llama"), output_dir=tmp_path / "padded", packing=False, **options).fit(qa_rows)
    assert abs(packed.metrics["train_loss"] - padded.metrics["train_loss"]) < 1e-4
    a = load_file(str(tmp_path / "packed" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "padded" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name

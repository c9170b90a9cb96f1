"""Precision ``auto``: bf16 frozen base + fp32 trainable state where the CPU computes bf16, fp32 elsewhere."""

from __future__ import annotations

import json

import pytest
import torch

import finetune_sdk
from finetune_sdk import Trainer
from finetune_sdk.speed import precision
from finetune_sdk.training.manifest import MANIFEST_NAME
from finetune_sdk.speed.precision import resolve_precision


@pytest.fixture
def bf16_cpu(monkeypatch):
    """This CPU reports AVX512-BF16 (the decision only; bf16 math runs on any CPU), and any feed is big enough."""
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: "AVX512-BF16")
    monkeypatch.setattr(precision, "CPU_BF16_MIN_FEED", 0)


@pytest.fixture
def plain_cpu(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: None)


AUTO = {"dtype": "auto", "bf16": None, "fp16": False}


def test_rules_on_a_bf16_cpu(bf16_cpu):
    from finetune_sdk.speed.precision import Feed

    p = resolve_precision(AUTO, adapter=True, device="cpu", feed=Feed(2048, 576))
    assert (p.dtype, p.trainable_dtype, p.autocast, p.auto) == ("bfloat16", "float32", None, True)
    assert "AVX512-BF16" in p.reason
    # no training plan yet (generation, evaluation, a model opened before fit): fp32, the plain way
    unknown = resolve_precision(AUTO, adapter=True, device="cpu")
    assert (unknown.dtype, unknown.auto) == ("float32", False) and "until a training plan" in unknown.reason
    assert resolve_precision(AUTO, adapter=True, full=True, device="cpu").dtype == "float32"  # full: fp32 weights
    assert resolve_precision(AUTO, adapter=False, device="cpu").dtype == "float32"  # the classifier
    assert resolve_precision(AUTO, adapter=True, quantized=True, device="cpu").dtype == "float32"  # qlora on CPU
    # an explicit dtype= or bf16= (true or false) overrides the automatic choice
    assert resolve_precision({**AUTO, "dtype": "float32"}, adapter=True, device="cpu").dtype == "float32"
    off = resolve_precision({**AUTO, "bf16": False}, adapter=True, device="cpu")
    assert (off.dtype, off.autocast, off.auto) == ("float32", None, False)
    on = resolve_precision({**AUTO, "bf16": True}, adapter=True, device="cpu")
    assert (on.dtype, on.autocast) == ("float32", "bfloat16")


def test_rules_on_a_cpu_without_bf16_and_on_gpus(plain_cpu, monkeypatch):
    p = resolve_precision(AUTO, adapter=True, device="cpu")
    assert (p.dtype, p.auto) == ("float32", False) and "no AVX512-BF16" in p.reason
    monkeypatch.setattr(precision, "cuda_bf16", lambda: True)
    assert resolve_precision(AUTO, adapter=True, device="cuda").dtype == "bfloat16"
    assert resolve_precision(AUTO, adapter=True, full=True, device="cuda").dtype == "float32"
    monkeypatch.setattr(precision, "cuda_bf16", lambda: False)
    assert resolve_precision(AUTO, adapter=True, device="cuda").dtype == "float32"


def test_auto_weighs_what_a_step_feeds_on_the_cpu(monkeypatch):
    """Issue 23: the grid's shapes on SmolLM2-135M (chat rows at batch 4, 8 and 32: ~245, ~490, ~1,950 tokens x
    hidden 576; 256-token rows at batch 8) get the bf16 base, measured faster there; steps under 128 tokens x 576
    (not measured) keep fp32; GPUs ignore the feed."""
    from finetune_sdk.speed.precision import CPU_BF16_MIN_FEED, Feed

    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: "AMX")
    tiny = resolve_precision(AUTO, adapter=True, device="cpu", feed=Feed(100, 576))
    assert (tiny.dtype, tiny.auto, tiny.activations) == ("float32", False, "")
    assert tiny.reason.startswith("auto: fp32, a step feeds 100 tokens x hidden 576 (< 73,728 values)")
    for feed in (Feed(4 * 61.1, 576), Feed(8 * 61.1, 576), Feed(32 * 61.1, 576), Feed(8 * 256, 576),
                 Feed(36, 2048)):  # a 1.7B model's hidden: bf16 from 36 tokens a step
        assert resolve_precision(AUTO, adapter=True, device="cpu", feed=feed).dtype == "bfloat16", feed
    assert CPU_BF16_MIN_FEED == 128 * 576
    assert resolve_precision(AUTO, adapter=True, device="cpu", feed=None).dtype == "float32"  # unknown: the plain way
    assert resolve_precision({**AUTO, "dtype": "bfloat16"}, adapter=True, device="cpu",
                             feed=Feed(8, 64)).dtype == "bfloat16"  # given: no weighing
    monkeypatch.setattr(precision, "cuda_bf16", lambda: True)
    assert resolve_precision(AUTO, adapter=True, device="cuda", feed=Feed(8, 64)).dtype == "bfloat16"


def test_fit_logs_and_records_the_fed_choice(monkeypatch, tiny_models, tmp_path, qa_rows, caplog):
    """A tiny model's steps feed far less than the bf16 threshold: fit trains in fp32 and says why."""
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: "AMX")
    caplog.set_level("INFO", logger="finetune_sdk")
    trainer = Trainer(tiny_models("llama"), formatter="chatml", output_dir=tmp_path / "out", max_steps=1,
                      per_device_train_batch_size=4, progress=False)
    result = trainer.fit(qa_rows)
    assert result.manifest["dtype"] == "float32" and result.manifest["precision"]["auto"] is False
    assert "(< 73,728 values)" in result.manifest["precision"]["reason"]
    assert "precision: float32 weights (auto: fp32, a step feeds" in caplog.text
    assert "estimated training memory" in caplog.text and "fused frozen projections" not in caplog.text
    assert "bf16 adapter matmuls" not in caplog.text  # fp32 runs keep fp32 adapter matmuls
    from finetune_sdk.speed.precision import estimate_options

    assert estimate_options(trainer.options, trainer.precision)["dtype"] == "float32"  # the estimate counts fp32 weights, as loaded
    assert next(trainer.current_model().model.get_base_model().parameters()).dtype == torch.float32


def test_auto_trains_a_bf16_base_with_fp32_adapters_and_records_it(bf16_cpu, tiny_models, tmp_path, qa_rows,
                                                                   caplog):
    caplog.set_level("INFO", logger="finetune_sdk")
    trainer = Trainer(tiny_models("llama"), formatter="chatml", output_dir=tmp_path / "out", max_steps=2,
                      progress=False)
    result = trainer.fit(qa_rows)
    model = trainer.current_model().model
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert all(dtypes[n] == torch.float32 for n in dtypes if "lora_" in n)
    assert all(dtypes[n] == torch.bfloat16 for n in dtypes if n.endswith(("proj.base_layer.weight", "embed_tokens.weight")))
    assert all(dtypes[n] == torch.float32 for n in dtypes if "norm" in n)  # between the matmuls: fp32
    ids = torch.tensor([[1, 5, 9, 12]])
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert all(h.dtype == torch.float32 for h in hidden)  # the residual stream stays fp32
    manifest = json.loads((result.output_dir / MANIFEST_NAME).read_text())
    assert manifest["dtype"] == "bfloat16"
    assert manifest["precision"] == {"dtype": "bfloat16", "autocast": None, "trainable_dtype": "float32",
                                     "auto": True, "reason": manifest["precision"]["reason"],
                                     "activations": "float32", "saved_activations": "bfloat16"}
    assert ("precision: bfloat16 frozen base, float32 activations (saved for the backward pass in bfloat16), "
            "float32 trainable parameters and optimizer state") in caplog.text
    assert "bf16 adapter matmuls: lora_A's forward and weight gradient in bf16" in caplog.text  # issue 23
    fused = [m for m in model.modules() if getattr(type(m), "_finetune_sdk_fused", False)]
    assert fused and all(m._finetune_sdk_adapter_matmuls == torch.bfloat16 for m in fused)
    loaded = finetune_sdk.load(result.output_dir)
    assert next(loaded.model.get_base_model().parameters()).dtype == torch.bfloat16  # reloaded as trained


def test_fp32_is_recorded_where_the_cpu_has_no_bf16(plain_cpu, tiny_models, tmp_path, qa_rows):
    result = Trainer(tiny_models("llama"), formatter="chatml", output_dir=tmp_path / "out", max_steps=1,
                     progress=False).fit(qa_rows)
    assert result.manifest["dtype"] == "float32" and result.manifest["precision"]["auto"] is False


def test_bf16_base_loss_stays_within_one_percent_of_fp32(bf16_cpu, tiny_models, tmp_path, qa_rows):
    """Loss parity on a tiny model: same data, seed and steps; auto (bf16 base) vs dtype='float32'."""
    losses = {}
    for dtype in ("auto", "float32"):
        trainer = Trainer(tiny_models("llama"), formatter="chatml", output_dir=tmp_path / dtype, max_steps=6,
                          per_device_train_batch_size=4, learning_rate=1e-3, dtype=dtype, progress=False)
        result = trainer.fit(qa_rows, eval_data=qa_rows[:8])
        losses[dtype] = (result.metrics["train_loss"], result.metrics["eval_loss"])
    assert losses["auto"][0] == pytest.approx(losses["float32"][0], rel=0.01)
    assert losses["auto"][1] == pytest.approx(losses["float32"][1], rel=0.01)


def test_bf16_saved_activations_halve_what_backward_keeps_and_barely_move_the_gradients(monkeypatch):
    from finetune_sdk.speed import precision

    monkeypatch.setattr(precision, "SMALLEST_PACKED", 4096)  # the tiny model's activations are small
    from peft import LoraConfig, get_peft_model

    from finetune_sdk.speed.precision import bf16_saved_activations, keep_activations_fp32
    from finetune_sdk.testing.tiny import tiny_model

    def run(packed: bool):
        torch.manual_seed(0)
        model = get_peft_model(tiny_model("llama").to(torch.bfloat16), LoraConfig(r=4, target_modules="all-linear"))
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.float()
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.05, generator=torch.Generator().manual_seed(1))
        keep_activations_fp32(model)
        ids = torch.randint(0, 64, (4, 64), generator=torch.Generator().manual_seed(0))
        import contextlib

        with (bf16_saved_activations(model) if packed else contextlib.nullcontext()):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if p.requires_grad])
        return loss.item(), grads

    packed_bytes = []
    original_init = precision._Packed.__init__

    def counting_init(self, tensor):
        packed_bytes.append(tensor.untyped_storage().nbytes())
        original_init(self, tensor)

    precision._Packed.__init__ = counting_init
    try:
        plain_loss, plain_grads = run(False)
        assert packed_bytes == []
        packed_loss, packed_grads = run(True)
    finally:
        precision._Packed.__init__ = original_init
    assert sum(packed_bytes) > 100_000  # the layers' fp32 activations went to the backward pass as bf16
    assert packed_loss == plain_loss  # the forward pass is untouched
    cosine = torch.nn.functional.cosine_similarity(plain_grads, packed_grads, dim=0)
    assert cosine > 0.999 and not torch.equal(plain_grads, packed_grads)


def test_the_loss_keeps_fp32_under_bf16_saved_activations():
    """Logit-sized tensors (the plain loss's log-softmax) and the chunked loss's gradients are not rounded."""
    from finetune_sdk.speed import precision
    from finetune_sdk.speed.chunked_loss import linear_cross_entropy
    from finetune_sdk.testing.tiny import tiny_model

    model = tiny_model("llama")
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(512, model.config.hidden_size, generator=g, requires_grad=True)
    targets = torch.randint(0, vocab, (512,), generator=g)
    grads = []
    for packed in (False, True):
        hidden.grad = None
        with precision.bf16_saved_activations(model) if packed else torch.enable_grad():
            loss = linear_cross_entropy(hidden, model.lm_head.weight, targets, chunk_size=64)
            plain = torch.nn.functional.cross_entropy(hidden @ model.lm_head.weight.t(), targets, reduction="sum")
        (loss + plain).backward()
        grads.append(hidden.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_small_saved_activations_are_not_packed(monkeypatch):
    """Tensors under SMALLEST_PACKED values (per-example attention slices of short rows) stay fp32: packing each
    one cost an op and a Python call more than the memory it saved (issue 23)."""
    from finetune_sdk.speed import precision

    packed: list[int] = []
    monkeypatch.setattr(precision._Packed, "__init__", lambda self, t: (packed.append(t.numel()),
                                                                        setattr(self, "tensor", t)) and None)
    x = torch.linspace(0, 1, precision.SMALLEST_PACKED - 1, requires_grad=True)
    y = torch.linspace(0, 1, precision.SMALLEST_PACKED, requires_grad=True)
    with precision.bf16_saved_activations(torch.nn.Linear(1, 1)):
        (x.exp().sum() + y.exp().sum()).backward()
    assert packed == [precision.SMALLEST_PACKED]
    assert precision.SMALLEST_PACKED == 1 << 17


def test_the_loaded_model_keeps_its_precision_through_a_second_fit(monkeypatch, tiny_models, tmp_path, qa_rows):
    """After a fit chose fp32 by its feed, the trainer (and a second stage) report the fp32 the model is in."""

    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: "AMX")
    trainer = Trainer(tiny_models("llama"), formatter="chatml", output_dir=tmp_path / "a", max_steps=1,
                      progress=False)
    trainer.fit(qa_rows)
    assert trainer.precision.dtype == "float32"
    trainer.output_dir = tmp_path / "b"
    assert trainer.fit(qa_rows).manifest["dtype"] == "float32"


def test_held_out_loss_after_50_steps_within_one_percent_of_fp32(bf16_cpu, tiny_models, tmp_path, qa_rows, caplog):
    """Issue 23's guard for auto's bf16 path with its bf16 adapter matmuls: 50 steps, then the loss on held-out
    rows (sums not trained on) within 1% of dtype='float32''s."""
    caplog.set_level("INFO", logger="finetune_sdk")
    held_out = [{"prompt": f"what is {a} plus {b}?", "completion": f"{a} plus {b} is {a + b}."}
                for a in range(4, 6) for b in range(4)]
    losses = {}
    for dtype in ("auto", "float32"):
        trainer = Trainer(tiny_models("llama"), formatter="chatml", output_dir=tmp_path / dtype, max_steps=50,
                          per_device_train_batch_size=4, learning_rate=1e-3, dtype=dtype, progress=False)
        losses[dtype] = trainer.fit(qa_rows, eval_data=held_out).metrics["eval_loss"]
    assert "bf16 adapter matmuls" in caplog.text
    print(f"held-out loss after 50 steps: auto {losses['auto']:.5f}, fp32 {losses['float32']:.5f}")
    assert losses["auto"] == pytest.approx(losses["float32"], rel=0.01)

"""The chunked cross-entropy gives the plain loss and gradients, and never holds the full logits."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from finetune_sdk import Trainer
from finetune_sdk.speed.chunked_loss import chunked_loss, linear_cross_entropy, supports_chunked_loss
from finetune_sdk.testing.tiny import tiny_model


def _batch(vocab: int, shape=(3, 17), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, shape, generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # a masked prompt
    labels[2, 10:] = -100  # padding
    return ids, labels


@pytest.mark.parametrize("chunk", [1, 7, 1000])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_cross_entropy_matches_cross_entropy_on_full_logits(chunk, with_bias):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    bias = torch.randn(50, generator=g, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 50, (23,), generator=g)
    plain = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight, bias), targets,
                                              reduction="sum")
    expected = torch.autograd.grad(2.5 * plain, [t for t in (hidden, weight, bias) if t is not None])
    chunked = linear_cross_entropy(hidden, weight, targets, bias, chunk_size=chunk)
    got = torch.autograd.grad(2.5 * chunked, [t for t in (hidden, weight, bias) if t is not None])
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])  # tied heads, a GPT-2 Conv1D model, an untied head
def test_model_loss_and_every_gradient_match_the_plain_loss(family):
    model = tiny_model(family).eval()  # eval: no dropout, so both passes compute the same thing
    ids, labels = _batch(model.config.vocab_size)
    plain = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(31)).loss
    plain.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with chunked_loss(model, chunk_size=4) as active:
        out = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(31))
    out.loss.backward()
    assert active
    assert type(model.lm_head) is torch.nn.Linear and "_loss_function" not in model.__dict__  # restored
    torch.testing.assert_close(out.loss, plain, rtol=1e-4, atol=0)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_mean_reduction_and_a_bf16_model():
    model = tiny_model("llama").to(torch.bfloat16).eval()
    ids, labels = _batch(model.config.vocab_size)
    plain = model(input_ids=ids, labels=labels).loss
    with chunked_loss(model) as active:
        chunked = model(input_ids=ids, labels=labels).loss
    assert active and chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, plain.float(), rtol=1e-4, atol=0)


class _LargestVocabTensor(TorchDispatchMode):
    """Records the most elements of any new tensor (not a view) an op produces whose last dimension is the
    vocabulary: logits, their softmax and their gradient."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == self.vocab and not t._is_view():
                self.largest = max(self.largest, t.numel())
        return out


def test_the_full_logits_never_exist_in_forward_or_backward():
    model = tiny_model("llama")
    vocab = model.config.vocab_size
    ids, labels = _batch(vocab, shape=(4, 64))
    labelled = int((labels[:, 1:] != -100).sum())
    plain = _LargestVocabTensor(vocab)
    with plain:
        model(input_ids=ids, labels=labels).loss.backward()
    chunked = _LargestVocabTensor(vocab)
    with chunked, chunked_loss(model, chunk_size=8):
        model(input_ids=ids, labels=labels).loss.backward()
    assert plain.largest >= ids.numel() * vocab
    # a chunk's logits (8 tokens), or the [hidden, vocab] transposed head weight the matmul may copy
    assert 0 < chunked.largest <= max(8, model.config.hidden_size) * vocab < labelled * vocab / 3


def test_unsupported_heads_keep_the_plain_loss():
    from peft import LoraConfig, get_peft_model

    adapted_head = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    assert not supports_chunked_loss(adapted_head)
    with chunked_loss(adapted_head) as active:
        assert not active
    lora = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    assert supports_chunked_loss(lora)  # LoRA inside the model, a plain head


def test_fit_and_evaluate_give_the_same_numbers_with_and_without_chunks(tiny_models, tmp_path, qa_rows):
    results = {}
    for chunked in (True, False):
        trainer = Trainer(tiny_models("llama"), formatter="chatml", output_dir=tmp_path / str(chunked), max_steps=3,
                          per_device_train_batch_size=4, dtype="float32", chunked_loss=chunked, progress=False,
                          logging_steps=1, eval_steps=2)
        result = trainer.fit(qa_rows, eval_data=qa_rows[:6])
        history = result.log_history
        results[chunked] = (result.metrics, [h["loss"] for h in history if "loss" in h],
                            trainer.evaluate(qa_rows[6:12])["eval_loss"], [h["eval_loss"] for h in history
                                                                           if "eval_loss" in h])
    (m1, curve1, eval1, during1), (m2, curve2, eval2, during2) = results[True], results[False]
    assert len(curve1) == 3 and curve1 == pytest.approx(curve2, rel=1e-4)
    assert len(during1) >= 1 and during1 == pytest.approx(during2, rel=1e-4)  # transformers' evaluations
    assert m1["eval_loss"] == pytest.approx(m2["eval_loss"], rel=1e-4)
    assert eval1 == pytest.approx(eval2, rel=1e-4)


def test_a_bf16_head_with_fp32_activations_takes_the_chunked_loss():
    """precision auto's casts on the LM head (input to bf16, logits to fp32) are what each chunk does: the
    chunked loss stays on, with the plain loss's value and gradients (a user hook still turns it off)."""
    from finetune_sdk.speed.precision import keep_activations_fp32

    model = tiny_model("llama").to(torch.bfloat16)
    keep_activations_fp32(model)
    model.model.norm.weight.requires_grad_(True)  # a gradient that flows through the head's input
    ids, labels = _batch(model.config.vocab_size)
    assert supports_chunked_loss(model)
    plain = model(input_ids=ids, labels=labels).loss
    plain.backward()
    plain_grad = model.model.norm.weight.grad.clone()
    model.zero_grad()
    with chunked_loss(model, chunk_size=5) as active:
        chunked = model(input_ids=ids, labels=labels).loss
    chunked.backward()
    assert active and chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=0)
    torch.testing.assert_close(model.model.norm.weight.grad, plain_grad, rtol=2e-2, atol=1e-4)
    model.lm_head.register_forward_hook(lambda module, args, output: output * 2)
    assert not supports_chunked_loss(model)


def test_precision_auto_on_a_bf16_cpu_keeps_the_chunked_loss(tiny_models, tmp_path, qa_rows, monkeypatch):
    from finetune_sdk.speed import precision

    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: "AVX512-BF16")
    monkeypatch.setattr(precision, "CPU_BF16_MIN_FEED", 0)  # tiny steps: the bf16 path whatever they feed
    losses, manifests = {}, {}
    for chunked in (True, False):
        trainer = Trainer(tiny_models("llama"), formatter="chatml", output_dir=tmp_path / str(chunked), max_steps=2,
                          per_device_train_batch_size=4, chunked_loss=chunked, progress=False, logging_steps=1)
        result = trainer.fit(qa_rows)
        losses[chunked] = [h["loss"] for h in result.log_history if "loss" in h]
        manifests[chunked] = result.manifest
    assert manifests[True]["precision"]["dtype"] == "bfloat16"
    assert manifests[True]["precision"]["activations"] == "float32"
    assert manifests[True]["chunked_loss"] is True and manifests[False]["chunked_loss"] is False
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)

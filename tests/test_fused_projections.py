"""Fused frozen projections: PEFT's values and gradients, one matmul per group, nothing saved or merged differently."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from finetune_sdk.speed.fused_lora import use_fused_lora
from finetune_sdk.speed.fused_projections import extra_bytes, fuse_frozen_projections
from finetune_sdk.speed.precision import keep_activations_fp32
from finetune_sdk.testing.tiny import tiny_model


def _pair(family: str = "llama", targets: object = "all-linear", **config):
    """Two identical LoRA models (lora_B non-zero, no dropout): PEFT's own, and fused LoRA + fused projections."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = get_peft_model(tiny_model(family, **config), LoraConfig(r=4, lora_dropout=0.0,
                                                                         target_modules=targets))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1, generator=torch.Generator().manual_seed(1))
        models.append(model.train())
    use_fused_lora(models[1])
    return models


def _loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _count_matmuls(model, ids) -> int:
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(input_ids=ids)
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm"))


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v with biases
def test_same_loss_and_gradients_as_peft_in_fp32(family):
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    reference, fused = _pair(family)
    assert fuse_frozen_projections(fused) == 4  # 2 layers x (q/k/v, gate/up)
    assert fuse_frozen_projections(fused) == 0  # a second call changes nothing
    ref_loss, ref_grads = _loss_and_grads(reference, ids)
    loss, grads = _loss_and_grads(fused, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_one_matmul_per_group_and_the_copy_is_counted():
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    reference, fused = _pair()
    fuse_frozen_projections(fused)
    # per layer q, k, v, gate, up -> 2 base matmuls instead of 5: 3 fewer, 2 layers
    assert _count_matmuls(reference, ids) - _count_matmuls(fused, ids) == 6
    config = fused.config
    kv = config.hidden_size // config.num_attention_heads * config.num_key_value_heads
    per_layer = config.hidden_size * (config.hidden_size + 2 * kv + 2 * config.intermediate_size)
    assert extra_bytes(fused) == per_layer * config.num_hidden_layers * 4
    assert extra_bytes(reference) == 0


def test_bf16_base_with_fp32_activations_matches_the_separate_casts():
    """Under dtype="auto"'s casts (bf16 matmuls, fp32 outputs) the fused group gives the separate layers' forward
    values; the gradients differ by bf16 rounding only (the fused backward rounds one bf16 sum over q, k and v where
    the separate layers round three and add them in fp32)."""
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    reference, fused = _pair()
    for model in (reference, fused):
        for param in model.parameters():
            if not param.requires_grad:
                param.data = param.data.to(torch.bfloat16)
        keep_activations_fp32(model)
    fuse_frozen_projections(fused)
    ref_loss, ref_grads = _loss_and_grads(reference, ids)
    loss, grads = _loss_and_grads(fused, ids)
    assert fused.base_model.model.model.layers[0].self_attn._finetune_sdk_fused_q_k_v_weight.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=2e-2, atol=1e-3, msg=name)


def test_saved_adapter_merge_and_state_dict_unchanged(tmp_path):
    """PEFT-format adapter with the original names, no fused buffer in any state dict, merges still exact."""
    from safetensors.torch import load_file

    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    reference, fused = _pair()
    fuse_frozen_projections(fused)
    assert fused.state_dict().keys() == reference.state_dict().keys()
    fused.save_pretrained(tmp_path / "fused")
    reference.save_pretrained(tmp_path / "reference")
    saved = load_file(tmp_path / "fused" / "adapter_model.safetensors")
    expected = load_file(tmp_path / "reference" / "adapter_model.safetensors")
    assert saved.keys() == expected.keys() and any(".q_proj.lora_A." in k for k in saved)
    for key in saved:
        torch.testing.assert_close(saved[key], expected[key])
    fused.eval(), reference.eval()
    with torch.no_grad():
        before = fused(input_ids=ids).logits
        fused.merge_adapter()  # changes the members' weights: the group must stop using its stale copy
        torch.testing.assert_close(fused(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
        fused.unmerge_adapter()
        torch.testing.assert_close(fused(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
        merged = fused.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, reference.merge_and_unload()(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_groups_with_a_plain_member_stay_separate():
    """PEFT's default Llama targets (q_proj, v_proj): k_proj is a plain Linear, so q/k/v is not fused."""
    _, fused = _pair(targets=["q_proj", "v_proj"])
    assert fuse_frozen_projections(fused) == 0


def test_the_training_memory_estimate_counts_the_concatenated_weights():
    """SmolLM2-135M's shape, bf16 base, all-linear: 30 layers x 576 x (576 + 192 + 192 + 1536 + 1536) x 2 bytes."""
    from transformers import LlamaConfig

    from finetune_sdk.advice.memory import estimate_training_memory

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    args = dict(technique="lora", dtype="bfloat16", lora_targets="all-linear", activation_dtype="float32")
    plain = estimate_training_memory(config, **args)
    fused = estimate_training_memory(config, fused_projections=True, **args)
    assert fused.weights - plain.weights == 30 * 576 * (576 + 192 + 192 + 1536 + 1536) * 2
    attention_only = estimate_training_memory(config, **{**args, "lora_targets": ["q_proj", "k_proj", "v_proj"]},
                                              fused_projections=True)
    assert attention_only.weights - estimate_training_memory(
        config, **{**args, "lora_targets": ["q_proj", "k_proj", "v_proj"]}).weights == 30 * 576 * 960 * 2

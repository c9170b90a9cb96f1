"""Fused LoRA layers: the same values and gradients as PEFT's, less saved memory, PEFT's path where not covered."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from finetune_sdk import Trainer
from finetune_sdk.speed import fused_lora
from finetune_sdk.speed.fused_lora import keep_mask, use_fused_lora
from finetune_sdk.testing.tiny import tiny_model


def _lora(dropout: float, seed: int = 0):
    torch.manual_seed(seed)
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_dropout=dropout, target_modules="all-linear"))
    for name, param in model.named_parameters():  # LoRA B starts at zero: give it values so A gets gradients
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1, generator=torch.Generator().manual_seed(1))
    return model.train()


def _saved_bytes(model, ids) -> tuple[int, torch.Tensor]:
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    return sum(storages.values()), loss


def test_same_loss_and_gradients_as_peft_with_the_same_mask(monkeypatch):
    """With the masks that nn.Dropout drew, the fused layer gives PEFT's loss and every gradient."""
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    reference, fused = _lora(0.3), _lora(0.3)
    masks: list[torch.Tensor] = []

    def record(module, args, output):  # the mask nn.Dropout used: where the output is not zero
        masks.append(output != 0)

    for module in reference.modules():
        if isinstance(module, torch.nn.Dropout):
            module.register_forward_hook(record)
    reference(input_ids=ids, labels=ids).loss.backward()
    assert use_fused_lora(fused) == len(masks) > 0
    replay = iter(masks)
    monkeypatch.setattr(fused_lora, "keep_mask", lambda shape, p, device: next(replay))  # the same masks, in order
    loss = fused(input_ids=ids, labels=ids).loss
    loss.backward()
    ref_loss = reference(input_ids=ids, labels=ids).loss  # eval-free second forward only for the dtype check
    assert loss.dtype == ref_loss.dtype
    grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    for name, param in fused.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_less_saved_memory_and_plain_linear_in_eval_and_saved_names_unchanged(tmp_path):
    ids = torch.randint(0, 64, (4, 64), generator=torch.Generator().manual_seed(0))
    plain, fused = _lora(0.1), _lora(0.1)
    use_fused_lora(fused)
    assert use_fused_lora(fused) == 0  # a second call changes nothing
    plain_bytes, _ = _saved_bytes(plain, ids)
    fused_bytes, _ = _saved_bytes(fused, ids)
    no_dropout_bytes, _ = _saved_bytes(_lora(0.0), ids)
    assert fused_bytes < plain_bytes * 0.85
    assert fused_bytes < no_dropout_bytes * 1.2  # one byte per element more than no dropout at all
    fused.eval()
    plain.load_state_dict(fused.state_dict())
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits)
    fused.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    assert all("lora_A.weight" in k or "lora_B.weight" in k for k in load_file(tmp_path / "adapter_model.safetensors"))


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_keep_mask_keeps_one_minus_p_of_the_elements_independently(p):
    """The CPU mask's 16-bit lanes: the kept share is 1 - p in every lane, neighbours are independent."""
    torch.manual_seed(0)
    mask = keep_mask((1000, 1001), p, "cpu")  # an odd size: the last 64-bit draw is only partly used
    assert mask.dtype == torch.bool and mask.shape == (1000, 1001)
    flat = mask.view(-1)[: 1000 * 1000].view(-1, 4).double()
    tolerance = 5 * (p * (1 - p) / flat.shape[0]) ** 0.5  # five standard errors of a lane's share
    for lane in range(4):
        assert abs(flat[:, lane].mean().item() - (1 - p)) < tolerance, lane
    both = (flat[:, 0] * flat[:, 1]).mean().item()  # independence of neighbouring lanes of one draw
    assert abs(both - (1 - p) ** 2) < tolerance * 2
    with pytest.raises(ValueError, match="dropout probability"):
        keep_mask((2, 2), 1.0, "cpu")


def test_dropout_keeps_the_expected_value():
    """E[layer(x)] with dropout = layer(x) without: the 1 / (1 - p) scale, now on the rank-r side, is applied."""
    model = _lora(0.5)
    use_fused_lora(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = 1 + 0.1 * torch.randn(20000, layer.in_features, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    with torch.no_grad():
        mean = layer(x).mean(0)
        layer.eval()
        exact, base = layer(x).mean(0), layer.base_layer(x).mean(0)
    update = exact - base
    assert update.abs().max() > 0.3  # without the scale the mean update would be half: 0.15 off
    torch.testing.assert_close(mean - base, update, atol=0.02, rtol=0)


def _peft_pair(seed: int = 0, **config):
    """Two identical LoRA models (lora_B non-zero), the second fused."""
    models = []
    for _ in range(2):
        torch.manual_seed(seed)
        model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules="all-linear", **config))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1, generator=torch.Generator().manual_seed(1))
        models.append(model.train())
    assert use_fused_lora(models[1]) > 0
    return models


def _loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_without_dropout_equal_to_peft_in_fp32_and_under_a_bf16_base(base_dtype):
    """No dropout: PEFT's loss and gradients; with a bf16 base under fp32 adapters (result and lora_B dtypes
    differ) the update is cast and added as PEFT does."""
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    reference, fused = _peft_pair(lora_alpha=16, lora_dropout=0.0)
    for model in (reference, fused):
        for name, param in model.named_parameters():
            if not param.requires_grad:
                param.data = param.data.to(base_dtype)
    ref_loss, ref_grads = _loss_and_grads(reference, ids)
    loss, grads = _loss_and_grads(fused, ids)
    tolerance = {} if base_dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-3}
    torch.testing.assert_close(loss, ref_loss, **tolerance)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], msg=name, **tolerance)


def test_peft_paths_it_does_not_cover_still_work():
    """Disabled adapters, merged weights, two active adapters and DoRA take PEFT's own forward."""
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    reference, fused = _peft_pair(lora_dropout=0.0)
    reference.eval(), fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, reference(input_ids=ids).logits)
        with fused.disable_adapter(), reference.disable_adapter():
            torch.testing.assert_close(fused(input_ids=ids).logits, reference(input_ids=ids).logits)
        before = fused(input_ids=ids).logits
        fused.merge_adapter()
        torch.testing.assert_close(fused(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
        fused.unmerge_adapter()
        for model in (reference, fused):
            torch.manual_seed(2)  # the same random "second" adapter in both
            model.add_adapter("second", LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
            model.base_model.set_adapter(["default", "second"])
        use_fused_lora(fused)
        torch.testing.assert_close(fused(input_ids=ids).logits, reference(input_ids=ids).logits)
    dora = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_dropout=0.1, use_dora=True,
                                                         target_modules=["q_proj"]))
    assert use_fused_lora(dora) == 0


def test_dropout_off_in_eval_and_under_dropout_disabled():
    """The fused layer reads PEFT's nn.Dropout at each call: eval mode and dropout_disabled give p = 0."""
    from finetune_sdk.objectives.dpo_training import dropout_disabled

    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    model = _lora(0.5)
    use_fused_lora(model)
    torch.manual_seed(0)
    dropped = model(input_ids=ids, labels=ids).loss
    with dropout_disabled(model):
        kept = [model(input_ids=ids, labels=ids).loss for _ in range(2)]
    assert kept[0] == kept[1] != dropped
    with torch.no_grad():
        assert model.eval()(input_ids=ids, labels=ids).loss == kept[0]


def test_dropout_is_drawn_from_the_seeded_generator():
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(2):
        model = _lora(0.5)
        use_fused_lora(model)
        torch.manual_seed(123)
        losses.append(model(input_ids=ids, labels=ids).loss)
    model = _lora(0.5)
    use_fused_lora(model)
    torch.manual_seed(124)
    assert losses[0] == losses[1] != model(input_ids=ids, labels=ids).loss


def test_training_runs_use_it(tiny_models, tmp_path, qa_rows, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="finetune_sdk")
    Trainer(tiny_models("llama"), formatter="chatml", output_dir=tmp_path / "a", max_steps=1, progress=False,
            lora_dropout=0.1).fit(qa_rows)
    assert "fused LoRA layers" in caplog.text


def test_activation_checkpointing_replays_the_same_dropout_masks(monkeypatch):
    """Recomputing a checkpointed block draws the same masks (torch.utils.checkpoint restores the RNG state), so
    loss and gradients equal those of the same seeded step without checkpointing."""
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    results, draws = [], []
    original = fused_lora.keep_mask
    monkeypatch.setattr(fused_lora, "keep_mask", lambda *a: draws.append(1) or original(*a))
    for checkpointing in (False, True):
        draws.clear()
        model = _lora(0.3)
        use_fused_lora(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(7)
        results.append(_loss_and_grads(model, ids))
        results[-1] += (len(draws),)
    (loss, grads, plain_draws), (checkpointed_loss, checkpointed_grads, recomputed_draws) = results
    assert recomputed_draws == 2 * plain_draws > 0  # the blocks really were recomputed
    torch.testing.assert_close(checkpointed_loss, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def _adapter_matmul_dtypes(model, ids, rank: int) -> list[torch.dtype]:
    """The dtypes of the matmuls with a rank-sized operand (the adapters') in one forward and backward pass."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list[torch.dtype] = []

    class Matmuls(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                operands = [a for a in args if isinstance(a, torch.Tensor)][-2:]
                if any(rank in a.shape for a in operands):
                    seen.append(operands[0].dtype if operands[0].dtype == operands[1].dtype else None)
            return func(*args, **(kwargs or {}))

    with Matmuls():
        model(input_ids=ids, labels=ids).loss.backward()
    return seen


def _bf16_base(model):
    from finetune_sdk.speed.precision import keep_activations_fp32

    for param in model.parameters():
        if not param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    keep_activations_fp32(model)
    return model


@pytest.mark.parametrize("projections", [False, True])
def test_bf16_adapter_matmuls_match_peft_within_bf16_tolerance(monkeypatch, projections):
    """Issue 23: under auto's bf16 base, lora_A's forward and weight gradient run in bf16 on the layer's cast input;
    loss and gradients stay PEFT's within bf16 rounding, for the same dropout masks, and the gradients are fp32."""
    from finetune_sdk.speed.fused_lora import set_adapter_matmuls
    from finetune_sdk.speed.fused_projections import fuse_frozen_projections

    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    reference, fused = _bf16_base(_lora(0.3)), _bf16_base(_lora(0.3))
    masks: list[torch.Tensor] = []
    for module in reference.modules():
        if isinstance(module, torch.nn.Dropout):
            module.register_forward_hook(lambda m, a, out: masks.append(out != 0))
    ref_loss, ref_grads = _loss_and_grads(reference, ids)
    use_fused_lora(fused)
    if projections:
        assert fuse_frozen_projections(fused) == 4
    layers = set_adapter_matmuls(fused, torch.bfloat16)
    assert layers == len(masks) == 14  # 2 decoder layers x 7 linears
    replay = iter(masks)
    monkeypatch.setattr(fused_lora, "keep_mask", lambda shape, p, device: next(replay))
    loss, grads = _loss_and_grads(fused, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-3, atol=2e-3)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name
        torch.testing.assert_close(grad, ref_grads[name], rtol=3e-2, atol=2e-3, msg=name)
    replay = iter(masks)
    dtypes = _adapter_matmul_dtypes(fused, ids, rank=4)
    # per layer: lora_A forward and weight gradient in bf16; lora_B's sum, its gradient and grad x stay fp32
    assert dtypes.count(torch.bfloat16) == 2 * layers and dtypes.count(torch.float32) >= 3 * layers
    set_adapter_matmuls(fused, None)
    replay = iter(masks)
    assert _adapter_matmul_dtypes(fused, ids, rank=4).count(torch.bfloat16) == 0  # None: fp32 again


def test_bf16_adapter_matmuls_leave_saving_and_merging_as_they_were(tmp_path):
    """The master weights stay fp32 parameters under PEFT's names; a merge takes PEFT's path and gives the same
    logits as the bf16-matmul forward within bf16 rounding; unmerging returns to it."""
    from safetensors.torch import load_file

    from finetune_sdk.speed.fused_lora import set_adapter_matmuls

    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    plain, fused = _bf16_base(_lora(0.0)), _bf16_base(_lora(0.0))
    use_fused_lora(fused)
    set_adapter_matmuls(fused, torch.bfloat16)
    optimizer = torch.optim.AdamW([p for p in fused.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        _loss_and_grads(fused, ids)
        optimizer.step()
    assert all(p.dtype == torch.float32 for n, p in fused.named_parameters() if "lora_" in n)
    fused.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all(v.dtype == torch.float32 for v in saved.values())
    for name, param in fused.named_parameters():
        if "lora_" in name:
            key = name.replace(".default", "")
            torch.testing.assert_close(saved[key], param.detach(), rtol=0, atol=0)
    plain.load_state_dict(fused.state_dict())
    fused.eval(), plain.eval()
    with torch.no_grad():
        before = fused(input_ids=ids).logits
        torch.testing.assert_close(before, plain(input_ids=ids).logits, rtol=2e-2, atol=2e-2)
        fused.merge_adapter()
        assert all(m.merged for m in fused.modules() if getattr(type(m), "_finetune_sdk_fused", False))
        torch.testing.assert_close(fused(input_ids=ids).logits, plain.merge_and_unload()(input_ids=ids).logits)
        fused.unmerge_adapter()
        torch.testing.assert_close(fused(input_ids=ids).logits, before, rtol=2e-2, atol=2e-2)


def test_bf16_adapter_matmuls_only_on_autos_bf16_cpu_path(monkeypatch):
    from finetune_sdk.speed.fused_lora import bf16_adapter_matmuls
    from finetune_sdk.speed.precision import Precision

    model = torch.nn.Linear(2, 2)
    auto_bf16 = Precision("bfloat16", None, "float32", True, "auto", activations="float32")
    assert bf16_adapter_matmuls(auto_bf16, model)
    assert not bf16_adapter_matmuls(Precision("float32", None, "float32", False, "fp32"), model)
    assert not bf16_adapter_matmuls(Precision("bfloat16", None, "float32", False, "dtype=bfloat16 given"), model)
    monkeypatch.setenv("FINETUNE_SDK_BF16_ADAPTERS", "0")
    assert not bf16_adapter_matmuls(auto_bf16, model)
    monkeypatch.setenv("FINETUNE_SDK_BF16_ADAPTERS", "1")
    assert bf16_adapter_matmuls(Precision("float32", None, "float32", False, "fp32"), model)

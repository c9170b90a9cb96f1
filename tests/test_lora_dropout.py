"""LoRA dropout without the dropped copy: same values and gradients as PEFT's, less saved memory."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from finetune_sdk import Trainer
from finetune_sdk import lora_dropout
from finetune_sdk.lora_dropout import keep_mask, use_memory_efficient_dropout
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
    assert use_memory_efficient_dropout(fused) == len(masks) > 0
    replay = iter(masks)
    monkeypatch.setattr(lora_dropout, "keep_mask", lambda shape, p, device: next(replay))  # the same masks, in order
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
    use_memory_efficient_dropout(fused)
    assert use_memory_efficient_dropout(fused) == 0  # a second call changes nothing
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
    """E[linear(dropout(x))] = linear(x): the 1 / (1 - p) scale, now on the rank-r output, is still applied."""
    model = _lora(0.5)
    use_memory_efficient_dropout(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"]
    x = 1 + 0.1 * torch.randn(20000, layer.in_features, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    mean = layer(x).mean(0).detach()
    with torch.no_grad():
        exact = torch.nn.functional.linear(x, layer.weight).mean(0)
    assert exact.abs().min() > 0.05  # without the scale the mean would be half of this
    torch.testing.assert_close(mean, exact, atol=0.01, rtol=0.02)


def test_dropout_is_drawn_from_the_seeded_generator():
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(2):
        model = _lora(0.5)
        use_memory_efficient_dropout(model)
        torch.manual_seed(123)
        losses.append(model(input_ids=ids, labels=ids).loss)
    model = _lora(0.5)
    use_memory_efficient_dropout(model)
    torch.manual_seed(124)
    assert losses[0] == losses[1] != model(input_ids=ids, labels=ids).loss


def test_training_runs_use_it_and_dora_keeps_peft_dropout(tiny_models, tmp_path, qa_rows, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="finetune_sdk")
    Trainer(tiny_models("llama"), formatter="chatml", output_dir=tmp_path / "a", max_steps=1, progress=False,
            lora_dropout=0.1).fit(qa_rows)
    assert "LoRA dropout" in caplog.text
    dora = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_dropout=0.1, use_dora=True,
                                                         target_modules=["q_proj"]))
    assert use_memory_efficient_dropout(dora) == 0

"""Fused LoRA layers: one autograd function for a LoRA layer's dropout, ``lora_A``, ``lora_B``, scaling and sum.

PEFT computes a vanilla LoRA layer as ``result + lora_B(lora_A(dropout(x))) * scaling``: five operations, three of
them (``lora_B``'s output, its scaled copy, the sum) on tensors of the layer's output size, and with dropout two more
of its input size that autograd keeps until the backward pass (``nn.Dropout``'s mask, on the CPU a float tensor the
input's size, and the dropped copy ``lora_A`` saves). On a 2-core CPU these memory-bound passes cost as much as the
matmuls: in one SmolLM2-135M LoRA step (r=16, all linear layers, dropout 0.05, 2,035 tokens) drawing the masks took
more time than every matmul of the frozen base.

:func:`use_fused_lora` gives each vanilla LoRA layer a forward that computes the same sum in one autograd function
(:class:`LoraUpdate`):

* ``h = lora_A(where(keep, x, 0))``, a rank-r tensor, is scaled by ``scaling / (1 - p)`` (rank r: cheap);
* ``result + h @ lora_B.T`` is one ``addmm`` (the output-size tensors are read and written once);
* autograd keeps ``x`` (the layer's input, shared with its neighbours and usually kept anyway), the mask as one
  byte per element and ``h``; the backward pass rebuilds the dropped input from ``x`` and the mask.

The dropout mask is drawn from the default generator (:func:`keep_mask`: 16 random bits per element on the CPU), so
seeds, the RNG state saved with checkpoints and activation checkpointing's recomputation behave as with
``nn.Dropout``; the dropout probability is read from PEFT's ``nn.Dropout`` at each call (so ``model.eval()`` and
:func:`finetune_sdk.objectives.dpo_training.dropout_disabled` switch it off). Values and gradients equal PEFT's for the same mask
(tests/test_fused_lora.py); the random stream differs from ``nn.Dropout``'s, so a run's numbers are not
bit-identical to plain PEFT's. Layers or calls it does not cover (a PEFT variant such as DoRA, ``lora_bias``,
several active adapters, mixed-adapter batches, merged or disabled adapters) take PEFT's own forward; saved adapters
are unchanged (the parameters and their names stay PEFT's).

Example:
    >>> import torch
    >>> from peft import LoraConfig, get_peft_model
    >>> from finetune_sdk.testing.tiny import tiny_model
    >>> model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear"))
    >>> use_fused_lora(model) > 0
    True
"""

from __future__ import annotations

import functools
import math
from typing import Any

_ROW = 4096  # lanes per row of the mask's compare (a multiple of 4)


def use_fused_lora(model: Any) -> int:
    """Give every vanilla LoRA layer of ``model`` the fused forward (:class:`LoraUpdate`); returns how many.

    A layer qualifies when its ``lora_A``/``lora_B`` are plain ``nn.Linear`` without bias, it has no PEFT variant
    (DoRA) and its dropout is ``nn.Dropout`` or ``nn.Identity``. A second call changes nothing; nothing is raised:
    layers it does not recognise are left as PEFT made them.
    """
    import torch

    changed = 0
    for module in model.modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if (getattr(module, "_finetune_sdk_fused", False) or not isinstance(lora_a, torch.nn.ModuleDict)
                or not isinstance(lora_b, torch.nn.ModuleDict) or not hasattr(module, "base_layer")):
            continue
        drops = getattr(module, "lora_dropout", {})
        if not all(type(lora_a[n]) is torch.nn.Linear and lora_a[n].bias is None and n in lora_b
                   and type(lora_b[n]) is torch.nn.Linear and lora_b[n].bias is None and n in drops
                   and isinstance(drops[n], (torch.nn.Dropout, torch.nn.Identity))
                   and n not in getattr(module, "lora_variant", {}) for n in lora_a):
            continue
        module.__class__ = _fused_class(type(module))
        changed += 1
    return changed


def bf16_adapter_matmuls(precision: Any, model: Any) -> bool:
    """Whether a training run computes its adapters' input-side matmuls in bf16 (:func:`set_adapter_matmuls`).

    ``FINETUNE_SDK_BF16_ADAPTERS=1``/``0`` decides when set; else on where measured faster: ``dtype="auto"``'s bf16
    path on the CPU (a bf16 frozen base with fp32 activations on a CPU with AMX or AVX512-BF16), off elsewhere (fp32
    runs; GPUs, where autocast is the way, not measured).
    """
    import os

    chosen = os.environ.get("FINETUNE_SDK_BF16_ADAPTERS", "")
    if chosen in ("0", "1"):
        return chosen == "1"
    device = next(iter(model.parameters())).device.type if any(True for _ in model.parameters()) else "cpu"
    return device == "cpu" and precision.dtype == "bfloat16" and precision.activations == "float32"


def set_adapter_matmuls(model: Any, dtype: Any) -> int:
    """Let every fused LoRA layer of ``model`` run ``lora_A``'s forward and weight-gradient matmuls in ``dtype``
    (``torch.bfloat16``; ``None``: fp32 again) on its fp32 input cast once, shared with the frozen layer's own
    cast; the LoRA weights, their gradients and the optimizer state stay fp32 (see :class:`LoraUpdate`). Returns
    how many layers it set."""
    count = 0
    for module in model.modules():
        if getattr(type(module), "_finetune_sdk_fused", False):
            module._finetune_sdk_adapter_matmuls = dtype
            count += 1
    return count


def keep_mask(shape: tuple[int, ...], p: float, device: Any) -> Any:
    """A bool tensor of ``shape``: each element ``True`` (kept) with probability ``1 - p``, from the default generator.

    On the CPU the mask comes from 16 random bits per element, four to each 64-bit draw (``Tensor.random_``): torch's
    CPU generator draws one number per element whatever its width, so ``torch.bernoulli`` on a float tensor (one
    draw, a float conversion and a compare per element) took 8.7 ms for a 2,048 x 576 input against about 2 ms this
    way (2-core AMD EPYC). The keep probability is ``1 - p`` rounded to a multiple of 2^-16 (2^-15 for every fourth
    lane, whose top bit ``random_`` leaves clear; at least one level kept): within 2^-16 of ``1 - p``. Other devices
    use ``Tensor.bernoulli_``.

    Raises ``ValueError`` if ``p`` is not in ``[0, 1)``.
    """
    import torch

    if not 0 <= p < 1:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1.0 - p)
    count = math.prod(shape)
    thresholds = _lane_thresholds(1.0 - p)  # one row of _ROW lanes: as fast as a compare with a scalar
    draws = torch.empty(-(-count // _ROW) * _ROW // 4, dtype=torch.int64).random_()  # uniform on [0, 2^63)
    lanes = draws.view(torch.int16).view(-1, _ROW)  # little-endian: lanes 4k..4k+2 uniform int16, 4k+3 on [0, 2^15)
    return (lanes <= thresholds).view(-1)[:count].view(shape)


@functools.lru_cache(maxsize=16)
def _lane_thresholds(keep: float) -> Any:
    import torch

    def highest_kept(levels: int, lowest: int) -> int:  # a lane is kept when <= this: round(keep * levels) values
        return max(lowest, min(32767, lowest + round(keep * levels) - 1))

    four = [highest_kept(65536, -32768)] * 3 + [highest_kept(32768, 0)]
    return torch.tensor(four, dtype=torch.int16).repeat(_ROW // 4)


@functools.cache
def _fused_class(peft_class: type) -> type:
    """``peft_class`` with :func:`_fused_forward` as its forward (one subclass per PEFT layer class)."""
    return type(f"Fused{peft_class.__name__}", (peft_class,),
                {"forward": _fused_forward, "_finetune_sdk_fused": True, "_finetune_sdk_peft_class": peft_class})


def _fused_forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    """PEFT's forward for one active vanilla adapter, as one :class:`LoraUpdate`; anything else goes to PEFT."""
    import torch

    from finetune_sdk.speed.fused_projections import cast_output, grouped_output

    active = self.active_adapters
    name = active[0] if len(active) == 1 else None
    if (name is None or name not in self.lora_A or self.disable_adapters or self.merged
            or kwargs.get("adapter_names") is not None or name in getattr(self, "lora_variant", {})
            or self.lora_B[name].bias is not None  # an adapter added later with lora_bias
            or torch.is_autocast_enabled(x.device.type)):  # autocast: PEFT's forward, autocast's casts
        return self._finetune_sdk_peft_class.forward(self, x, *args, **kwargs)
    self._check_forward_args(x, *args, **kwargs)
    kwargs.pop("adapter_names", None)
    for key in _variant_kwarg_keys():  # PEFT's forward keeps these from the base layer too
        kwargs.pop(key, None)
    low = getattr(self, "_finetune_sdk_adapter_matmuls", None)  # bf16 adapter matmuls (adapter_matmuls_in)
    served = None
    if not args and not kwargs:  # q/k/v, gate/up: one matmul; else one cast of x shared with the adapter
        served = grouped_output(self, x)
        if served is None and low is not None:
            served = cast_output(self.base_layer, x)
    result, cast = served if served is not None else (self.base_layer(x, *args, **kwargs), None)
    lora_a, lora_b, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    x = self._cast_input_dtype(x, lora_a.weight.dtype)
    scaling = float(self.scaling[name])
    if low is not None and x.dtype == torch.float32 and lora_a.weight.dtype == torch.float32:
        low_x = (cast if cast is not None and cast.dtype == low else x.to(low)).detach()
        low_a = _scaled_low_weight(lora_a, scaling / (1.0 - p), low)
    else:
        low_x = low_a = None
    return lora_update()(result, x, lora_a.weight, lora_b.weight, scaling, p, low_x, low_a)


def _scaled_low_weight(lora_a: Any, scale: float, dtype: Any) -> Any:
    """``lora_A``'s weight times ``scale`` in ``dtype`` ([r, in]), made once per weight update: cached on the layer
    under the weight's storage, version (the optimizer's in-place step bumps it) and the scale."""
    import torch

    weight = lora_a.weight
    key = (weight.data_ptr(), weight._version, scale, dtype)
    cached = getattr(lora_a, "_finetune_sdk_low_weight", None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, (weight * scale).to(dtype))
        lora_a._finetune_sdk_low_weight = cached
    return cached[1]


@functools.cache
def _variant_kwarg_keys() -> tuple[str, ...]:
    from peft.tuners.lora import layer

    return tuple(getattr(layer, "VARIANT_KWARG_KEYS", ()))


@functools.cache
def lora_update() -> Any:
    """The :class:`LoraUpdate` function's ``apply`` (built on first use: importing this module imports no torch)."""
    return _lora_update_class().apply


@functools.cache
def _lora_update_class() -> type:
    import torch
    from torch.nn import functional as F

    class LoraUpdate(torch.autograd.Function):
        """``result + scaling * lora_B(lora_A(dropout(x)))`` keeping ``x``, a bool mask and the rank-r ``h``.

        Shapes: ``result`` ``[..., out]``, ``x`` ``[..., in]``, ``weight_a`` ``[r, in]``, ``weight_b`` ``[out, r]``;
        the output has ``result``'s shape and dtype. The dropout's ``1 / (1 - p)`` and the LoRA ``scaling`` are
        applied on the rank-r side; the sum is one ``addmm`` when ``result`` and ``weight_b`` share a dtype (else
        it is computed in the promoted dtype and cast to ``result``'s, as PEFT does).

        ``low_x``, ``low_a`` (optional): ``x`` already cast to bf16 (detached; the frozen layer's own cast) and
        ``weight_a * scaling / (1 - p)`` in bf16: then the matmuls that read the layer's input, ``lora_A``'s forward
        and its weight gradient, run in bf16 (AMX; fp32 accumulation inside the kernel, results widened to fp32),
        and ``low_x`` is what is kept for the backward pass instead of ``x``. The rank-r side, the fp32 sum with
        ``result``, ``lora_B``'s gradient and the input gradient stay fp32; the gradients returned for the fp32
        master weights are fp32.
        """

        @staticmethod
        def forward(ctx: Any, result: Any, x: Any, weight_a: Any, weight_b: Any, scaling: float, p: float,
                    low_x: Any = None, low_a: Any = None) -> Any:
            source = x if low_x is None else low_x
            keep = keep_mask(tuple(x.shape), p, x.device) if p > 0 else None
            dropped = source if keep is None else torch.where(keep, source, 0)
            ctx.scale = scaling / (1.0 - p)
            ctx.x_dtype = x.dtype
            if low_x is None:
                h = F.linear(dropped, weight_a) * ctx.scale  # [..., r]
            else:  # bf16 x bf16 (the scale folded into low_a) -> bf16 (rank r), widened for the fp32 sum
                h = F.linear(dropped, low_a).to(weight_a.dtype)
            ctx.save_for_backward(source, keep, weight_a, weight_b, h)
            if result.dtype == weight_b.dtype:
                return torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]),
                                   weight_b.t()).view(result.shape)
            return (result + F.linear(h, weight_b)).to(result.dtype)  # PEFT's promotion: the sum, then cast

        @staticmethod
        def backward(ctx: Any, grad_output: Any) -> Any:
            source, keep, weight_a, weight_b, h = ctx.saved_tensors
            grad_2d = grad_output.reshape(-1, grad_output.shape[-1]).to(weight_b.dtype)
            h_2d = h.reshape(-1, h.shape[-1])
            grad_x = grad_a = grad_b = None
            grad_h = (grad_2d @ weight_b) * ctx.scale  # [tokens, r]: the gradient of lora_A's output
            if ctx.needs_input_grad[3]:
                grad_b = grad_2d.t() @ h_2d.to(weight_b.dtype)
            if ctx.needs_input_grad[2]:
                dropped = source if keep is None else torch.where(keep, source, 0)
                dropped = dropped.reshape(-1, source.shape[-1])
                if source.dtype == weight_a.dtype:
                    grad_a = grad_h.t() @ dropped
                elif source.dtype == ctx.x_dtype:  # a 16-bit x under fp32 adapters (PEFT's promotion)
                    grad_a = grad_h.t() @ dropped.to(weight_a.dtype)
                else:  # bf16 adapter matmuls: [r, tokens] @ [tokens, in] on AMX, widened for the fp32 master
                    grad_a = (grad_h.to(source.dtype).t() @ dropped).to(weight_a.dtype)
            if ctx.needs_input_grad[1]:
                grad_x = (grad_h @ weight_a).view(source.shape)
                grad_x = (grad_x if keep is None else torch.where(keep, grad_x, 0)).to(ctx.x_dtype)
            grad_result = grad_output if ctx.needs_input_grad[0] else None
            return grad_result, grad_x, grad_a, grad_b, None, None, None, None

    return LoraUpdate

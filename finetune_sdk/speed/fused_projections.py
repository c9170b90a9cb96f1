"""Fused frozen projections: q/k/v (and gate/up) of a frozen base as one matmul over concatenated weights.

A Llama-style decoder layer feeds the same input to three attention projections (``q_proj``, ``k_proj``,
``v_proj``) and two MLP projections (``gate_proj``, ``up_proj``). With a frozen base each is a separate small
matmul (SmolLM2-135M: 576 -> 576, 192, 192 and 576 -> 1536, 1536), and under ``dtype="auto"`` on a bf16 CPU each
also casts the same input to bf16 and its own output back to fp32. :func:`fuse_frozen_projections` builds, once at
prepare time, the concatenation of each group's frozen weights (``[sum(out), in]``, in the weights' dtype: a copy,
counted by :func:`extra_bytes` and in the training-memory estimate) and gives the group's layers a forward in which
the first of them computes ``x @ W_cat.T`` once (one cast of ``x``, one cast of the output), and each layer takes
its slice of the output; a LoRA layer then adds its update on its slice (:mod:`finetune_sdk.speed.fused_lora`), so the
values and gradients are PEFT's up to float summation order (tests/test_fused_projections.py, fp32).

Nothing a user sees changes: the parameters, their names and the saved adapters stay PEFT's, and the concatenated
weight is a non-persistent buffer (never saved). Each call checks that every member's weight is still the tensor
the copy was built from, unchanged (``data_ptr`` and ``_version``): after a merge, an unmerge, a device move or any
in-place edit the group's layers compute as before, separately. Layers with forward hooks other than the precision
casts of :func:`finetune_sdk.speed.precision.keep_activations_fp32`, trainable base weights, or members whose inputs differ
(the group is served only when its layers are called with the same tensor) also take the separate path.

Example:
    >>> from peft import LoraConfig, get_peft_model
    >>> from finetune_sdk.speed.fused_lora import use_fused_lora
    >>> from finetune_sdk.testing.tiny import tiny_model
    >>> model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules="all-linear"))
    >>> _ = use_fused_lora(model)
    >>> fuse_frozen_projections(model)  # two layers x (q/k/v + gate/up)
    4
"""

from __future__ import annotations

from typing import Any, TYPE_CHECKING

if TYPE_CHECKING:
    from finetune_sdk.speed.precision import Precision

#: Projections that read the same input, by their attribute names in transformers' Llama-style modules.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fuse_frozen_projections(model: Any) -> int:
    """Give each group of :data:`GROUPS` whose frozen base weights qualify one concatenated weight; returns how many.

    A group qualifies when every member is a fused LoRA layer (:func:`finetune_sdk.speed.fused_lora.use_fused_lora`) over
    a frozen ``nn.Linear``, all with the same ``in_features``, dtype and device, and either all or none with a bias
    (a plain frozen member, e.g. ``k_proj`` under PEFT's default Llama targets ``q_proj``/``v_proj``, leaves its
    group separate: its precision casts would hand each member a different input). A second call changes nothing;
    nothing is raised.
    """
    fused = 0
    for parent in list(model.modules()):
        for names in GROUPS:
            members = [getattr(parent, name, None) for name in names]
            bases = [_base_linear(m) for m in members]
            if any(b is None for b in bases) or any(getattr(m, "_finetune_sdk_group", None) for m in members):
                continue
            weights = [b.weight for b in bases]
            biases = [b.bias for b in bases]
            if (len({(w.shape[1], w.dtype, w.device) for w in weights}) != 1 or any(w.requires_grad for w in weights)
                    or len({b is None for b in biases}) != 1 or any(b is not None and b.requires_grad for b in biases)):
                continue
            group = ProjectionGroup(parent, "_".join(n.removesuffix("_proj") for n in names), bases)
            for index, member in enumerate(members):
                member._finetune_sdk_group = (group, index)
            fused += 1
    return fused


def use_fused_projections(precision: Precision, model: Any) -> bool:
    """Whether a training run fuses its frozen projections: ``FINETUNE_SDK_FUSED_PROJECTIONS=1``/``0`` decides when
    set; else on where measured faster: a bf16 frozen base with fp32 activations on the CPU (``dtype="auto"``'s bf16
    path, where fusing also saves two thirds of the casts), off elsewhere (fp32 on the CPU measured no faster, GPUs
    not measured)."""
    import os

    chosen = os.environ.get("FINETUNE_SDK_FUSED_PROJECTIONS", "")
    if chosen in ("0", "1"):
        return chosen == "1"
    device = next(iter(model.parameters())).device.type if any(True for _ in model.parameters()) else "cpu"
    return device == "cpu" and precision.dtype == "bfloat16" and precision.activations == "float32"


def extra_bytes(model: Any) -> int:
    """Bytes of the concatenated weights :func:`fuse_frozen_projections` added to ``model`` (0 when none)."""
    return sum(buffer.numel() * buffer.element_size() for name, buffer in model.named_buffers()
               if name.rsplit(".", 1)[-1].startswith("_finetune_sdk_fused_"))


def grouped_output(module: Any, x: Any) -> tuple[Any, Any] | None:
    """``module``'s frozen base output for ``x`` taken from its group's one matmul, with the input as that matmul
    read it (``x`` cast to the weights' dtype, or ``None`` when not cast); ``None``: compute it alone."""
    entry = getattr(module, "_finetune_sdk_group", None)
    return None if entry is None else entry[0].output(entry[1], x)


def cast_output(base: Any, x: Any) -> tuple[Any, Any] | None:
    """``(base(x), x_cast)`` for a frozen ``nn.Linear`` whose only hooks are both precision casts
    (:func:`finetune_sdk.speed.precision.keep_activations_fp32`): the same ``linear(x.to(weight.dtype)).float()``,
    also returning the cast input so that a LoRA update can read it (one cast per layer); ``None`` otherwise."""
    import torch
    from torch.nn import functional as F

    from finetune_sdk.speed.precision import PRECISION_HOOKS

    if type(base) is not torch.nn.Linear or base.weight.requires_grad:
        return None
    hooks = set(base._forward_hooks.values()) | set(base._forward_pre_hooks.values())
    if hooks != PRECISION_HOOKS or len(base._forward_hooks) != 1 or len(base._forward_pre_hooks) != 1:
        return None
    cast = x.to(base.weight.dtype)
    return F.linear(cast, base.weight, base.bias).to(torch.float32), cast


def _base_linear(module: Any) -> Any:
    import torch

    if module is None:
        return None
    base = getattr(module, "base_layer", None)
    if getattr(module, "_finetune_sdk_fused", False) and type(base) is torch.nn.Linear:
        return base
    return None


class ProjectionGroup:
    """The concatenated frozen weights of one group of projections and the output of its last matmul.

    ``weight``: ``[sum(out_features), in_features]`` (and ``bias`` ``[sum(out_features)]``), non-persistent buffers
    of ``parent`` named ``_finetune_sdk_fused_<name>_weight``/``_bias``; ``sizes``: each member's ``out_features``.
    """

    def __init__(self, parent: Any, name: str, bases: list[Any]) -> None:
        import torch

        self.parent, self.name, self.bases = parent, name, bases
        self.sizes = [b.out_features for b in bases]
        parent.register_buffer(f"_finetune_sdk_fused_{name}_weight",
                               torch.cat([b.weight.detach() for b in bases]), persistent=False)
        has_bias = bases[0].bias is not None
        parent.register_buffer(f"_finetune_sdk_fused_{name}_bias",
                               torch.cat([b.bias.detach() for b in bases]) if has_bias else None, persistent=False)
        self.stamps = self._stamps()
        self.pending: tuple[Any, Any, set[int], Any] | None = None  # (input, output slices, served, cast input)

    def _stamps(self) -> list[tuple[int, int]]:
        return [(t.data_ptr(), t._version) for b in self.bases for t in (b.weight, b.bias) if t is not None]

    def usable(self) -> bool:
        """True while every member's weight is the one the copy was built from and only the precision hooks run."""
        from finetune_sdk.speed.precision import PRECISION_HOOKS

        return self._stamps() == self.stamps and all(
            set(b._forward_hooks.values()) | set(b._forward_pre_hooks.values()) <= PRECISION_HOOKS
            for b in self.bases)

    def output(self, index: int, x: Any) -> tuple[Any, Any] | None:
        """``(member index's output for x, x as the matmul read it or None)``: the first call for an input runs the
        group's matmul, the others take their slices (each once); ``None`` when the group can't serve (module doc)."""
        import torch
        from torch.nn import functional as F

        pending = self.pending
        if pending is None or pending[0] is not x or index in pending[2]:
            if not self.usable():
                self.pending = None
                return None
            weight = getattr(self.parent, f"_finetune_sdk_fused_{self.name}_weight")
            bias = getattr(self.parent, f"_finetune_sdk_fused_{self.name}_bias")
            base = self.bases[0]
            cast = any(h.__name__ == "_input_to_weight_dtype" for h in base._forward_pre_hooks.values())
            read = x.to(weight.dtype) if cast else x
            out = F.linear(read, weight, bias)
            if any(h.__name__ == "_output_to_fp32" for h in base._forward_hooks.values()):
                out = out.to(torch.float32)
            pending = self.pending = (x, out.split(self.sizes, dim=-1), set(), read if cast else None)
        pending[2].add(index)
        result = pending[1][index], pending[3]
        if len(pending[2]) == len(self.sizes):
            self.pending = None  # every member served: hold no activations past the group
        return result

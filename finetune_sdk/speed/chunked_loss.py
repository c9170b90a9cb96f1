"""Chunked cross-entropy for causal-LM training and evaluation: the ``[tokens, vocab]`` logits never exist at once.

A causal LM's loss is usually computed from the full logits, ``tokens x vocab`` fp32 values (8 x 512 tokens over
SmolLM2's 49,152-token vocabulary: 805 MB), plus their log-softmax and gradient of the same size. Here the loss is
computed from the last hidden state in chunks of tokens: each chunk's logits are made, reduced to the loss, turned
into the gradient of the hidden state (and of the LM head's weight when it is trained) and freed before the next
chunk, as Liger Kernel's fused linear cross-entropy does (Hsu et al., 2024, arXiv:2410.10989). Tokens whose label is
ignored (-100: prompts, padding, the first token of each packed example) are skipped, so their logits are never
computed at all. The loss and gradients are those of ``torch.nn.functional.cross_entropy`` on the full logits, up to
float summation order (tests/test_chunked_loss.py).

Why not a package: cut-cross-entropy (Wijmans et al., 2024) installs here, but its kernels are Triton (CUDA only)
and its CPU fallback (``impl="torch_compile"``) builds the full logits; Liger Kernel is Triton-only as well. The
SDK trains on CPUs first, so the chunked loss is written here in plain PyTorch, which runs on every device.

It is used through :func:`chunked_loss`, which makes a supported model's forward return the loss without logits:

Example:
    >>> import torch
    >>> from finetune_sdk.testing.tiny import tiny_model
    >>> model = tiny_model("llama")
    >>> ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    >>> plain = model(input_ids=ids, labels=ids).loss
    >>> with chunked_loss(model) as active:
    ...     chunked = model(input_ids=ids, labels=ids).loss
    >>> active, torch.allclose(plain, chunked, rtol=1e-5)
    (True, True)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

IGNORE_INDEX = -100
#: fp32 logits per chunk (16 MiB): small enough for glibc to reuse the buffer from its heap (at most 32 MiB is
#: served from the heap; larger buffers are mapped and zero-filled by the kernel on every allocation).
CHUNK_ELEMENTS = 2**22
#: Model types whose causal-LM forward computes ``logits = lm_head(last_hidden_state)`` and passes them unchanged to
#: ``self.loss_function`` (no soft-capping or scaling of the logits): checked against transformers' source.
CHUNKED_LOSS_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2", "phi3", "olmo", "olmo2",
                                      "smollm3", "gemma"})


def chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk for a vocabulary of ``vocab_size``: ``CHUNK_ELEMENTS`` fp32 logits, at least 16 tokens.

    >>> chunk_tokens(49152), chunk_tokens(32000), chunk_tokens(100)
    (85, 131, 41943)
    """
    return max(16, CHUNK_ELEMENTS // max(vocab_size, 1))


def linear_cross_entropy(hidden: Any, weight: Any, targets: Any, bias: Any = None, *,
                         chunk_size: int | None = None) -> Any:
    """Summed cross-entropy of ``hidden @ weight.T (+ bias)`` against ``targets``, computed in chunks of tokens.

    Args:
        hidden: ``[N, H]`` hidden states (any float dtype; the logits are computed in it, then upcast to fp32 for
            the softmax, as transformers' loss does).
        weight: ``[V, H]`` output projection (the LM head); its gradient is computed only when it requires grad.
        targets: ``[N]`` int64 class ids in ``[0, V)``; no ignored entries (drop them first).
        bias: optional ``[V]``.
        chunk_size: tokens per chunk (default :func:`chunk_tokens`).

    Returns:
        A 0-d fp32 tensor: the sum of the N per-token losses; differentiable in ``hidden``, ``weight`` and ``bias``.
    """
    import torch

    chunk = chunk_size or chunk_tokens(weight.shape[0])
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        logits = torch.nn.functional.linear(_to_compute(hidden[start:start + chunk], weight), weight, bias).float()
        total += torch.nn.functional.cross_entropy(logits, targets[start:start + chunk], reduction="sum")
    return total


def _make_linear_cross_entropy() -> Any:
    import torch
    from torch.nn import functional as F

    class LinearCrossEntropy(torch.autograd.Function):
        """Forward computes the loss and, chunk by chunk, the gradients; backward scales them by the upstream one."""

        @staticmethod
        def forward(ctx: Any, hidden: Any, weight: Any, bias: Any, targets: Any, chunk: int) -> Any:
            needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
            grad_hidden = torch.empty_like(hidden) if needs_hidden else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
                if needs_weight else None
            grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if needs_bias else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk):
                h, t = _to_compute(hidden[start:start + chunk], weight), targets[start:start + chunk]
                logits = F.linear(h, weight, bias)
                compute_dtype = logits.dtype  # the weight's dtype, or autocast's
                logits = logits.float()
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                # d(sum of losses)/d(logits) = softmax - one_hot(target), built in place over the logits
                grad_logits = logits.sub_(lse[:, None]).exp_()
                grad_logits[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                if needs_bias:
                    grad_bias += grad_logits.sum(0)
                grad_logits = grad_logits.to(compute_dtype)
                if needs_hidden:
                    grad_hidden[start:start + chunk] = grad_logits @ weight.to(compute_dtype)
                if needs_weight:
                    grad_weight += (grad_logits.t() @ h.to(compute_dtype)).float()
            # kept on ctx, not saved as activations: the gradients stay as computed (no saved-tensor hooks, e.g.
            # precision auto's bf16 storage of saved activations, see finetune_sdk.speed.precision)
            ctx.grads = (grad_hidden, grad_weight, grad_bias)
            ctx.weight_dtype = weight.dtype
            ctx.bias_dtype = bias.dtype if bias is not None else None
            return total

        @staticmethod
        def backward(ctx: Any, grad_output: Any) -> Any:
            grad_hidden, grad_weight, grad_bias = ctx.grads
            del ctx.grads
            if grad_hidden is not None:
                grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
            if grad_weight is not None:
                grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype)
            if grad_bias is not None:
                grad_bias = (grad_bias * grad_output).to(ctx.bias_dtype)
            return grad_hidden, grad_weight, grad_bias, None, None

    return LinearCrossEntropy


def _to_compute(hidden: Any, weight: Any) -> Any:
    """``hidden`` in the head's dtype (fp32 activations over a 16-bit head), unless autocast decides."""
    import torch

    if hidden.dtype == weight.dtype or torch.is_autocast_enabled(hidden.device.type):
        return hidden
    return hidden.to(weight.dtype)


class _Lazy:
    """Builds the autograd Function on first use, so that importing this module does not import torch."""

    function: Any = None

    def apply(self, *args: Any) -> Any:
        if self.function is None:
            self.function = _make_linear_cross_entropy()
        return self.function.apply(*args)


_LinearCrossEntropy = _Lazy()


def causal_lm_loss(hidden: Any, labels: Any, head: Any, *, num_items_in_batch: Any = None,
                   shift_labels: Any = None, ignore_index: int = IGNORE_INDEX, chunk_size: int | None = None) -> Any:
    """transformers' causal-LM loss (``ForCausalLMLoss``) from the last hidden state instead of the logits.

    ``hidden`` is ``[B, T, H]``, ``labels`` ``[B, T]`` (position t is predicted from position t-1) or, with
    ``shift_labels``, already shifted. The result is the mean over the labelled tokens, or their sum divided by
    ``num_items_in_batch`` when given (gradient accumulation), as in transformers: NaN when no token is labelled
    and ``num_items_in_batch`` is not given, like the plain loss.
    """
    import torch

    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.reshape(-1).to(hidden.device)
    flat = hidden.reshape(-1, hidden.shape[-1])
    keep = (shift_labels != ignore_index).nonzero().squeeze(1)
    total = linear_cross_entropy(flat.index_select(0, keep), head.weight, shift_labels.index_select(0, keep),
                                 head.bias, chunk_size=chunk_size)
    if num_items_in_batch is None:
        return total / keep.numel()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def causal_lm(model: Any) -> Any:
    """The transformers causal-LM model inside ``model`` (DistributedDataParallel- and PEFT-wrapped or not)."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supports_chunked_loss(model: Any) -> bool:
    """True when the chunked loss computes exactly the model's own loss: a model type of
    :data:`CHUNKED_LOSS_MODEL_TYPES` whose LM head is a plain ``torch.nn.Linear`` without hooks (not adapted by
    LoRA, not quantized, not dispatched by accelerate). The casts :func:`finetune_sdk.speed.precision.keep_activations_fp32`
    puts on a 16-bit head (input to the weight's dtype, logits to fp32) are allowed: each chunk makes the same casts."""
    import torch

    base = causal_lm(model)
    config = getattr(base, "config", None)
    head = getattr(base, "lm_head", None)
    if getattr(config, "model_type", None) not in CHUNKED_LOSS_MODEL_TYPES or type(head) is not torch.nn.Linear:
        return False
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return False
    if hasattr(head, "_hf_hook"):
        return False
    from finetune_sdk.speed.precision import PRECISION_HOOKS

    # the SDK's own bf16-matmul/fp32-activation casts (precision auto) are what the chunks do themselves
    return all(hook in PRECISION_HOOKS for hook in (*head._forward_hooks.values(), *head._forward_pre_hooks.values()))


@contextmanager
def chunked_loss(model: Any, chunk_size: int | None = None) -> Iterator[bool]:
    """Within the block, ``model(..., labels=...)`` computes its loss with :func:`causal_lm_loss`; yields whether
    it does (False, and nothing changed, when :func:`supports_chunked_loss` is False).

    The model's ``lm_head`` is replaced by an identity for the block, so ``outputs.logits`` holds the last hidden
    state, not logits: callers use only ``outputs.loss`` inside the block.
    """
    import torch

    if not supports_chunked_loss(model):
        yield False
        return
    base = causal_lm(model)
    head = base.lm_head
    had_own = "_loss_function" in base.__dict__
    previous = base.__dict__.get("_loss_function")

    def loss_function(logits: Any, labels: Any, vocab_size: int | None = None, num_items_in_batch: Any = None,
                      ignore_index: int = IGNORE_INDEX, shift_labels: Any = None, **kwargs: Any) -> Any:
        return causal_lm_loss(logits, labels, head, num_items_in_batch=num_items_in_batch,
                              shift_labels=shift_labels, ignore_index=ignore_index, chunk_size=chunk_size)

    base.lm_head = torch.nn.Identity()
    base.loss_function = loss_function
    try:
        yield True
    finally:
        base.lm_head = head
        if had_own:
            base.loss_function = previous
        else:
            del base._loss_function


def chunked_loss_trainer_class(cls: Any) -> Any:
    """A subclass of the transformers ``Trainer`` class ``cls`` whose ``compute_loss`` runs in :func:`chunked_loss`
    (training and evaluation steps; a model it does not support takes the plain loss)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    class ChunkedLossTrainer(cls):  # type: ignore[misc, valid-type]
        def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            with chunked_loss(model) as active:
                result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                              num_items_in_batch=num_items_in_batch)
            if active and return_outputs:  # the outputs' "logits" are hidden states: keep only the loss
                return result[0], CausalLMOutputWithPast(loss=result[0])
            return result

    ChunkedLossTrainer.__name__ = ChunkedLossTrainer.__qualname__ = f"ChunkedLoss{cls.__name__}"
    return ChunkedLossTrainer


def summed_causal_lm_loss(model: Any, input_ids: Any, attention_mask: Any, labels: Any,
                          use_chunked: bool = True) -> tuple[float, int]:
    """``(sum of per-token losses, labelled tokens)`` of ``model`` on a padded batch, without gradients: chunked
    when the model supports it and ``use_chunked``, else from the full logits."""
    import torch

    count = int((labels[:, 1:] != IGNORE_INDEX).sum())
    with torch.no_grad(), (chunked_loss(model) if use_chunked else _inactive()) as active:
        if active:
            out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, num_items_in_batch=1)
            return float(out.loss), count
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        total = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                  labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
                                                  reduction="sum")
        return float(total), count


@contextmanager
def _inactive() -> Iterator[bool]:
    yield False

"""Which precision a run trains in: ``dtype="auto"`` picks bf16 for a frozen base where the hardware is fast at it.

With ``dtype="auto"`` and neither ``bf16`` nor ``fp16`` given, an adapter technique (LoRA, or a plugin technique that
saves a PEFT adapter) on a full-precision base gets its frozen base weights in bfloat16 when the device computes
bf16 natively: a CUDA GPU with bf16 support, or a CPU with AVX512-BF16 or AMX (``torch.cpu`` reports both). The
base's matmuls then run in bf16 without autocast, while the activations between them (:func:`keep_activations_fp32`:
without it, a LoRA update smaller than half a bf16 step of the frozen layer's output is rounded away, and the
adapter learned visibly slower than in fp32), the trainable parameters (PEFT creates LoRA weights in fp32), their
gradients and the optimizer state stay fp32. Everything else trains
in fp32, as do full fine-tuning (its weights are the trainable ones) and a 4-bit/8-bit base on the CPU (bitsandbytes
computes in fp32 there). On the CPU, a training run whose steps feed fewer than :data:`CPU_BF16_MIN_FEED` values
(tokens per micro-batch x hidden size, :class:`Feed`) keeps fp32: bf16 was measured faster only above it (issue 23). Giving ``dtype=`` or ``bf16=``/``fp16=`` overrides the choice; the choice is logged and
recorded in the manifest (``precision``).

Example:
    >>> p = resolve_precision({"dtype": "float32", "bf16": None, "fp16": False}, adapter=True)
    >>> p.dtype, p.reason
    ('float32', 'dtype=float32 given')
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from finetune_sdk.data.encoding import Encoded
    from finetune_sdk.quantizer import Quantizer
    from finetune_sdk.technique import Technique


@dataclass(frozen=True)
class Precision:
    """The precision of a training run.

    ``dtype``: the loaded (frozen) base weights; ``autocast``: ``bfloat16``/``float16`` mixed precision over them
    (``bf16=True``/``fp16=True``) or ``None``; ``trainable_dtype``: the trainable parameters, gradients and
    optimizer state (``float32`` for adapters; the weights' dtype for full fine-tuning); ``auto``: chosen by the
    SDK; ``reason``: why, in words.
    """

    dtype: str
    autocast: str | None
    trainable_dtype: str
    auto: bool
    reason: str
    #: ``float32`` when the frozen 16-bit base computes its matmuls in 16 bits but hands fp32 to the rest of the
    #: model (residual stream, norms, attention, the adapters' sums: :func:`keep_activations_fp32`); else the
    #: weights' (or autocast's) dtype.
    activations: str = ""
    #: ``bfloat16`` when fp32 activations are kept for the backward pass in bf16 (:func:`bf16_saved_activations`).
    saved_activations: str = ""

    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype)

    def describe(self) -> str:
        """One line for the log, e.g. ``bfloat16 frozen base, float32 trainable parameters and optimizer state``."""
        frozen = self.trainable_dtype == "float32" and self.dtype != "float32"
        base = f"{self.dtype} {'frozen base' if frozen else 'weights'}"
        activations = f", {self.activations} activations" if self.activations == "float32" and frozen else ""
        if activations and self.saved_activations:
            activations += f" (saved for the backward pass in {self.saved_activations})"
        trained = f", {self.trainable_dtype} trainable parameters and optimizer state" if frozen else ""
        autocast = f", {self.autocast} autocast" if self.autocast else ""
        return f"{base}{activations}{trained}{autocast} ({self.reason})"

    def to_manifest(self) -> dict[str, Any]:
        return asdict(self)


def cpu_bf16_native() -> str | None:
    """``"AMX"`` or ``"AVX512-BF16"`` when this CPU has bf16 matrix instructions (torch's own detection), else None."""
    import torch

    cpu = getattr(torch, "cpu", None)
    if cpu is not None and getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "AMX"
    if cpu is not None and getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "AVX512-BF16"
    return None


def cuda_bf16() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


#: On the CPU, ``auto`` gives the frozen base bf16 only when a step feeds its matmuls at least this many
#: ``tokens per step x hidden size`` values (issue 23). With fused projections, the 2^17 packing floor and bf16
#: adapter matmuls, the bf16 path measured faster than fp32 on every shape of benchmarks/bench_precision_grid.py,
#: down to the smallest, ~241 tokens a step on SmolLM2-135M (hidden 576); below 128 tokens x 576 nothing was
#: measured, and fp32, the plain way, is kept (docs/speed.md).
CPU_BF16_MIN_FEED = 128 * 576


@dataclass(frozen=True)
class Feed:
    """What a training run feeds the hardware each step: ``tokens_per_step`` (mean, packed: no padding) and the
    model's ``hidden`` size."""

    tokens_per_step: float
    hidden: int

    @property
    def values(self) -> float:
        return self.tokens_per_step * self.hidden


def resolve_precision(options: Mapping[str, Any], *, adapter: bool, full: bool = False, quantized: bool = False,
                      device: str | None = None, feed: Feed | None = None) -> Precision:
    """The precision for a run's resolved ``options`` (``dtype``, ``bf16``, ``fp16``).

    ``adapter``: the technique trains a PEFT adapter on a frozen base; ``full``: it trains every weight;
    ``quantized``: the base is loaded in 4 or 8 bits; ``device``: ``cpu`` or ``cuda`` (default: a GPU when torch
    sees one); ``feed``: what a training step feeds the matmuls (None: not known, e.g. loading for generation or
    evaluation, or a model opened before ``fit``): on the CPU an unknown feed or one under
    :data:`CPU_BF16_MIN_FEED` keeps fp32, the plain way, so that ``auto`` is never slower than fp32 and the same
    Trainer's precision does not depend on the order of its calls. ``bf16``/``fp16`` of ``None`` mean not given.
    """
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    autocast = "bfloat16" if options.get("bf16") else "float16" if options.get("fp16") else None
    dtype = options.get("dtype") or "auto"
    if dtype != "auto":
        return Precision(dtype, autocast, dtype if full else "float32", False, f"dtype={dtype} given")
    given = options.get("bf16") is not None or bool(options.get("fp16"))
    if device == "cuda":  # a frozen base in bf16 on a bf16 GPU, with or without autocast (as before)
        if not full and cuda_bf16():
            return Precision("bfloat16", autocast, "float32", not given, "auto: the GPU computes bf16 natively")
        return Precision("float32", autocast, "float32", False,
                         "auto: full fine-tuning keeps fp32 weights" if full else "auto: the GPU has no bf16")
    if given:
        return Precision("float32", autocast, "float32", False,
                         f"{'bf16' if options.get('bf16') is not None else 'fp16'}= given: fp32 weights")
    if full or not adapter:
        return Precision("float32", None, "float32", False,
                         "auto: fp32, the trained weights are the model's own" if full else
                         "auto: fp32 for techniques other than adapters")
    if quantized:
        return Precision("float32", None, "float32", False,
                         "auto: fp32 around a quantized base on the CPU (bitsandbytes computes in fp32 there)")
    native = cpu_bf16_native()
    if native is None:
        return Precision("float32", None, "float32", False, "auto: this CPU has no AVX512-BF16 or AMX")
    if feed is None:
        return Precision("float32", None, "float32", False,
                         "auto: fp32 until a training plan shows steps big enough for bf16 to pay on this CPU "
                         "(generation, evaluation, a model opened before fit); dtype='bfloat16' forces it")
    if feed.values < CPU_BF16_MIN_FEED:
        return Precision("float32", None, "float32", False,
                         f"auto: fp32, a step feeds {feed.tokens_per_step:,.0f} tokens x hidden {feed.hidden} "
                         f"(< {CPU_BF16_MIN_FEED:,} values): below the smallest steps where bf16 on {native} was "
                         f"measured faster than fp32; dtype='bfloat16' forces it")
    return Precision("bfloat16", None, "float32", True,
                     f"auto: this CPU has {native}; dtype='float32' keeps the base in fp32", activations="float32",
                     saved_activations="bfloat16")


def choose_precision(options: Mapping[str, Any], technique: Technique, quantizer: Quantizer | None,
                     given_model: Any = None, feed: Feed | None = None) -> Precision:
    """The precision of a ``Trainer``'s run from its resolved ``options`` and plugins: a model passed in loaded
    (``given_model``) keeps its own dtype; else ``auto`` weighs what a step feeds (``feed``, known once ``fit`` has
    planned; see :func:`plan_feed`)."""
    if given_model is None:
        return resolve_precision(options, adapter=technique.saves_adapter, full=technique.result_is_model,
                                 quantized=quantizer is not None, feed=feed)
    import torch

    dtype = str(next(given_model.parameters(), torch.empty(0)).dtype).removeprefix("torch.")
    given = resolve_precision({**options, "dtype": dtype}, adapter=technique.saves_adapter,
                              full=technique.result_is_model)
    return replace(given, reason="the model was passed in loaded")


def estimate_options(options: Mapping[str, Any], chosen: Precision) -> Mapping[str, Any]:
    """A run's options for the training-memory estimate: ``dtype="float32"`` where ``auto`` kept fp32 for what a
    step feeds (the estimate resolves ``auto`` without the data), else the options as they are."""
    if (options.get("dtype") or "auto") == "auto" and chosen.reason.startswith("auto: fp32, a step feeds"):
        return {**options, "dtype": "float32"}
    return options


def plan_feed(train: Encoded, options: Mapping[str, Any], model_ref: str) -> Feed | None:
    """What a planned run feeds each step (:class:`Feed`): mean tokens per example of the encoded ``train`` set x
    the micro-batch, and the hidden size from the config of ``model_ref`` (a folder or Hub id); ``None`` when the
    set is empty or the config can't be read."""
    if not train.examples:
        return None
    try:
        from finetune_sdk.advice.model_shape import load_config

        config = load_config(model_ref)
        hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0))
    except Exception:  # noqa: BLE001  (no config: the feed is unknown, auto decides as before)
        return None
    tokens = train.tokens / len(train.examples) * (options.get("per_device_train_batch_size") or 1)
    return Feed(tokens, hidden) if hidden else None


def keep_activations_fp32(model: Any) -> int:
    """Let a frozen 16-bit base compute its matmuls in 16 bits while everything between them stays fp32.

    Each frozen 16-bit ``Linear`` (and GPT-2's ``Conv1D``) gets its input cast to its weight's dtype and its output
    cast to fp32; each frozen 16-bit ``Embedding`` returns fp32; the other frozen 16-bit parameters (norms) become
    fp32 (they are tiny). The residual stream, norms, attention and, above all, the sum of a frozen layer's output
    and its LoRA update then stay fp32: in bf16 that sum rounds away an update smaller than half a bf16 step
    (2^-9 of the output), which early in training is most of them, so the adapter learned more slowly than in fp32.
    Returns the number of layers given casts; a second call changes nothing.
    """
    import torch

    hooked = 0
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.dtype in (torch.bfloat16, torch.float16)]
        if not own or any(p.requires_grad for p in own) or getattr(module, "_finetune_sdk_fp32_io", False):
            continue
        if isinstance(module, torch.nn.Embedding):
            module.register_forward_hook(_output_to_fp32)
        elif isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            module.register_forward_pre_hook(_input_to_weight_dtype)
            module.register_forward_hook(_output_to_fp32)
        else:
            for param in own:
                param.data = param.data.float()
            continue
        module._finetune_sdk_fp32_io = True
        hooked += 1
    return hooked


def _input_to_weight_dtype(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (args[0].to(module.weight.dtype), *args[1:]) if args else args


def _output_to_fp32(module: Any, args: Any, output: Any) -> Any:
    import torch

    return output.float() if isinstance(output, torch.Tensor) else output


#: The forward (pre-)hooks :func:`keep_activations_fp32` registers; a layer with only these computes
#: ``linear(x.to(weight.dtype)).float()`` (the chunked loss recognises them on the LM head).
PRECISION_HOOKS = frozenset({_input_to_weight_dtype, _output_to_fp32})


#: Saved fp32 activations with fewer values than this are kept as they are (see :func:`bf16_saved_activations`).
SMALLEST_PACKED = int(os.environ.get("FINETUNE_SDK_SMALLEST_PACKED", 1 << 17))


def saved_activations(precision: Precision, model: Any) -> Any:
    """The context a run trains in: :func:`bf16_saved_activations` when ``precision`` asks for it, else none."""
    import contextlib

    if precision.saved_activations == "bfloat16":
        return bf16_saved_activations(model)
    return contextlib.nullcontext()


@contextmanager
def bf16_saved_activations(model: Any) -> Iterator[None]:
    """Within the block, fp32 activations that autograd keeps for the backward pass are kept in bf16.

    The forward pass still computes in fp32 (the LoRA updates are not rounded away, see
    :func:`keep_activations_fp32`); only the copies the backward pass reads are rounded to bf16 (relative error
    2^-9, as autocast's saved activations), which halves the activation memory of ``dtype="auto"`` on a bf16 CPU.
    Parameters (and views of them), tensors under 4,096 values and vocabulary-sized ones (the logits and their
    log-softmax: the loss keeps its fp32 precision) are kept as they are; a tensor saved by several operations (a
    layer input read by q, k and v) is packed once. Unpacking returns fp32.

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> x = torch.linspace(0, 1, 8192, requires_grad=True)
        >>> with bf16_saved_activations(torch.nn.Linear(1, 1)):
        ...     y = (x.exp() * 2).sum()
        >>> y.backward()
        >>> bool(torch.allclose(x.grad, 2 * x.detach().exp(), rtol=2**-8))
        True
    """
    import weakref

    import torch

    kept = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)  # logits and log-softmax: the loss's
    packed: dict[int, tuple[Any, Any]] = {}  # id(original) -> (weakref to it, its bf16 copy)

    def pack(tensor: Any) -> Any:
        if (tensor.dtype != torch.float32 or tensor.numel() < SMALLEST_PACKED or tensor.device.type != "cpu"
                or tensor.untyped_storage().data_ptr() in kept or (vocab and tensor.shape[-1] == vocab)):
            return tensor
        key = id(tensor)
        seen = packed.get(key)
        if seen is not None and seen[0]() is tensor:
            return seen[1]
        copy = _Packed(tensor.to(torch.bfloat16))
        packed[key] = (weakref.ref(tensor, lambda _, key=key: packed.pop(key, None)), copy)
        return copy

    def unpack(saved: Any) -> Any:
        return saved.tensor.float() if isinstance(saved, _Packed) else saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


class _Packed:
    """A bf16 copy of a saved fp32 activation (a distinct type, so unpack knows what to widen)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: Any) -> None:
        self.tensor = tensor

"""What travels between clients and server: the trainable parameters only, as a Flower ``ArrayRecord``.

For LoRA/QLoRA/DoRA-like techniques that is the adapter (the frozen base, 4-bit or not, never travels); for the
classifier, the head; for full fine-tuning, every weight. Rows, texts and tokens never travel.
"""

from __future__ import annotations

from typing import Any

#: Serialization overhead of one tensor in an ArrayRecord (the ``.npy`` header Flower writes before the raw
#: values: 128 bytes for the shapes of transformer weights).
NPY_HEADER_BYTES = 128


def trainable_names(model: Any) -> list[str]:
    """Names of the parameters that train (``requires_grad``), in the model's order."""
    return [name for name, param in model.named_parameters() if param.requires_grad]


def trainable_arrays(model: Any) -> Any:
    """The trainable parameters as a Flower ``ArrayRecord`` (float32 numpy arrays keyed by parameter name).

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(4, 2)
        >>> layer.bias.requires_grad = False
        >>> record = trainable_arrays(layer)
        >>> list(record.keys()), record["weight"].shape, payload_bytes(record) - 8 * 4
        (['weight'], (2, 4), 128)
    """
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({name: Array(param.detach().to("cpu").float().numpy().copy())
                        for name, param in model.named_parameters() if param.requires_grad})


def load_arrays(model: Any, record: Any) -> None:
    """Copy the arrays of ``record`` into the model's trainable parameters of the same names.

    Raises:
        ValueError: when the names differ (the record was made for another technique, model or rank).
    """
    import torch

    params = dict(model.named_parameters())
    expected = set(trainable_names(model))
    if set(record.keys()) != expected:
        missing, extra = sorted(expected - set(record.keys())), sorted(set(record.keys()) - expected)
        raise ValueError(f"the received parameters don't match this model's trainable ones (missing {missing[:3]}, "
                         f"unexpected {extra[:3]}); server and clients must use the same model, technique and "
                         "options")
    with torch.no_grad():
        for name, array in record.items():
            param = params[name]
            param.copy_(torch.from_numpy(array.numpy()).to(param.device, param.dtype).reshape(param.shape))


def payload_bytes(record: Any) -> int:
    """Bytes of an ``ArrayRecord`` on the wire: every tensor's raw values plus its ``.npy`` header."""
    return sum(len(array.data) for array in record.values())


def raw_bytes(model: Any) -> int:
    """Bytes of the trainable parameters' values in float32 (what :func:`trainable_arrays` sends, less headers)."""
    return sum(param.numel() * 4 for param in model.parameters() if param.requires_grad)

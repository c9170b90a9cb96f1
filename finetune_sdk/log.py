"""The ``finetune_sdk`` logger: INFO to stderr unless the application configured logging itself."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("finetune_sdk")


def ensure_handler() -> logging.Logger:
    """Give the ``finetune_sdk`` logger a stderr handler at INFO when nobody configured one."""
    quiet_known_noise()
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("finetune_sdk: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_known_noise() -> None:
    """Drop third-party messages known to be harmless here.

    bitsandbytes 0.50 warns at import that it can't fetch an optional CPU kernel from the Hub ("Failed to load
    CPU gemm_4bit_forward from kernels-community"); the SDK never needs it.
    """
    noisy = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropMessage) for f in noisy.filters):
        noisy.addFilter(_DropMessage("Failed to load CPU gemm_4bit_forward"))


def quiet_third_party_output() -> None:
    """For command-line use: no transformers/huggingface_hub progress bars and no deprecation chatter.

    The SDK's own progress bar and log lines say what is happening; libraries should not call this.
    """
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass

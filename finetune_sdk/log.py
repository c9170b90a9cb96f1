"""The ``finetune_sdk`` logger: INFO to stderr unless the application configured logging itself."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

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
        return not record.getMessage().startswith(self.prefix)


def quiet_known_noise() -> None:
    """Drop third-party messages known to be harmless here.

    bitsandbytes 0.50 warns at import that it can't fetch an optional CPU kernel from the Hub ("Failed to load
    CPU gemm_4bit_forward from kernels-community"); the SDK never needs it.
    """
    noisy = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropMessage) for f in noisy.filters):
        noisy.addFilter(_DropMessage("Failed to load CPU gemm_4bit_forward"))


#: Harmless warnings of dependencies, hidden only around the SDK calls that raise them (never process-wide):
#: transformers 5 deprecates ``is_gradient_checkpointing``, which PEFT reads on every wrap and load; importing
#: bitsandbytes (through transformers or PEFT) imports torch's inductor, whose ``torch.jit.script_method`` use is
#: deprecated; PEFT says GPT-2's Conv1D needs ``fan_in_fan_out`` and sets it itself.
KNOWN_DEPENDENCY_WARNINGS = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    (DeprecationWarning, r"`torch\.jit\.script_method` is deprecated"),
    (UserWarning, r"fan_in_fan_out is set to False but the target module is `Conv1D`"),
)


#: Harmless log messages of dependencies, as (logger, start of the message), dropped only inside
#: :func:`known_dependency_messages`: importing bitsandbytes 0.50 (through transformers' Trainer or PEFT) asks the
#: ``kernels`` package for an optional CPU kernel, which under ``HF_HUB_OFFLINE=1`` logs that it skips the
#: publisher trust check (once per process, before any error of the SDK's).
KNOWN_DEPENDENCY_MESSAGES = (
    ("kernels._internals.hf_hub",
     "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because Hugging Face Hub is in "
     "offline mode"),
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
)


@contextmanager
def known_dependency_messages() -> Iterator[None]:
    """Drop :data:`KNOWN_DEPENDENCY_MESSAGES` logged inside the block (a filter on each of those loggers, removed
    afterwards); every other record of those loggers, and every other logger, is untouched.

    Example:
        >>> import logging
        >>> with known_dependency_messages():
        ...     logging.getLogger("kernels._internals.hf_hub").warning(
        ...         "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because "
        ...         "Hugging Face Hub is in offline mode.")
    """
    added = []
    for name, prefix in KNOWN_DEPENDENCY_MESSAGES:
        dropper = _DropMessage(prefix)
        logging.getLogger(name).addFilter(dropper)
        added.append((name, dropper))
    try:
        yield
    finally:
        for name, dropper in added:
            logging.getLogger(name).removeFilter(dropper)


@contextmanager
def known_dependency_warnings() -> Iterator[None]:
    """Hide :data:`KNOWN_DEPENDENCY_WARNINGS` and :data:`KNOWN_DEPENDENCY_MESSAGES` inside the block; every other
    warning and log record, the SDK's own included, shows.

    Example:
        >>> import warnings
        >>> with known_dependency_warnings():
        ...     warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning)
    """
    with warnings.catch_warnings(), known_dependency_messages():
        for category, message in KNOWN_DEPENDENCY_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


@contextmanager
def library_progress_bars_off() -> Iterator[None]:
    """No transformers progress bar ("Loading weights") inside the block, where the SDK reports progress itself;
    the setting is put back afterwards."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


class _DropHeadOnlyLoadReport(logging.Filter):
    """Drops transformers' LOAD REPORT when its only finding is the language-model head left unused, which is
    what loading a causal-LM checkpoint as a classifier backbone must do; a missing or mismatched weight shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "LOAD REPORT" not in text or "MISSING" in text or "MISMATCH" in text:
            return True
        flagged = [line.split("|")[0].strip() for line in text.splitlines() if "| UNEXPECTED" in line]
        return not flagged or not all(key.startswith("lm_head.") for key in flagged)


@contextmanager
def backbone_load_report_filtered() -> Iterator[None]:
    """Inside the block, a backbone load's report about the unused LM head is not printed (see above)."""
    target = logging.getLogger("transformers.modeling_utils")
    dropper = _DropHeadOnlyLoadReport()
    target.addFilter(dropper)
    try:
        yield
    finally:
        target.removeFilter(dropper)


def quiet_third_party_output() -> None:
    """For command-line use: no transformers/huggingface_hub progress bars and no transformers log chatter.

    The SDK's own progress bar and log lines say what is happening; libraries should not call this.
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass

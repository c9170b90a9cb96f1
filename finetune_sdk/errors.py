"""Errors a user can act on.

Every error raised for bad input is a :class:`FinetuneError`: its message is one line that says what is wrong,
where (file, line, field) and what to do. The CLI prints it without a traceback and exits with code 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FinetuneError(Exception):
    """Bad input or an impossible request; the message is one line meant for the user."""


class ConfigError(FinetuneError):
    """An unknown or invalid option, plugin name or technique/quantizer combination."""


class DataError(FinetuneError):
    """A dataset that can't be used: missing file, malformed line, missing column, empty."""


class ModelNotFoundError(FinetuneError):
    """A model path or id that can't be found or loaded."""


class PluginError(FinetuneError):
    """A plugin failed; the message names the plugin and its distribution."""


def closest(name: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest one or two choices, or ``""``.

    >>> closest("fulll", ["lora", "qlora", "full"])
    " (did you mean 'full'?)"
    >>> closest("lroa", ["lora", "qlora", "full"])
    " (did you mean 'lora' or 'qlora'?)"
    """
    matches = difflib.get_close_matches(name, list(choices), n=2, cutoff=0.6)
    if not matches:
        return ""
    return " (did you mean " + " or ".join(repr(m) for m in matches) + "?)"


def unknown_name_error(kind: str, name: str, available: Iterable[str]) -> ConfigError:
    """Build the error for an unknown technique/quantizer/formatter/option name."""
    available = sorted(available)
    return ConfigError(
        f"unknown {kind} {name!r}{closest(name, available)}; available: {', '.join(available) or 'none'}"
    )


class RegistryError(FinetuneError):
    """A registry operation that can't be done: unknown name or version, invalid name, remote failure."""


class IntegrityError(RegistryError):
    """A stored or downloaded file doesn't match its recorded sha256."""

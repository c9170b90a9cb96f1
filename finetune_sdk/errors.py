"""Errors a user can act on.

Every error raised for bad input is a :class:`FinetuneError`: its message is one line that says what is wrong,
where (file, line, field) and what to do. The CLI prints it without a traceback and exits with code 2.
"""

from __future__ import annotations

import difflib
import json
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


def json_problem(exc: json.JSONDecodeError, *, line: bool = False) -> str:
    """What is wrong in a JSON text and where, for a one-line message: ``Unterminated string starting at column 5``.

    Python's messages end in a dangling ``at`` when they mean a position (``Unterminated string starting at``,
    ``Invalid control character at``); the position is added once, with the line when ``line`` is set.

    >>> import json
    >>> try:
    ...     json.loads('{"prompt": "cut')
    ... except json.JSONDecodeError as exc:
    ...     json_problem(exc)
    'Unterminated string starting at column 12'
    """
    message = exc.msg[:-3] if exc.msg.endswith(" at") else exc.msg
    where = f"line {exc.lineno} column {exc.colno}" if line else f"column {exc.colno}"
    return f"{message} at {where}"


def unknown_name_error(kind: str, name: str, available: Iterable[str]) -> ConfigError:
    """Build the error for an unknown technique/quantizer/formatter/option name."""
    available = sorted(available)
    return ConfigError(
        f"unknown {kind} {name!r}{closest(name, available)}; available: {', '.join(available) or 'none'}"
    )


class RunStopped(FinetuneError):
    """A run stopped on request (SIGTERM, the studio's Stop) after writing a resumable checkpoint; the CLI exits
    with 143 (128 + SIGTERM), the status of a process ended by that signal."""

    exit_code = 143


class RegistryError(FinetuneError):
    """A registry operation that can't be done: unknown name or version, invalid name, remote failure."""


class IntegrityError(RegistryError):
    """A stored or downloaded file doesn't match its recorded sha256."""

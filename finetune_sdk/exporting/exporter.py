"""The :class:`Exporter` base class: an export format, a plugin type (``register_exporters``); GGUF is the builtin
(:mod:`finetune_sdk.exporting.gguf_exporter`). Light: no torch, transformers or gguf at import.

Example:
    >>> class Bare(Exporter):
    ...     name = "bare"
    ...     settings = ("compress",)
    >>> Bare().check({"compress": True})
    >>> Bare().check({"quantization": "q8_0"})
    Traceback (most recent call last):
    finetune_sdk.errors.ConfigError: export format 'bare' takes no setting 'quantization'; its settings: compress
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from finetune_sdk.errors import ConfigError


class Exporter:
    """One export format: ``finetune_sdk.export(ref, out, format=name, **settings)`` and ``finetune export
    --format name``.

    Attributes:
        name: the format's registered name (``"gguf"``).
        description: one line for ``finetune plugins``.
        settings: the keyword settings :meth:`export` takes besides ``name`` and ``registry``.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    settings: ClassVar[tuple[str, ...]] = ()

    def check(self, settings: Mapping[str, Any]) -> None:
        """Refuse settings before any model loads (default: names not in :attr:`settings`), one line each.

        Raises:
            ConfigError: an unknown or invalid setting.
        """
        for key in settings:
            if key not in self.settings:
                known = ", ".join(self.settings) or "none"
                raise ConfigError(f"export format {self.name!r} takes no setting {key!r}; its settings: {known}")

    def export(self, ref: str, out: Path, *, name: str | None = None, registry: Any = None,
               **settings: Any) -> Any:
        """Write the result ``ref`` (a result folder or registry reference) into the new folder ``out``, atomically
        (:func:`finetune_sdk.fsutil.staged_directory`), never replacing what the SDK did not write; return a record
        of what was written with at least ``directory`` (a :class:`~pathlib.Path`)."""
        raise NotImplementedError

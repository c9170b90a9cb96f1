"""Model output (and any text the SDK did not write) shown on a terminal as it reads, never as instructions to it.

A model's answer can hold control bytes and escape sequences: ``ESC[2J`` clears the screen, ``ESC[1A`` moves the
cursor up over what was printed, ``ESC]0;...BEL`` sets the window title, ``\\r`` and backspace overwrite a line, and
bidirectional overrides (U+202E) make text read in another order than it is stored. Printed as is, such an answer can
hide or rewrite what a rater believes they are rating (``finetune feedback``) or what ``finetune generate`` shows.

:func:`escape_controls` replaces each such character by a visible escape (``\\x1b``, ``\\r``, ``\\u202e``, the way
Python writes them), keeping newlines and tabs; a backslash is shown as it is. :func:`literal_text` wraps the result
in a :class:`rich.text.Text`, which rich never reads as markup (``[bold]`` stays ``[bold]``), with the escapes styled
so they stand apart from text that merely looks like one. Every command path that prints model output uses them:
``finetune feedback`` (the rater's panels), ``finetune generate``, ``finetune predict``, ``finetune eval``
(``--compare-base`` generations), through :func:`finetune_sdk.cli.render.cell` and :mod:`finetune_sdk.evaluation.report`.

Which characters are escaped (:func:`is_hidden_control`): every C0 and C1 control character except ``\\n`` and
``\\t`` (a ``\\r\\n`` line end is shown as ``\\n``), DEL, the line and paragraph separators (U+2028, U+2029), lone
surrogates, and every format character (Unicode category Cf: bidi embeddings, overrides and isolates, zero-width space,
BOM, the invisible tag characters U+E0000-U+E007F) except the zero-width joiner and non-joiner (U+200C, U+200D),
which shape scripts and emoji and move nothing.
"""

from __future__ import annotations

import unicodedata
from typing import Any

#: Characters kept as they are although they are controls: they lay out text and move nothing already shown.
KEPT = frozenset("\n\t\u200c\u200d")
#: The style of an escape in :func:`literal_text`.
ESCAPE_STYLE = "reverse"
__all__ = ["escape_controls", "is_hidden_control", "literal_text"]


def is_hidden_control(char: str) -> bool:
    """Whether ``char`` (one character) acts on the terminal or reorders text instead of showing itself.

    Example:
        >>> [is_hidden_control(c) for c in ("\\x1b", "\\r", "\\u202e", "\\n", "é", "\\u200d")]
        [True, True, True, False, False, False]
    """
    if char in KEPT:
        return False
    return unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp", "Cs")


def _escape(char: str) -> str:
    code = ord(char)
    if char == "\r":
        return "\\r"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _pieces(text: str) -> list[tuple[str, bool]]:
    """``(piece, is_escape)`` runs of ``text`` with ``\\r\\n`` read as ``\\n``."""
    pieces: list[tuple[str, bool]] = []
    plain: list[str] = []
    for char in text.replace("\r\n", "\n"):
        if is_hidden_control(char):
            if plain:
                pieces.append(("".join(plain), False))
                plain = []
            pieces.append((_escape(char), True))
        else:
            plain.append(char)
    if plain:
        pieces.append(("".join(plain), False))
    return pieces


def escape_controls(text: Any) -> str:
    """``text`` (made a string with ``str``) with every :func:`is_hidden_control` character written as a visible
    escape; newlines and tabs stay; ``\\r\\n`` becomes ``\\n``.

    Example:
        >>> escape_controls("ok\\x1b[2J\\rgone\\u202eevil\\nnext\\tline")
        'ok\\\\x1b[2J\\\\rgone\\\\u202eevil\\nnext\\tline'
    """
    return "".join(piece for piece, _ in _pieces(str(text)))


def literal_text(text: Any, style: str = "") -> Any:
    """A :class:`rich.text.Text` showing ``text`` literally: no rich markup read, controls escaped as in
    :func:`escape_controls` and drawn in :data:`ESCAPE_STYLE`.

    Example:
        >>> from rich.console import Console
        >>> console = Console(record=True, width=60, color_system=None)
        >>> console.print(literal_text("[bold]hi[/bold]\\x1b]0;owned\\x07"))
        [bold]hi[/bold]\\x1b]0;owned\\x07
    """
    from rich.text import Text

    shown = Text(style=style)
    for piece, escaped in _pieces(str(text)):
        shown.append(piece, style=ESCAPE_STYLE if escaped else None)
    return shown

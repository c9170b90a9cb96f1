"""The terminal side of collecting feedback: shows a prompt and the model's answer(s) with rich, reads one key per
rating (typed, then Enter) with click, so it works in a terminal, in Jupyter and on scripted input alike.

What the model wrote is shown literally: control characters and escape sequences in an answer (a screen clear, cursor
moves, a window title, ``\\r``, bidi overrides) appear escaped (``\\x1b[2J``) and rich markup stays text
(:mod:`finetune_sdk.feedback.screen_text`), so an answer can't hide or rewrite what the rater sees."""

from __future__ import annotations

import sys
from typing import Any

import click

from finetune_sdk.feedback.answers import BOTH_BAD, QUIT, SKIP, TIE, Edited
from finetune_sdk.feedback.screen_text import literal_text

THUMBS_KEYS = {"u": True, "d": False}
PAIR_KEYS = {"1": 0, "2": 1, "t": TIE, "b": BOTH_BAD}


class TerminalRater:
    """The default ``ask`` of :func:`finetune_sdk.collect_feedback` and ``finetune feedback``.

    Keys (case-insensitive, then Enter): ``u``/``d`` thumbs up/down (thumbs mode), ``1``/``2`` the better answer,
    ``t`` a tie (both as good), ``b`` both bad (pairwise mode; a tie or both-bad row is recorded, never trained
    on), ``e`` write a better answer (when edits are on: opens ``$EDITOR`` with the answer on a
    terminal, otherwise reads one line), ``s`` skip, ``q`` quit. End of input (Ctrl-D) or Ctrl-C at the question
    quits too; every rating given so far is already on disk.

    Example:
        >>> from click.testing import CliRunner
        >>> rater = TerminalRater()
        >>> with CliRunner().isolation(input="x\\nd\\n") as (shown, *_):  # "x" is no key: asked again
        ...     rating = rater("Is the sky green?", ["Yes."])
        >>> rating, "Is the sky green?" in shown.getvalue().decode()
        (False, True)
    """

    def __init__(self, edits: bool = False, console: Any = None) -> None:
        self.edits = edits
        self._console = console
        self.asked = 0

    @property
    def console(self) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(highlight=False)
        return self._console

    def note(self, text: str) -> None:
        self.console.print(literal_text(text, style="dim"), soft_wrap=True)  # paths and commands stay copyable

    def __call__(self, prompt: str, answers: list[str]) -> Any:
        from rich.panel import Panel
        from rich.rule import Rule
        from rich.text import Text

        self.asked += 1
        self.console.print(Rule(f"prompt {self.asked}", style="dim"))
        self.console.print(Panel(literal_text(prompt), title="prompt", title_align="left", border_style="cyan"))
        pairwise = len(answers) == 2
        for number, answer in enumerate(answers, start=1):
            title = f"answer {number}" if pairwise else "answer"
            shown = literal_text(answer) if answer else Text("(empty answer)", style="dim")
            self.console.print(Panel(shown, title=title, title_align="left"))
        keys: dict[str, Any] = dict(PAIR_KEYS if pairwise else THUMBS_KEYS)
        hint = "1 or 2 = the better answer, t = tie, b = both bad" if pairwise else "u = thumbs up, d = thumbs down"
        if self.edits:
            hint += ", e = write a better answer"
            keys["e"] = None
        keys.update({"s": SKIP, "q": QUIT})
        hint += ", s = skip, q = quit"
        while True:
            try:
                key = click.prompt(hint, type=click.Choice(list(keys), case_sensitive=False), show_choices=False)
            except click.Abort:  # Ctrl-C or end of input: stop, keeping what was saved
                self.console.print()
                return QUIT
            key = key.lower()
            if key != "e":
                return keys[key]
            written = self._written_answer(answers)
            if written:
                return Edited(written)
            self.note("no answer written; choose again")

    def _written_answer(self, answers: list[str]) -> str | None:
        try:
            if sys.stdin.isatty() and sys.stdout.isatty():
                start = answers[0]
                if len(answers) == 2:
                    start = answers[int(click.prompt("start from answer", type=click.Choice(["1", "2"]))) - 1]
                text = click.edit(start + "\n", require_save=True)
            else:
                text = click.prompt("your answer (one line)", default="", show_default=False)
        except click.Abort:
            return None
        return text.strip() if text and text.strip() else None

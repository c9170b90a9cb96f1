"""Turning user errors into one line on stderr and exit code 2, with no traceback."""

from __future__ import annotations

from typing import Any

import click

from finetune_sdk.errors import FinetuneError


class UserError(click.ClickException):
    """A :class:`FinetuneError` as the CLI shows it: ``Error: <one line>``, exit code 2."""

    exit_code = 2


class FinetuneGroup(click.Group):
    """A click group whose commands report :class:`FinetuneError` as exit code 2 without a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FinetuneError as exc:
            raise UserError(str(exc)) from None

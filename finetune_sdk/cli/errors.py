"""Turning user errors into one line on stderr and exit code 2, with no traceback."""

from __future__ import annotations

from typing import IO, Any

import click

from finetune_sdk.errors import FinetuneError


class UserError(click.ClickException):
    """A :class:`FinetuneError` as the CLI shows it: ``Error: <one line>``, exit code 2."""

    exit_code = 2


class ShortUsageError(click.UsageError):
    """A usage error (unknown flag or command, missing argument, bad value) as one ``Error:`` line plus one hint.

    click's own form prints the usage line, a "Try ..." line and a blank line before the error; docs/cli.md
    promises one line, with at most one hint after it.
    """

    def show(self, file: IO[Any] | None = None) -> None:
        message = " ".join(self.format_message().split())  # click puts "Did you mean" on a line of its own
        click.echo(f"Error: {message}", file=file, err=True)
        if self.ctx is not None:
            click.echo(f"Try '{self.ctx.command_path} --help'.", file=file, err=True)


def short_usage_error(exc: click.UsageError) -> ShortUsageError:
    if isinstance(exc, ShortUsageError):
        return exc
    return ShortUsageError(exc.format_message(), exc.ctx)


class FinetuneGroup(click.Group):
    """A click group whose commands report :class:`FinetuneError` as exit code 2 without a traceback, and usage
    errors as one ``Error:`` line plus a hint. Dependency messages known to be harmless
    (:data:`finetune_sdk.log.KNOWN_DEPENDENCY_MESSAGES`) are dropped while a command runs, online or offline."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            raise short_usage_error(exc) from None

    def invoke(self, ctx: click.Context) -> Any:
        from finetune_sdk.log import known_dependency_messages

        try:
            with known_dependency_messages():  # a dependency's harmless import chatter never joins the one line
                return super().invoke(ctx)
        except FinetuneError as exc:
            error = UserError(str(exc))
            error.exit_code = getattr(exc, "exit_code", UserError.exit_code)  # RunStopped: 143
            raise error from None
        except click.UsageError as exc:
            raise short_usage_error(exc) from None

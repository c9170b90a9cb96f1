"""CLI flags generated from the option specs of the training loop and every registered plugin.

An objective's options (``--beta``, ``--simpo-gamma``...) are flags of every run but shown by ``--help`` only with
the objective that takes them: ``finetune train --objective simpo --help``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from finetune_sdk.options import TRAINING_OPTIONS, Option

PARAM_TYPES: dict[type, Any] = {int: click.INT, float: click.FLOAT, str: click.STRING, list: click.STRING}


def all_option_specs() -> dict[str, Option]:
    """Training options plus the options of every registered technique and quantizer (first spec wins)."""
    from finetune_sdk.plugin_manager import get_plugin_host

    specs: dict[str, Option] = {o.name: o for o in TRAINING_OPTIONS}
    host = get_plugin_host()
    for kind in ("technique", "quantizer"):
        for reg in host.registrations(kind):
            for option in getattr(reg.cls, "options", ()):
                specs.setdefault(option.name, option)
    return specs


def help_text(spec: Option) -> str:
    """An option's help with its default and range, as ``--help`` shows it."""
    default = f" [default: {spec.default}]" if spec.default not in (None, "", ()) else ""
    return spec.help + default + (f" [{spec.range_text()}]" if spec.range_text() else "")


def option_flags(func: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a command with one ``--kebab-name`` flag per option; unset flags stay ``None``. The objectives'
    options come last, hidden until :class:`ObjectiveOptionsCommand` sees which objective is asked for."""
    from finetune_sdk.objectives.choice import objective_option_specs, registered_objectives

    specs = all_option_specs()
    objective_specs = [first for name, (first, _) in objective_option_specs().items() if name not in specs]
    for objective in registered_objectives().values():  # older names (--dpo-beta), hidden, still accepted
        for old, new in objective.renamed_options.items():
            if old not in specs:
                target = objective.option_specs()[new]
                objective_specs.append(Option(old, target.type, None, f"older name of {objective.name}'s {new}"))
    for spec, hidden in [*((s, True) for s in reversed(objective_specs)), *((s, False) for s in
                                                                             reversed(list(specs.values())))]:
        flag = "--" + spec.name.replace("_", "-")
        if spec.type is bool:
            decl = f"{flag}/--no-{spec.name.replace('_', '-')}"
            func = click.option(decl, spec.name, default=None, help=help_text(spec), hidden=hidden)(func)
        else:
            kind = click.Choice([str(c) for c in spec.choices]) if spec.choices else PARAM_TYPES[spec.type]
            func = click.option(flag, spec.name, type=kind, default=None, help=help_text(spec), hidden=hidden)(func)
    return func


def named_objective(args: list[str]) -> str | None:
    """The value of ``--objective NAME`` / ``--objective=NAME`` in raw command-line ``args``.

    >>> named_objective(["--data", "x", "--objective=orpo"]), named_objective(["--objective", "simpo"])
    ('orpo', 'simpo')
    """
    for i, arg in enumerate(args):
        if arg.startswith("--objective="):
            return arg.partition("=")[2]
        if arg == "--objective" and i + 1 < len(args):
            return args[i + 1]
    return None


class ObjectiveOptionsCommand(click.Command):
    """A command whose ``--help`` shows an objective's options (with that objective's help, default and range)
    only when ``--objective NAME`` is on the command line; the others stay hidden (they parse, and the Trainer
    refuses an option of another objective with one line)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        from finetune_sdk.objectives.choice import objective_option_specs

        chosen = named_objective(args)
        per_objective = objective_option_specs()
        for param in self.params:
            if isinstance(param, click.Option) and param.name in per_objective and param.name not in \
                    all_option_specs():
                spec = per_objective[param.name][1].get(chosen or "")
                param.hidden = spec is None
                if spec is not None:
                    param.help = help_text(spec)
        return super().parse_args(ctx, args)

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from finetune_sdk.objectives.choice import registered_objectives

        names = ", ".join(name for name, o in registered_objectives().items() if o.options)
        formatter.write_paragraph()
        formatter.write_text(f"An objective's options show with it: --objective NAME --help ({names}).")
        super().format_epilog(ctx, formatter)

"""CLI flags generated from the option specs of the training loop and every registered plugin."""

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


def option_flags(func: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a command with one ``--kebab-name`` flag per option; unset flags stay ``None``."""
    for spec in reversed(list(all_option_specs().values())):
        flag = "--" + spec.name.replace("_", "-")
        default = f" [default: {spec.default}]" if spec.default not in (None, "", ()) else ""
        default += f" [{spec.range_text()}]" if spec.range_text() else ""
        if spec.type is bool:
            decl = f"{flag}/--no-{spec.name.replace('_', '-')}"
            func = click.option(decl, spec.name, default=None, help=spec.help + default)(func)
        else:
            kind = click.Choice([str(c) for c in spec.choices]) if spec.choices else PARAM_TYPES[spec.type]
            func = click.option(flag, spec.name, type=kind, default=None, help=spec.help + default)(func)
    return func

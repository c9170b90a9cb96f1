"""``finetune dora-info``: the DoRA technique's description and option defaults."""

from __future__ import annotations

import json

import click

from finetune_sdk_dora.technique import DoraTechnique


def defaults() -> dict[str, object]:
    """The technique's metadata and option defaults as plain data."""
    technique = DoraTechnique
    return {
        "name": technique.name,
        "description": technique.description,
        "default_learning_rate": technique.default_learning_rate,
        "options": {o.name: {"default": o.default, "type": o.type.__name__, "help": o.help}
                    for o in technique.options},
    }


@click.command("dora-info")
@click.option("--json", "as_json", is_flag=True, help="print the defaults as JSON")
def dora_info(as_json: bool) -> None:
    """Show the DoRA technique's option defaults (from the finetune-sdk-dora plugin)."""
    info = defaults()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{info['name']}: {info['description']}")
    click.echo(f"default learning rate: {info['default_learning_rate']}")
    click.echo("options:")
    for name, option in info["options"].items():
        flag = "--" + name.replace("_", "-")
        click.echo(f"  {flag:<18} {option['default']!s:<8} {option['help']}")

"""``finetune plugins``: what is installed, from which distribution, and what failed."""

from __future__ import annotations

import json
from typing import Any

import click
from rich.table import Table

from finetune_sdk.cli.errors import FinetuneGroup
from finetune_sdk.cli.render import cell, console


def plugin_report() -> dict[str, Any]:
    """Everything ``finetune plugins`` shows, as plain data (``--json``)."""
    from finetune_sdk.plugin_manager import KINDS, PLURALS, get_plugin_host

    host = get_plugin_host()
    return {
        "plugins": [
            {"name": p.name, "distribution": p.distribution, "version": p.version, "builtin": p.builtin,
             "hooks": p.hooks, "registered": p.registered, "error": p.error}
            for p in host.plugins
        ],
        **{PLURALS[kind]: [
            {"name": r.name, "plugin": r.plugin, "distribution": r.distribution, "version": r.version,
             "description": _description(r.cls),
             **({"options": [o.name for o in r.cls.options]} if kind == "objective" else {})}
            for r in sorted(host.registrations(kind), key=lambda r: r.name)
        ] for kind in KINDS},
    }


@click.group("plugins", cls=FinetuneGroup, invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.pass_context
def plugins_command(ctx: click.Context, as_json: bool) -> None:
    """List techniques, quantizers, formatters, objectives (with their own options), export formats, federated
    strategies and reward functions with their plugin and version."""
    if ctx.invoked_subcommand is not None:
        return
    report = plugin_report()
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    render_report(report)


def render_report(report: dict[str, Any]) -> None:
    """The plugin report as tables that stay readable at 80 columns: names, distributions and versions are never
    cut (descriptions and lists wrap instead)."""
    out = console()
    table = Table(title="plugins")
    table.add_column("plugin", no_wrap=True)
    table.add_column("distribution", no_wrap=True)
    table.add_column("provides", ratio=1, overflow="fold")  # a long name folds, never cut
    for p in report["plugins"]:
        if not p["error"]:
            table.add_row(cell(p["name"]), cell(_release(p)), cell(_provides(p["registered"])))
    out.print(table)
    titles = {"rewards": "reward functions", "exporters": "export formats"}
    for kind in ("techniques", "quantizers", "formatters", "objectives", "exporters", "strategies", "rewards"):
        if kind == "rewards" and not report[kind]:
            continue  # no plugin registers a reward function: no empty table
        table = Table(title=titles.get(kind, kind))
        table.add_column("name", no_wrap=True)
        table.add_column("distribution", no_wrap=True)
        table.add_column("description", ratio=1)
        for row in report[kind]:
            options = f" (options: {', '.join(row['options'])})" if row.get("options") else ""
            table.add_row(cell(row["name"]), cell(_release(row)), cell(row["description"] + options))
        out.print(table)
    broken = [p for p in report["plugins"] if p["error"]]
    if broken:
        table = Table(title="plugins with errors", style="red")
        table.add_column("plugin", no_wrap=True)
        table.add_column("distribution", no_wrap=True)
        table.add_column("error", ratio=1)
        for p in broken:
            table.add_row(cell(p["name"]), cell(_release(p)), cell(p["error"]))
        out.print(table)
    out.print("--json also lists each plugin's hooks.", style="dim")


def _description(registered: Any) -> str:
    """A class's ``description``, or the first line of a registered function's docstring."""
    if isinstance(registered, type):
        return str(getattr(registered, "description", ""))
    return ((registered.__doc__ or "").strip().splitlines() or [""])[0]


def _release(row: dict[str, Any]) -> str:
    """``finetune-sdk 0.1.0``: the distribution and its version."""
    return " ".join(str(part) for part in (row.get("distribution"), row.get("version")) if part) or "-"


def _provides(registered: list[str]) -> str:
    """``technique:lora, technique:qlora, quantizer:nf4`` as ``techniques: lora, qlora; quantizers: nf4``."""
    by_kind: dict[str, list[str]] = {}
    for item in registered:
        kind, _, name = item.partition(":")
        by_kind.setdefault(kind, []).append(name)
    from finetune_sdk.plugin_manager import PLURALS

    return "; ".join(f"{PLURALS.get(kind, kind + 's')}: {', '.join(names)}" for kind, names in by_kind.items())


@plugins_command.command("init")
@click.argument("name")
@click.option("--kind", type=click.Choice(["technique", "quantizer", "formatter"]), default="technique",
              show_default=True)
@click.option("--dir", "directory", default=".", show_default=True, help="where to create finetune-sdk-NAME/")
def init_command(name: str, kind: str, directory: str) -> None:
    """Write a working plugin package finetune-sdk-NAME (pyproject, module, contract test)."""
    from pathlib import Path

    from finetune_sdk.cli.plugin_scaffold import scaffold

    root = scaffold(name, kind, Path(directory))
    console().print(f"created {root}: `pip install -e {root}` then `python -m pytest {root}/tests`")

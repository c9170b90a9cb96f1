"""``finetune registry ...``: list, versions, show, scores, diff, alias, tag, verify, rm, push, pull."""

from __future__ import annotations

import json
from typing import Any

import click
from rich.table import Table

from finetune_sdk.cli.errors import FinetuneGroup
from finetune_sdk.cli.render import add_figure_rows, cell, console, short_time, titled_table


def _registry(ctx: click.Context) -> Any:
    from finetune_sdk.registry import Registry

    return Registry(ctx.obj.get("home") if ctx.obj else None)


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


@click.group("registry", cls=FinetuneGroup)
@click.option("--home", envvar="FINETUNE_SDK_REGISTRY", help="registry folder [env: FINETUNE_SDK_REGISTRY]")
@click.pass_context
def registry_group(ctx: click.Context, home: str | None) -> None:
    """Versions, aliases, tags and lineage of fine-tuned adapters; push to and pull from the Hub."""
    ctx.obj = {"home": home}


@registry_group.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def list_command(ctx: click.Context, as_json: bool) -> None:
    """Every adapter with its latest version and aliases."""
    rows = _registry(ctx).list()
    if as_json:
        return _echo_json(rows)
    table = Table(title="adapters")
    for column in ("name", "latest", "versions", "aliases", "updated"):
        table.add_column(column)
    for row in rows:
        aliases = ", ".join(f"{a}->{v}" for a, v in row["aliases"].items())
        table.add_row(cell(row["name"]), cell(row["latest"]), cell(row["versions"]), cell(aliases),
                      cell(row["updated"]))
    console().print(table)


@registry_group.command("versions")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def versions_command(ctx: click.Context, name: str, as_json: bool) -> None:
    """The versions of NAME with technique, parent, aliases and key metrics."""
    versions = _registry(ctx).versions(name)
    if as_json:
        return _echo_json([v.summary() for v in versions])
    table = titled_table(f"versions of {name}", show_edge=False)  # 80 columns hold every name in full
    for column in ("version", "created (UTC)", "technique", "parent"):
        table.add_column(column, no_wrap=True)
    table.add_column("aliases, #tags", ratio=1, min_width=10)
    for column in ("train\nloss", "eval\nloss"):
        table.add_column(column, justify="right", no_wrap=True)
    for v in versions:
        metrics = v.manifest.get("metrics") or {}
        labels = "\n".join([*v.aliases, *(f"#{tag}" for tag in v.tags)])  # one per line: never cut
        parent = v.parent or ""
        if parent.startswith(f"{name}@"):  # a parent of the same adapter: its version number is enough
            parent = parent.removeprefix(f"{name}@")
        table.add_row(cell(v.version), cell(short_time(v.created)), cell(v.manifest.get("technique")),
                      cell(parent), cell(labels), cell(metrics.get("train_loss", "")),
                      cell(metrics.get("eval_loss", "")))
    console().print(table)


@registry_group.command("show")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def show_command(ctx: click.Context, ref: str, as_json: bool) -> None:
    """Everything recorded about a version: base model, options, data, metrics, lineage, files."""
    info = _registry(ctx).show(ref)
    if as_json:
        return _echo_json(info)
    table = titled_table(info["ref"], show_header=False)
    table.add_column("field")
    table.add_column("value")
    for key in ("created", "description", "technique", "quantizer", "formatter", "parent", "lineage", "aliases",
                "tags", "source"):
        table.add_row(key, cell(info[key] if not isinstance(info[key], list) else ", ".join(info[key])))
    base = info["base_model"] or {}
    table.add_row("base model", cell(f"{base.get('id')} (revision {base.get('revision')})"))
    dataset = info["dataset"] or {}
    table.add_row("dataset", cell(f"{dataset.get('rows')} rows, {dataset.get('fingerprint')}"))
    for section in ("options", "metrics"):
        for key, value in sorted((info[section] or {}).items()):
            table.add_row(f"{section}.{key}", cell(value))
    for rel, meta in sorted(info["files"].items()):
        table.add_row(f"file {rel}", cell(f"{meta['size']:,} bytes sha256:{meta['sha256'][:16]}"))
    for row in info.get("scores") or []:
        stderr = "" if row["stderr"] is None else f" ± {row['stderr']:.4f}"
        table.add_row(f"score {row['task']} {row['metric']}",
                      cell(f"{row['value']:.4f}{stderr} ({row['num_fewshot']}-shot, limit {row['limit']}, "
                           f"lm-eval {row['lm_eval_version']}, seed {row['seed']}, {short_time(row['date'])})"))
    console().print(table)


@registry_group.command("scores")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def scores_command(ctx: click.Context, name: str, as_json: bool) -> None:
    """Benchmark scores of every version of NAME and of its base, per task: the difference to the base and whether
    it exceeds twice their combined standard error (finetune bench stores them)."""
    rows = _registry(ctx).score_table(name)
    if as_json:
        return _echo_json(rows)
    if not rows:
        console().print(f"no scores for {name} yet: finetune bench {name}@VERSION --task-file TASK.yaml")
        return
    table = titled_table(f"scores of {name}", show_edge=False)
    for column in ("task", "metric", "shots", "limit", "model", "value", "stderr", "vs base", "> 2 SE"):
        table.add_column(column, justify="left" if column in ("task", "metric", "model") else "right")
    add_figure_rows(table, [
        [cell(row["task"]), cell(row["metric"]), cell(row["num_fewshot"]),
         cell("all" if row["limit"] is None else row["limit"]), cell(row["model"]), cell(row["value"]),
         cell("" if row["stderr"] is None else row["stderr"]),
         cell("" if row["vs_base"] is None else f"{row['vs_base']:+.4f}"),
         cell("" if row["significant"] is None else row["significant"])] for row in rows], ("task", "metric"))
    console().print(table)


@registry_group.command("diff")
@click.argument("ref_a")
@click.argument("ref_b")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def diff_command(ctx: click.Context, ref_a: str, ref_b: str, as_json: bool) -> None:
    """What changed between two versions: options, metrics, data fingerprint, base model, files."""
    diff = _registry(ctx).diff(ref_a, ref_b)
    if as_json:
        return _echo_json(diff)
    table = titled_table(f"{diff['a']} -> {diff['b']}")
    for column in ("field", diff["a"], diff["b"]):
        table.add_column(column)
    for section in ("options", "metrics"):
        for key, (left, right) in diff[section].items():
            table.add_row(f"{section}.{key}", cell(left), cell(right))
    for key in ("technique", "quantizer", "formatter", "base_model", "dataset_fingerprint"):
        if key in diff:
            table.add_row(key, cell(diff[key][0]), cell(diff[key][1]))
    if diff["files"]:
        table.add_row("files changed", cell(", ".join(diff["files"])), "")
    console().print(table)


@registry_group.command("alias")
@click.argument("ref")
@click.argument("alias")
@click.pass_context
def alias_command(ctx: click.Context, ref: str, alias: str) -> None:
    """Point ALIAS (production, staging...) at the version REF resolves to."""
    version = _registry(ctx).alias(ref, alias)
    console().print(f"{version.name}@{alias} -> {version.ref}")


@registry_group.command("tag")
@click.argument("ref")
@click.argument("tags", nargs=-1, required=True)
@click.pass_context
def tag_command(ctx: click.Context, ref: str, tags: tuple[str, ...]) -> None:
    """Add free-form TAGS to a version."""
    version = _registry(ctx).tag(ref, *tags)
    console().print(f"{version.ref} tags: {', '.join(version.tags)}")


@registry_group.command("verify")
@click.argument("ref")
@click.pass_context
def verify_command(ctx: click.Context, ref: str) -> None:
    """Re-hash every stored file of a version against its recorded sha256."""
    version = _registry(ctx).verify(ref)
    console().print(f"{version.ref}: {len(version.files)} files verified")


@registry_group.command("rm")
@click.argument("ref")
@click.option("--force", is_flag=True, help="delete even when aliases point at it (the aliases go too)")
@click.pass_context
def rm_command(ctx: click.Context, ref: str, force: bool) -> None:
    """Delete a version (refused while an alias points at it, unless --force)."""
    version = _registry(ctx).delete(ref, force=force)
    console().print(f"deleted {version.ref}")


@registry_group.command("push")
@click.argument("ref")
@click.argument("repo_id")
@click.option("--endpoint", help="Hub endpoint (default: HF_ENDPOINT or https://huggingface.co)")
@click.option("--private", is_flag=True, help="create the repo as private")
@click.pass_context
def push_command(ctx: click.Context, ref: str, repo_id: str, endpoint: str | None, private: bool) -> None:
    """Push a version to a Hub repo: one commit tagged v<N>; aliases as branches. Token: HF_TOKEN or hf login."""
    info = _registry(ctx).push(ref, repo_id, endpoint=endpoint, private=private)
    console().print(f"pushed to {info['repo_id']} as {info['tag']} (commit {info['commit'][:12]})")


@registry_group.command("pull")
@click.argument("ref")
@click.option("--endpoint", help="Hub endpoint (default: HF_ENDPOINT or https://huggingface.co)")
@click.option("--name", help="local adapter name (default: the name it was published under)")
@click.pass_context
def pull_command(ctx: click.Context, ref: str, endpoint: str | None, name: str | None) -> None:
    """Pull hf://org/repo[@v3|@alias] into the local registry, verifying every file."""
    version = _registry(ctx).pull(ref, endpoint=endpoint, name=name)
    console().print(f"pulled {ref} as {version.ref}")

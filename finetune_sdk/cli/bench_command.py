"""``finetune bench``: score a result, registry version or base model on lm-evaluation-harness tasks."""

from __future__ import annotations

import json

import click

from finetune_sdk.cli.render import add_figure_rows, cell, console, titled_table


def _split(values: tuple[str, ...]) -> list[str]:
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def _limit(value: str | None) -> int | float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number of documents (or a fraction below 1)") from None
    return number if number < 1 else int(number)


@click.command("bench")
@click.argument("ref")
@click.option("--tasks", "-t", multiple=True, help="lm-eval task names, comma-separated or repeated (default: the "
                                                   "tasks of the --task-file files)")
@click.option("--task-file", "task_files", multiple=True, type=click.Path(dir_okay=False),
              help="an lm-eval task YAML (local data paths read relative to it); repeatable")
@click.option("--num-fewshot", type=click.IntRange(min=0), help="examples per prompt (default: each task's own)")
@click.option("--limit", help="at most this many documents per task (or a fraction below 1): for quick checks")
@click.option("--batch-size", default="auto", show_default=True, help="an int, or auto (largest that fits)")
@click.option("--seed", default=0, show_default=True, type=int, help="seed of few-shot sampling and of the run")
@click.option("--no-base", is_flag=True, help="don't score the base model beside a result")
@click.option("--no-store", is_flag=True, help="don't store the scores with the registry version")
@click.option("--chat/--no-chat", default=None,
              help="wrap prompts in the result's chat format (default: when it was trained with a formatter)")
@click.option("--json", "as_json", is_flag=True, help="print the score rows as JSON")
@click.option("--trust-remote-code", is_flag=True,
              help="let the base model repository's own Python code run (never turned on by a result or a download)")
def bench_command(ref: str, tasks: tuple[str, ...], task_files: tuple[str, ...], num_fewshot: int | None,
                  limit: str | None, batch_size: str, seed: int, no_base: bool, no_store: bool, chat: bool | None,
                  as_json: bool, trust_remote_code: bool) -> None:
    """Score REF (a result folder, NAME@VERSION, hf://..., or a base model) on lm-evaluation-harness tasks, offline,
    beside its base model; a registry version keeps its scores (finetune registry scores NAME).

    \b
    Example:
      finetune bench quill@2 --task-file examples/tasks/quillfeather_qa.yaml --limit 12
    """
    from finetune_sdk.evaluation.benchmarking import benchmark
    from finetune_sdk.log import quiet_third_party_output

    quiet_third_party_output()
    from finetune_sdk.evaluation.benchmarking import check_batch_size
    from finetune_sdk.errors import ConfigError

    try:
        size = check_batch_size(batch_size)
    except ConfigError:
        raise click.BadParameter(f"{batch_size!r}: give a whole number of at least 1, or auto",
                                 param_hint="--batch-size") from None
    result = benchmark(ref, _split(tasks), task_files=list(task_files), num_fewshot=num_fewshot, limit=_limit(limit),
                       batch_size=size, seed=seed, with_base=not no_base, store=not no_store, chat=chat,
                       trust_remote_code=trust_remote_code)
    if as_json:
        click.echo(json.dumps({"model": result.model, "scores": result.scores, "base_scores": result.base_scores,
                               "stored_as": result.stored_as}, indent=2, sort_keys=True, default=str))
        return
    table = titled_table(f"{result.model} (lm-eval {result.scores[0]['lm_eval_version'] if result.scores else ''})")
    for column in ("task", "metric", "shots", "value", "± stderr", "base", "vs base", "> 2 SE"):
        table.add_column(column, justify="right" if column not in ("task", "metric") else "left")
    shots = {(r["task"], r["metric"], r["filter"]): r["num_fewshot"] for r in result.scores}
    add_figure_rows(table, [
        [cell(row["task"]), cell(row["metric"]), cell(shots[(row["task"], row["metric"], row["filter"])]),
         cell(row["value"]), cell("" if row["stderr"] is None else row["stderr"]),
         cell("" if row["base"] is None else row["base"]),
         cell("" if row["vs_base"] is None else f"{row['vs_base']:+.4f}"),
         cell("" if row["significant"] is None else row["significant"])] for row in result.table()])
    console().print(table)
    if result.stored_as:
        console().print(f"stored with {result.stored_as}: finetune registry scores {result.stored_as.split('@')[0]}")

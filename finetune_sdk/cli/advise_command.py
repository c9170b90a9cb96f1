"""``finetune advise``: which technique and settings fit a model, a dataset and this machine, and why."""

from __future__ import annotations

import json
from typing import Any

import click

from finetune_sdk.cli.errors import UserError
from finetune_sdk.errors import FinetuneError


def offline_objectives() -> list[str]:
    """The registered objectives that train a causal LM offline (not GRPO, which --num-generations covers), from
    the plugin registry (no torch imported)."""
    from finetune_sdk.objectives.choice import registered_objectives

    return [name for name, objective in registered_objectives().items()
            if "causal-lm" in objective.technique_tasks and "num_generations" not in objective.option_specs()]


def _memory(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    from finetune_sdk.advice.machine import parse_memory

    try:
        size = parse_memory(value)
    except FinetuneError as exc:
        raise click.BadParameter(str(exc)) from None
    if size <= 0:
        raise click.BadParameter(f"memory must be more than zero, got {value!r}")
    return size


@click.command("advise")
@click.argument("model")
@click.option("--rows", type=click.IntRange(min=0), help="number of training examples")
@click.option("--tokens", type=click.IntRange(min=0), help="number of training tokens")
@click.option("--memory", callback=_memory, metavar="SIZE",
              help="memory to plan for, like 8GiB or 16000MB (default: what is free now)")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="where training will run")
@click.option("--seq-len", type=click.IntRange(min=1), default=512, show_default=True,
              help="tokens per example (max_length)")
@click.option("--keep-base", is_flag=True, help="the base model must stay untouched")
@click.option("--private", is_flag=True, help="the data is private and must not leave this machine")
@click.option("--private-data", "owners", type=click.IntRange(min=2), flag_value=2, default=None,
              help="the data can't leave its owners (several hospitals, banks, devices): recommend federated "
                   "fine-tuning; --owners N says how many")
@click.option("--owners", "owners", type=click.IntRange(min=2), help="number of data owners (implies --private-data)")
@click.option("--task", type=click.Choice(["causal-lm", "classification", "reward"]), default="causal-lm",
              show_default=True,
              help="what is trained: text generation, a classifier, or a pairwise reward model (reward-model)")
@click.option("--objective", type=click.Choice(offline_objectives()), default="sft", show_default=True,
              help="what offline causal-lm training optimises: sft, dpo, orpo, simpo (preference pairs), kto (rated "
                   "answers) or a plugin's objective")
@click.option("--num-generations", type=click.IntRange(min=2), default=None,
              help="online RL with GRPO: completions sampled per prompt (then --seq-len is prompt + completion)")
@click.option("--eval", "eval_data", type=click.Path(dir_okay=False),
              help="held-out prompt/completion rows: score the base zero-shot and few-shot on them and say when "
                   "prompting already does the job (loads the model)")
@click.option("--data", type=click.Path(dir_okay=False),
              help="the training rows (with --eval: the few-shot examples, and their number decides 'too little')")
@click.option("--shots", type=click.IntRange(min=1), default=3, show_default=True,
              help="with --eval: examples in each few-shot prompt")
@click.option("--eval-budget", type=click.FloatRange(min=1), default=60.0, show_default=True, metavar="SECONDS",
              help="with --eval: time to spend scoring; rows past it are left out (and said so)")
@click.option("--json", "as_json", is_flag=True, help="print the advice as JSON")
def advise_command(model: str, rows: int | None, tokens: int | None, memory: int | None, device: str,
                   seq_len: int, keep_base: bool, private: bool, owners: int | None, task: str,
                   objective: str, num_generations: int | None, eval_data: str | None, data: str | None,
                   shots: int, eval_budget: float, as_json: bool) -> None:
    """Recommend a technique, quantizer, batch size and memory settings for MODEL (a folder, cached Hub id or
    .gguf file), with the memory estimate and the reasons. Only the model's config is read.

    \b
    Example:
      finetune advise ./my-model --rows 2000 --memory 16GiB --private
    """
    from finetune_sdk.advice.advisor import advise

    try:
        advice = advise(model, dataset_rows=rows, dataset_tokens=tokens, memory_bytes=memory, device=device,
                        must_keep_base=keep_base, private_data=private, seq_len=seq_len, task=task,
                        data_owners=owners or 0, num_generations=num_generations or 0, objective=objective,
                        eval_data=eval_data, data=data, shots=shots, eval_budget_s=eval_budget)
    except FinetuneError as exc:
        raise UserError(str(exc)) from None
    if as_json:
        click.echo(json.dumps(advice.as_dict(), indent=2))
        return
    render(advice, model)


def render(advice: Any, model: str) -> None:
    from rich.table import Table

    from finetune_sdk.cli.render import cell, console, memory_table
    from finetune_sdk.advice.machine import format_bytes

    out = console()
    table = Table(title="recommendation" if advice.fits else "recommendation (does not fit)")
    table.add_column("setting")
    table.add_column("value")
    if advice.federated:
        table.add_row("training", "federated (Flower): each owner trains on its own data")
    table.add_row("technique", advice.technique)
    table.add_row("quantizer", advice.quantizer or "none")
    for name, value in advice.options.items():
        table.add_row(name, ("yes" if value else "no") if isinstance(value, bool) else cell(value))
    table.add_row("estimated peak", f"{format_bytes(advice.estimate.total)} of {format_bytes(advice.memory_bytes)}")
    out.print(table)
    out.print(memory_table(advice.estimate))
    out.print("[bold]why[/bold]")
    for reason in advice.reasons:
        out.print(cell(f"- {reason}"))
    if advice.prompting is not None and advice.prompting.verdict != "fine-tune":
        return  # the advice is not to fine-tune: no training command
    out.print(cell(advice.command(model)))

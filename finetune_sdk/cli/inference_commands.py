"""``finetune eval``, ``finetune generate`` and ``finetune predict`` on a result folder (or a base model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from finetune_sdk.cli.render import cell, console, metrics_table, short_path, titled_table
from finetune_sdk.errors import ConfigError
from finetune_sdk.models.loading import is_result, open_model  # noqa: F401  (is_result: other commands import it here)


TRUST_HELP = "let the model repository's own Python code run (never turned on by a result or a download)"


def check_task(ref: str, generative: bool) -> None:
    """Refuse a result whose technique can't generate (``generative``) or predict, before its model loads."""
    if not is_result(ref):
        return
    from finetune_sdk.models.inference import require_task
    from finetune_sdk.models.loading import result_folder
    from finetune_sdk.training.manifest import read_manifest

    require_task(read_manifest(result_folder(ref)).get("task"), generative)


def check_rows(ref: str, formatter: str | None, rows: Any) -> None:
    """Refuse rows the result's formatter (or ``--formatter``) can't format, before the model loads."""
    if not formatter and not is_result(ref):
        return  # a base model's formatter is picked from the data's columns
    from finetune_sdk.plugin_manager import get_plugin_host

    if not formatter:
        from finetune_sdk.models.loading import result_folder
        from finetune_sdk.training.manifest import read_manifest

        formatter = read_manifest(result_folder(ref)).get("formatter")
        if not formatter:
            return
    chosen = get_plugin_host().create("formatter", formatter)
    for row, where in zip(rows.rows, rows.where):
        chosen.validate(row, where)


def read_lines(items: tuple[str, ...], file: str | None, what: str) -> list[str]:
    lines = list(items)
    if file:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"{what} file {file} does not exist")
        from finetune_sdk.data.textfiles import read_text

        lines += [line.strip() for line in read_text(path, error=ConfigError).splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"no {what}s given: pass them as arguments or with --file")
    return lines


@click.command("eval")
@click.argument("ref")
@click.argument("data")
@click.option("--formatter", "-f", help="override the formatter recorded with the result")
@click.option("--compare-base", is_flag=True, help="also evaluate the base model and show both side by side")
@click.option("--prompts", "prompt_file", help="with --compare-base: a file of prompts to generate side by side")
@click.option("--report-dir", help="with --compare-base: write comparison.json and comparison.html here")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--trust-remote-code", is_flag=True, help=TRUST_HELP)
def eval_command(ref: str, data: str, formatter: str | None, compare_base: bool, prompt_file: str | None,
                 report_dir: str | None, max_new_tokens: int, trust_remote_code: bool) -> None:
    """Evaluate a result (or a base model) on DATA: loss and perplexity, or accuracy and macro-F1."""
    if report_dir is not None:
        if not compare_base:
            raise ConfigError("--report-dir writes the comparison report: add --compare-base")
        from finetune_sdk.training.output_paths import check_report_dir

        check_report_dir(report_dir, "--report-dir")
    from finetune_sdk.data.rows import load_rows

    rows = load_rows(data, name="eval_data")  # a missing or malformed file is refused before a model loads
    prompts = read_lines((), prompt_file, "prompt") if prompt_file else []
    check_rows(ref, formatter, rows)
    model = open_model(ref, formatter, trust_remote_code)
    if model.formatter is None:
        raise ConfigError("this model has no formatter recorded; pass --formatter")
    if not compare_base:
        console().print(metrics_table(model.evaluate(rows), title=f"eval of {short_path(ref)} on {short_path(data)}"))
        return
    if not is_result(ref):
        raise ConfigError(f"--compare-base needs a fine-tuned result, and {ref} is a base model")
    from finetune_sdk.evaluation.compare import compare_models
    from finetune_sdk.models.loading import load_base, result_folder
    from finetune_sdk.training.manifest import read_manifest
    from finetune_sdk.evaluation.report import comparison_table

    folder = result_folder(ref)
    manifest = read_manifest(folder)
    history_file = folder / "training_log.json"
    history = json.loads(history_file.read_text()) if history_file.is_file() else []
    info = {"technique": manifest["technique"], "base_model": manifest["base_model"]["id"], "output_dir": str(folder)}
    base = lambda: load_base(folder, trust_remote_code=trust_remote_code)  # noqa: E731
    report = compare_models(model, base, rows, prompts,
                            max_new_tokens=max_new_tokens, log_history=history, info=info, report_dir=report_dir)
    console().print(comparison_table(report))
    if report_dir:
        console().print(f"report: {report['files']['html']} and {report['files']['json']}")


@click.command("generate")
@click.argument("ref")
@click.argument("prompts", nargs=-1)
@click.option("--file", "prompt_file", help="a text file with one prompt per line")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--raw", is_flag=True, help="send prompts as they are, without the formatter's wrapping")
@click.option("--formatter", "-f", help="override the formatter recorded with the result")
@click.option("--trust-remote-code", is_flag=True, help=TRUST_HELP)
def generate_command(ref: str, prompts: tuple[str, ...], prompt_file: str | None, max_new_tokens: int, raw: bool,
                     formatter: str | None, trust_remote_code: bool) -> None:
    """Generate answers to PROMPTS with a result folder (or a base model)."""
    lines = read_lines(prompts, prompt_file, "prompt")
    check_task(ref, generative=True)
    model = open_model(ref, formatter, trust_remote_code)
    answers = model.generate(lines, max_new_tokens=max_new_tokens, raw=raw)
    table = titled_table(f"generations of {short_path(ref)}", show_lines=True)
    table.add_column("prompt")
    table.add_column("answer")
    for prompt, answer in zip(lines, answers):
        table.add_row(cell(prompt), cell(answer))
    console().print(table)


@click.command("predict")
@click.argument("ref")
@click.argument("texts", nargs=-1)
@click.option("--file", "text_file", help="a text file with one text per line")
@click.option("--prompt", help="reward model: score each TEXT as a completion of this prompt, rendered as in "
              "training (without it each text is scored as it is)")
@click.option("--trust-remote-code", is_flag=True, help=TRUST_HELP)
def predict_command(ref: str, texts: tuple[str, ...], text_file: str | None, prompt: str | None,
                    trust_remote_code: bool) -> None:
    """Predict labels for TEXTS with a classifier result, or rewards with a reward model result."""
    from finetune_sdk.formatter import REWARD

    lines = read_lines(texts, text_file, "text")
    check_task(ref, generative=False)
    model = open_model(ref, trust_remote_code=trust_remote_code)
    if prompt is not None and model.task != REWARD:
        raise ConfigError("--prompt is for reward models (technique 'reward-model'); a classifier labels texts")
    if model.task == REWARD:
        rewards = model.score([prompt] * len(lines), lines) if prompt is not None else model.predict(lines)
        table = titled_table(f"rewards of {short_path(ref)}" + (f" for the prompt {prompt!r}" if prompt else ""))
        table.add_column("completion" if prompt is not None else "text")
        table.add_column("reward", justify="right")
        for text, reward in zip(lines, rewards):
            table.add_row(cell(text), f"{reward:.4f}")
        console().print(table)
        return
    table = titled_table(f"predictions of {short_path(ref)}")
    table.add_column("text")
    table.add_column("label")
    table.add_column("score", justify="right")
    for text, item in zip(lines, model.predict(lines, return_scores=True)):
        table.add_row(cell(text), cell(item["label"]), f"{item['score']:.3f}")
    console().print(table)

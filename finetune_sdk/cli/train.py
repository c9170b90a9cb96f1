"""``finetune train``."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import click

from finetune_sdk.cli.config_file import read_config
from finetune_sdk.cli.option_flags import ObjectiveOptionsCommand, option_flags
from finetune_sdk.cli.render import console, metrics_table
from finetune_sdk.errors import ConfigError

RUN_KEYS = ("model", "data", "train_data", "eval_data", "technique", "quantizer", "formatter", "output_dir",
            "publish")


@click.command("train", cls=ObjectiveOptionsCommand)
@click.option("--model", "-m", help="model folder, Hub id or .gguf file")
@click.option("--data", "--train-data", "data", help="training data: .jsonl, .json, .csv or .parquet")
@click.option("--eval-data", help="held-out data evaluated after (and during) training")
@click.option("--technique", "-t", help="lora (default), qlora, full, classifier or a plugin's")
@click.option("--quantizer", "-q", help="nf4, int8, none (default: the technique's)")
@click.option("--formatter", "-f", help="llama2-chat, alpaca, chatml, chat-template, text, classification...")
@click.option("--output-dir", "-o", help="where the result goes")
@click.option("--publish", "publish_as", help="publish the result to the registry under this name")
@click.option("--resume", is_flag=True, help="continue from the newest complete checkpoint of --output-dir")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="processes for data-parallel training: launches torchrun (gloo on CPU, NCCL on GPUs)")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML or TOML file with the same names")
@click.option("--reward", "rewards", multiple=True, metavar="NAME",
              help="GRPO (prompt-only data): a reward function registered by a plugin; repeat for several "
                   "(finetune plugins lists them)")
@option_flags
def train_command(model: str | None, data: str | None, eval_data: str | None, technique: str | None,
                  quantizer: str | None, formatter: str | None, output_dir: str | None, publish_as: str | None,
                  resume: bool, nproc: int, config_path: str | None, rewards: tuple[str, ...],
                  **flags: Any) -> None:
    """Fine-tune a model on a dataset and save the result.

    \b
    Example:
      finetune train --model ./tiny-llama --data train.jsonl --technique lora --r 16 --num-train-epochs 2
      finetune train --model ./tiny-llama --data prompts.jsonl --reward my_reward --reward-model rm-v1
      finetune train --model ./tiny-llama --data pairs.jsonl --objective orpo --beta 0.1
    """
    if rewards:  # --reward a --reward b is --reward-funcs a,b
        flags["reward_funcs"] = ",".join([*filter(None, [flags.get("reward_funcs")]), *rewards])
    if nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        run_torchrun(nproc, {"model": model, "data": data, "eval_data": eval_data, "technique": technique,
                             "quantizer": quantizer, "formatter": formatter, "output_dir": output_dir,
                             "publish": publish_as, "config": config_path}, {**flags, "resume": resume or None})
        return
    from finetune_sdk.log import quiet_third_party_output
    from finetune_sdk.trainer import Trainer

    config = read_config(config_path)
    check_config_keys(config, config_path)
    given = {"model": model, "data": data, "eval_data": eval_data, "technique": technique, "quantizer": quantizer,
             "formatter": formatter, "output_dir": output_dir}
    run = {k: v for k, v in config.items() if k in RUN_KEYS}
    run.update({k: v for k, v in given.items() if v is not None})
    options = {k: v for k, v in config.items() if k not in RUN_KEYS}
    options.update({k: v for k, v in flags.items() if v is not None})
    train_data = run.get("data") or run.get("train_data")
    if not run.get("model"):
        raise ConfigError("no model given: pass --model PATH_OR_ID (or 'model:' in --config)")
    if not train_data:
        raise ConfigError("no training data given: pass --data FILE (or 'data:' in --config)")
    quiet_third_party_output()
    trainer = Trainer(run["model"], technique=run.get("technique") or "lora", quantizer=run.get("quantizer"),
                      formatter=run.get("formatter"), output_dir=run.get("output_dir"),
                      publish_as=publish_as or run.get("publish"), **options)
    result = trainer.fit(train_data, eval_data=run.get("eval_data"), resume=resume)
    console().print(metrics_table(result.metrics, title=f"{trainer.technique.name} result"))
    last = next((entry for entry in reversed(result.log_history) if "loss" in entry), None)
    if last is not None and "train_loss" in result.metrics:
        console().print(f"train_loss is the mean over the run; the loss logged at the last logging step "
                        f"(step {last['step']}) was {last['loss']:.4f}.", style="dim", highlight=False)
    console().print(f"saved to [bold]{result.output_dir}[/bold]")
    if result.version is not None:
        console().print(f"published as [bold]{result.version.ref}[/bold]")


def check_config_keys(config: dict[str, Any], path: str | None) -> None:
    """Refuse a key of the config file that is neither a run setting nor an option, naming the file."""
    from finetune_sdk.cli.option_flags import all_option_specs
    from finetune_sdk.errors import closest
    from finetune_sdk.objectives.choice import objective_option_owners

    known = set(RUN_KEYS) | set(all_option_specs()) | set(objective_option_owners())
    for key in config:
        if key not in known:
            raise ConfigError(f"{path}: unknown key {key!r}{closest(str(key), known)}; the keys are the names of "
                              "`finetune train --help` with '_' for '-'")


def run_torchrun(nproc: int, run: dict[str, Any], flags: dict[str, Any]) -> None:
    """Re-run this ``finetune train`` under ``torchrun --nproc_per_node N`` (one node) and exit with its status.

    torchrun, not ``accelerate launch --cpu`` (which starts a single process in accelerate 1.15), starts the
    workers; the Trainer picks gloo on CPU and transformers' default (NCCL) on GPUs.
    """
    from finetune_sdk.errors import ConfigError

    if nproc < 1:
        raise ConfigError("--nproc must be at least 1")
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "finetune_sdk", "train"]
    for key, value in run.items():
        if value is not None:
            args += [f"--{key.replace('_', '-')}", str(value)]
    for key, value in flags.items():
        if value is None:
            continue
        flag = key.replace("_", "-")
        if isinstance(value, bool):
            args.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            args += [f"--{flag}", str(value)]
    status = subprocess.call(args)
    if status:
        raise click.exceptions.Exit(status)

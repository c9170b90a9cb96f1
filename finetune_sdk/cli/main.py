"""``finetune``: the command group, its commands, and plugin-provided commands."""

from __future__ import annotations

import sys

import click

from finetune_sdk import __version__
from finetune_sdk.cli.advise_command import advise_command
from finetune_sdk.cli.bench_command import bench_command
from finetune_sdk.cli.errors import FinetuneGroup
from finetune_sdk.cli.export_command import export_command
from finetune_sdk.cli.federated_commands import federated_group
from finetune_sdk.cli.feedback_command import feedback_command
from finetune_sdk.cli.inference_commands import eval_command, generate_command, predict_command
from finetune_sdk.cli.merge_command import merge_command
from finetune_sdk.cli.plugins_command import plugins_command
from finetune_sdk.cli.registry_commands import registry_group
from finetune_sdk.cli.studio_command import studio_command
from finetune_sdk.cli.train import train_command


@click.group(cls=FinetuneGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="finetune")
def cli() -> None:
    """Fine-tune large language models with LoRA, QLoRA, full fine-tuning or a classifier head.

    \b
    Example:
      finetune train --model ./my-model --data train.jsonl --technique qlora --formatter llama2-chat
      finetune generate finetune-runs/my-run "What is our refund policy?"
    """
    from rich.console import Console

    from finetune_sdk.progress import display_on

    display_on(Console(stderr=True))  # long steps as spinners and bars on a terminal, log lines otherwise


cli.add_command(train_command)
cli.add_command(eval_command)
cli.add_command(generate_command)
cli.add_command(predict_command)
cli.add_command(feedback_command)
cli.add_command(plugins_command)
cli.add_command(registry_group)
cli.add_command(merge_command)
cli.add_command(export_command)
cli.add_command(advise_command)
cli.add_command(bench_command)
cli.add_command(federated_group)
cli.add_command(studio_command)


def _add_plugin_commands() -> None:
    from finetune_sdk.errors import PluginError
    from finetune_sdk.plugin_manager import get_plugin_host

    try:
        get_plugin_host().add_commands(cli)
    except PluginError:
        # Strict mode and a broken plugin: nothing to add. The command that needs the plugins meets the same
        # error and reports it as one line naming the plugin and its distribution (exit 2), not a traceback.
        pass


_add_plugin_commands()


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``finetune`` script."""
    sys.exit(cli.main(args=argv, prog_name="finetune"))

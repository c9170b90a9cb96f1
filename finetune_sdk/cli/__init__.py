"""The ``finetune`` command line (click + rich) over the same API as ``finetune_sdk.Trainer``."""

from finetune_sdk.cli.main import cli, main

__all__ = ["cli", "main"]

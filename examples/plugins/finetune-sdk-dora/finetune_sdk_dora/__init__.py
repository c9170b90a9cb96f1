"""finetune-sdk-dora: the ``dora`` technique, a loss CSV observer and the ``finetune dora-info`` command.

Installed, it is found through the ``finetune_sdk`` entry-point group (entry point ``dora``)::

    from finetune_sdk import Trainer
    Trainer("path/to/model", technique="dora", r=16).fit("train.jsonl")

Set ``FINETUNE_SDK_LOSS_CSV=loss.csv`` to have every training run append ``step,loss,epoch`` rows to that file.
"""

from __future__ import annotations

from typing import Any

from finetune_sdk import hookimpl
from finetune_sdk_dora.loss_csv import log_loss
from finetune_sdk_dora.technique import DoraTechnique

__version__ = "0.1.0"
__all__ = ["DoraTechnique", "FINETUNE_SDK_PLUGIN_API"]

#: The finetune_sdk plugin API versions this plugin supports (inclusive).
FINETUNE_SDK_PLUGIN_API = (1, 1)


@hookimpl
def register_techniques(register: Any) -> None:
    register(DoraTechnique)


@hookimpl
def on_log(context: Any, logs: dict[str, Any]) -> None:
    log_loss(context, logs)


@hookimpl
def register_commands(cli: Any) -> None:
    from finetune_sdk_dora.cli import dora_info

    cli.add_command(dora_info)

"""finetune-sdk-sharegpt: the ``sharegpt`` formatter (ShareGPT conversations rendered as ChatML).

Installed, it is found through the ``finetune_sdk`` entry-point group (entry point ``sharegpt``)::

    from finetune_sdk import Trainer
    Trainer("path/to/model", formatter="sharegpt").fit("sharegpt.jsonl")
"""

from __future__ import annotations

from typing import Any

from finetune_sdk import hookimpl
from finetune_sdk_sharegpt.formatter import ROLES, ShareGPTFormatter

__version__ = "0.1.0"
__all__ = ["FINETUNE_SDK_PLUGIN_API", "ROLES", "ShareGPTFormatter"]

#: The finetune_sdk plugin API versions this plugin supports (inclusive).
FINETUNE_SDK_PLUGIN_API = (1, 1)


@hookimpl
def register_formatters(register: Any) -> None:
    register(ShareGPTFormatter)

"""finetune-sdk-earlystop: stop training when the held-out loss stops improving, as transformers'
``EarlyStoppingCallback`` does, through the SDK's steering observer hook (``on_evaluate`` answers
``STOP_TRAINING``).

Settings (environment variables, read at each run's first evaluation):

* ``FINETUNE_SDK_EARLY_STOPPING_PATIENCE`` (default 2): evaluations without improvement before stopping
  (transformers' ``early_stopping_patience``).
* ``FINETUNE_SDK_EARLY_STOPPING_THRESHOLD`` (default 0.0): how much ``eval_loss`` must fall to count as an
  improvement (``early_stopping_threshold``).

The run stops after the step that was evaluated; its result is saved as usual (the weights at that step).

Example:
    >>> from pathlib import Path
    >>> from finetune_sdk.plugin_api import STOP_TRAINING, TrainingContext
    >>> context = TrainingContext("lora", None, "chatml", "m", Path("out"), {})
    >>> [on_evaluate(context, {"eval_loss": loss}) for loss in (2.0, 1.5, 1.6, 1.7)] == [None, None, None,
    ...                                                                                  STOP_TRAINING]
    True
"""

from __future__ import annotations

import os
from typing import Any

from finetune_sdk.plugin_api import STOP_TRAINING, TrainingContext, hookimpl

FINETUNE_SDK_PLUGIN_API = (1, 1)
METRIC = "eval_loss"


@hookimpl
def on_evaluate(context: TrainingContext, metrics: dict[str, Any]) -> str | None:
    """Count evaluations whose ``eval_loss`` did not improve on the best by more than the threshold; answer
    ``STOP_TRAINING`` once there are ``patience`` of them in a row."""
    if METRIC not in metrics:
        return None
    state = context.extra.setdefault("early_stopping", {
        "best": None, "bad": 0,
        "patience": int(os.environ.get("FINETUNE_SDK_EARLY_STOPPING_PATIENCE", "2")),
        "threshold": float(os.environ.get("FINETUNE_SDK_EARLY_STOPPING_THRESHOLD", "0.0"))})
    value = float(metrics[METRIC])
    if state["best"] is None or value < state["best"] - state["threshold"]:
        state["best"], state["bad"] = value, 0
        return None
    state["bad"] += 1
    return STOP_TRAINING if state["bad"] >= state["patience"] else None

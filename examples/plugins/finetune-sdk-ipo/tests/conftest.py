"""Offline, with the installed plugins loaded from their entry points."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the contract suite finds the objective the way users do: through the installed entry point
os.environ["FINETUNE_SDK_DISABLE_PLUGIN_AUTOLOAD"] = "0"

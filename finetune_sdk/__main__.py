"""``python -m finetune_sdk`` runs the ``finetune`` CLI."""

from finetune_sdk.cli.main import main

main()

"""The adapter registry (shipped as ``finetune_sdk.registry``): versions, aliases and lineage of results."""

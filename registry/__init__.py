"""The adapter registry (shipped as ``finetune_sdk.registry``): immutable versions, aliases, tags and lineage of
fine-tuning results in a local store, pushed to and pulled from the Hugging Face Hub.

Example:
    >>> from finetune_sdk.registry import Registry
    >>> Registry("/tmp/reg").list()  # doctest: +SKIP
"""

from finetune_sdk.registry.client import Registry
from finetune_sdk.registry.local import AdapterVersion, default_home
from finetune_sdk.registry.refs import Ref, parse_ref, validate_name

__all__ = ["AdapterVersion", "Ref", "Registry", "default_home", "parse_ref", "validate_name"]

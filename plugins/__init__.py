"""Builtin plugins of finetune_sdk: techniques, quantizers and formatters.

Shipped as ``finetune_sdk.plugins``; registered from the explicit list in
``finetune_sdk.plugin_manager.BUILTIN_PLUGINS``.
"""

if __name__ != "finetune_sdk.plugins":  # pragma: no cover - guards a source-tree import as top-level `plugins`
    raise ImportError(
        f"the builtin plugins must be imported as 'finetune_sdk.plugins', not {__name__!r}; "
        "install the project (pip install -e .) instead of putting the repository root on sys.path"
    )

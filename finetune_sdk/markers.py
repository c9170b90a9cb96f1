"""The ``finetune_sdk`` project's pluggy markers: :data:`hookspec` marks a hook's specification
(:mod:`finetune_sdk.hookspecs`), :data:`hookimpl` a plugin's implementation of it.

They live apart from the specs so that the plugin API (:mod:`finetune_sdk.plugin_api`), which re-exports
``hookimpl``, and the specs, which annotate with the plugin API's types, never import each other.

Example:
    >>> from finetune_sdk.markers import PROJECT, hookimpl
    >>> @hookimpl
    ... def register_formatters(register): ...
    >>> PROJECT
    'finetune_sdk'
"""

from __future__ import annotations

import pluggy

#: The pluggy project name: the markers' name and the entry-point group plugins are found through.
PROJECT = "finetune_sdk"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

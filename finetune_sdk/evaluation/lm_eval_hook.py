"""Makes lm-evaluation-harness's own ``lm_eval`` command accept ``--model finetune-sdk``.

lm-eval 0.4.13 discovers no third-party model backends: its registry (``lm_eval.api.registry.model_registry``)
holds the builtin ones (``lm_eval.models.MODEL_MAPPING``) and whatever an imported module registers, and it reads no
entry points. So the installed SDK carries a startup hook: ``finetune_sdk_lm_eval.pth`` in site-packages (written
by ``build_hooks.py`` into the wheel and into editable installs) runs ``import _finetune_sdk_lm_eval_hook``, a
copy of this module, at interpreter start. :func:`install` only appends a finder to ``sys.meta_path``; it imports
nothing (no torch, no lm_eval, not even ``finetune_sdk``) and costs a few microseconds. When a process later
imports ``lm_eval.api.registry``, the finder lets the normal import run and then registers ``finetune-sdk`` as one
of lm-eval's own lazy placeholders (``"finetune_sdk.evaluation.lm_eval_backend:FinetuneSDKLM"``, as lm-eval registers its
builtins), and removes itself. The backend module is imported only when lm-eval looks the name up.

Every failure is swallowed: this hook must never break an interpreter, lm-eval or another package's import.

Example:
    >>> import _finetune_sdk_lm_eval_hook  # what the .pth line does  # doctest: +SKIP
    $ lm_eval run --model finetune-sdk --model_args ref=bot@2 --tasks quillfeather_choice --include_path examples/tasks
"""

from __future__ import annotations

import sys  # nothing else: this module runs at every interpreter start (no typing, no importlib.util)

#: The module after whose import the backend is registered.
REGISTRY_MODULE = "lm_eval.api.registry"
#: The name lm-eval's ``--model`` takes, and the lazy placeholder it resolves to.
MODEL_NAME = "finetune-sdk"
MODEL_TARGET = "finetune_sdk.evaluation.lm_eval_backend:FinetuneSDKLM"


def register(registry_module: object) -> None:
    """Register :data:`MODEL_NAME` in ``registry_module.model_registry`` as a lazy placeholder (no import), unless
    a backend of that name is already there; errors are ignored."""
    try:
        registry = registry_module.model_registry
        if MODEL_NAME not in registry:
            registry.register(MODEL_NAME, target=MODEL_TARGET)
    except Exception:  # noqa: BLE001 - a startup hook never breaks lm-eval; `lm_eval` then says the name is unknown
        pass


class LmEvalRegistryFinder:
    """A ``sys.meta_path`` finder that answers only for :data:`REGISTRY_MODULE`: it asks the other finders for the
    real spec and wraps its loader's ``exec_module`` so that :func:`register` runs right after the module ran."""

    @classmethod
    def find_spec(cls, name: str, path: object = None, target: object = None) -> object:
        if name != REGISTRY_MODULE:
            return None
        uninstall()  # one shot; also keeps the search below from finding this finder again
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        exec_module = getattr(loader, "exec_module", None)
        if exec_module is None:
            return spec

        def exec_then_register(module: object) -> None:
            exec_module(module)
            register(module)

        try:
            loader.exec_module = exec_then_register  # this spec's own loader instance
        except Exception:  # noqa: BLE001 - a loader that refuses attributes: lm-eval imports as if no hook
            pass
        return spec


def install() -> None:
    """Append the finder to ``sys.meta_path`` (once), or register at once when lm-eval's registry is loaded."""
    if REGISTRY_MODULE in sys.modules:
        register(sys.modules[REGISTRY_MODULE])
    elif LmEvalRegistryFinder not in sys.meta_path:
        sys.meta_path.insert(0, LmEvalRegistryFinder)


def uninstall() -> None:
    """Remove the finder from ``sys.meta_path``."""
    while LmEvalRegistryFinder in sys.meta_path:
        sys.meta_path.remove(LmEvalRegistryFinder)

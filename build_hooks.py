"""setuptools commands that put lm-eval's startup hook beside the package in site-packages (pyproject.toml's
``[tool.setuptools.cmdclass]``), in the wheel and in editable installs (``pip install -e .``, scripts/setup.sh).

Two files land at the top of site-packages: ``_finetune_sdk_lm_eval_hook.py`` (a copy of
``finetune_sdk/evaluation/lm_eval_hook.py``, standard library only) and ``finetune_sdk_lm_eval.pth``, whose one line imports
it at interpreter start so that lm-eval's own ``lm_eval`` command accepts ``--model finetune-sdk`` (see that
module). Not shipped itself: only setuptools imports this file, at build time.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

HOOK_SOURCE = Path(__file__).parent / "finetune_sdk" / "evaluation" / "lm_eval_hook.py"
HOOK_MODULE = "_finetune_sdk_lm_eval_hook"
PTH_NAME = "finetune_sdk_lm_eval.pth"
#: A .pth line that starts with "import" is run by site.py at interpreter start (setuptools' editable finder is
#: installed the same way).
PTH_LINE = f"import {HOOK_MODULE}; {HOOK_MODULE}.install()\n"


def write_hook(folder: str | Path) -> list[str]:
    """Write the hook module and its .pth into ``folder`` (the top of the wheel); returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    module, pth = folder / f"{HOOK_MODULE}.py", folder / PTH_NAME
    shutil.copyfile(HOOK_SOURCE, module)
    pth.write_text(PTH_LINE)
    return [str(module), str(pth)]


class BuildPyWithHook(build_py):
    """``build_py`` that also writes the hook into the top of the build folder (the wheel's root)."""

    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            self._hook_files = write_hook(self.build_lib)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), *getattr(self, "_hook_files", [])]


class EditableWheelWithHook(editable_wheel):
    """``editable_wheel`` that puts the hook into the editable wheel's root, beside setuptools' own .pth."""

    def _install_namespaces(self, installation_dir: str, pth_prefix: str) -> None:
        super()._install_namespaces(installation_dir, pth_prefix)
        write_hook(installation_dir)

"""The steering part of the technique contract: an observer hook that answers ``STOP_TRAINING`` stops a run after
that step, the result is saved as usual and ``on_train_end`` still comes (``TechniqueContract`` inherits it, so
every technique, builtin or a plugin's, is checked).

    from finetune_sdk.testing import TechniqueContract

    class TestMine(TechniqueContract):   # runs test_an_observer_can_stop_training too
        name = "mine"
"""

from __future__ import annotations

from typing import Any

from finetune_sdk.plugin_manager import get_plugin_host


class SteeringContract:
    """Mixed into :class:`~finetune_sdk.testing.TechniqueContract`; needs its ``name``, ``model_dir``,
    ``formatter_name()`` and ``rows()``."""

    def test_an_observer_can_stop_training(self, model_dir: Any, tmp_path: Any) -> None:
        """An ``on_log`` observer that answers ``STOP_TRAINING`` at step 2 stops a 20-step run there; the result is
        saved as usual with 2 steps, ``on_train_end`` still comes, and the context names the hook that asked."""
        from finetune_sdk import Trainer
        from finetune_sdk.plugin_api import STOP_TRAINING, hookimpl

        class StopAtTwo:
            def __init__(self) -> None:
                self.seen: list[Any] = []

            @hookimpl
            def on_log(self, context: Any, logs: dict[str, Any]) -> str | None:
                return STOP_TRAINING if context.step >= 2 else None

            @hookimpl
            def on_train_end(self, context: Any, metrics: dict[str, Any]) -> None:
                self.seen.append((context.should_training_stop, context.stopped_by, metrics["train_steps"]))

        host, observer = get_plugin_host(), StopAtTwo()
        host.pm.register(observer, name="contract-stop-at-two")
        try:
            result = Trainer(model_dir, technique=self.name, formatter=self.formatter_name(),
                             output_dir=tmp_path / "out", max_steps=20, logging_steps=1, save_steps=0,
                             per_device_train_batch_size=2, progress=False, seed=0).fit(self.rows())
        finally:
            host.pm.unregister(observer)
        assert result.metrics["train_steps"] == 2 and (result.output_dir / "finetune_manifest.json").is_file()
        assert observer.seen == [(True, "on_log", 2)]


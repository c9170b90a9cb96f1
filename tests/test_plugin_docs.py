"""Every Python example in docs/plugins.md runs (a plugin author copies them as they are)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)


def test_the_page_has_examples():
    assert len(BLOCKS) >= 6


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"docs/plugins.md example {index + 1}", "exec"), {"__name__": f"doc_{index}"})


def test_every_base_class_attribute_is_documented():
    from finetune_sdk.plugin_api import Formatter, Quantizer, Technique, TrainingContext

    text = DOC.read_text(encoding="utf-8")
    for cls in (Technique, Quantizer, Formatter):
        public = [n for n, v in vars(cls).items() if not n.startswith("_")]
        for name in public + list(getattr(cls, "__annotations__", {})):
            assert f"`{name}" in text, f"{cls.__name__}.{name} is not in docs/plugins.md"
    for name in TrainingContext.__dataclass_fields__:
        assert f"`{name}" in text, f"TrainingContext.{name} is not in docs/plugins.md"

"""The contract every export format passes (``register_exporters``), the builtin ``gguf`` included:

    from finetune_sdk.testing import ExporterContract

    class TestMyFormat(ExporterContract):
        name = "my-format"
        settings = {"compression": "zstd"}   # what export(..., **settings) is given

It trains a tiny LoRA result once per class (CPU, offline, a few seconds), then checks that the format is
registered with a description, that its module imports nothing heavy at import time, that an unknown setting is
refused in one line, that an export writes a new folder and nothing beside it (the result folder unchanged), and
that a folder holding something the SDK did not write is refused and left as it was.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, ClassVar

import pytest

from finetune_sdk.testing.tiny import save_tiny_model


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class ExporterContract:
    """Tests every exporter passes. Set ``name``; ``settings`` are passed to every export."""

    name: ClassVar[str]
    settings: ClassVar[dict[str, Any]] = {}

    @pytest.fixture(scope="class")
    def trained_result(self, tmp_path_factory: pytest.TempPathFactory) -> Path:
        from finetune_sdk import Trainer

        root = tmp_path_factory.mktemp("exporter-contract")
        rows = [{"prompt": f"what is {w}?", "completion": f"{w} is a word."} for w in ("red", "cat", "blue", "dog")]
        result = Trainer(save_tiny_model(root / "model", "llama"), formatter="chatml", output_dir=root / "result",
                         progress=False, max_steps=1, save_steps=0, dtype="float32").fit(rows)
        return result.output_dir

    def exporter(self) -> Any:
        from finetune_sdk.plugin_manager import get_plugin_host

        return get_plugin_host().create("exporter", self.name)

    def test_registered_with_a_description(self) -> None:
        from finetune_sdk.exporting import exporter_names

        assert self.name in exporter_names()
        assert self.exporter().description.strip(), "give the exporter a one-line description"

    def test_module_imports_nothing_heavy(self) -> None:
        from finetune_sdk.testing.light import heavy_imports

        assert heavy_imports(type(self.exporter()).__module__) == []

    def test_unknown_setting_is_one_line(self, tmp_path: Path) -> None:
        from finetune_sdk import export
        from finetune_sdk.errors import ConfigError

        with pytest.raises(ConfigError) as caught:
            export(tmp_path / "no-result", tmp_path / "out", format=self.name, no_such_setting=1, **self.settings)
        assert "no_such_setting" in str(caught.value) and "\n" not in str(caught.value)
        assert not (tmp_path / "out").exists()

    def test_exports_a_new_folder_and_nothing_beside_it(self, trained_result: Path, tmp_path: Path) -> None:
        from finetune_sdk import export

        before = _tree_digest(trained_result)
        done = export(trained_result, tmp_path / "out", format=self.name, **self.settings)
        assert Path(done.directory) == tmp_path / "out" and any((tmp_path / "out").iterdir())
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no scratch left beside it
        assert _tree_digest(trained_result) == before  # the result is read, never changed

    def test_refuses_a_folder_it_did_not_write(self, trained_result: Path, tmp_path: Path) -> None:
        from finetune_sdk import export
        from finetune_sdk.errors import FinetuneError

        out = tmp_path / "out"
        out.mkdir()
        (out / "mine.txt").write_text("not the SDK's")
        with pytest.raises(FinetuneError) as caught:
            export(trained_result, out, format=self.name, **self.settings)
        assert "\n" not in str(caught.value)
        assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "not the SDK's"

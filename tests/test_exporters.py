"""Export formats are a plugin type: every registered exporter (the builtin ``gguf``) passes ExporterContract; a
plugin's format is used by ``finetune_sdk.export`` and listed by ``finetune export --format``."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from finetune_sdk.errors import ConfigError
from finetune_sdk.exporting import exporter_names
from finetune_sdk.testing import ExporterContract


class TestGGUF(ExporterContract):
    name = "gguf"
    settings = {"quantization": "f16"}


def test_every_registered_exporter_has_a_contract_here():
    assert exporter_names() == ["gguf"]  # a new builtin format gets its ExporterContract class above


def test_a_plugin_format_is_used_and_listed(install, tmp_path):
    from tests.test_plugins import FakeEntryPoint, plugin_module

    from finetune_sdk import export
    from finetune_sdk.plugin_api import Exporter

    class Listing(Exporter):
        name = "listing"
        description = "the result's file names"
        settings = ("header",)

        def export(self, ref, out, *, name=None, registry=None, **settings):
            from finetune_sdk.fsutil import staged_directory

            with staged_directory(out) as stage:
                (stage / "files.txt").write_text(settings["header"] + ",".join(sorted(p.name for p in
                                                                                      Path(ref).iterdir())))
            return type("Done", (), {"directory": Path(out)})()

    install(FakeEntryPoint("listing", lambda: plugin_module(
        "finetune_sdk_listing", register_exporters=lambda register: register(Listing))))
    assert exporter_names() == ["gguf", "listing"]
    result = tmp_path / "result"
    result.mkdir()
    (result / "adapter_model.safetensors").write_bytes(b"")
    done = export(result, tmp_path / "out", format="listing", header="files: ")
    assert (done.directory / "files.txt").read_text() == "files: adapter_model.safetensors"
    with pytest.raises(ConfigError, match="export format 'listing' takes no setting 'quantization'; its settings: "
                                          "header"):
        export(result, tmp_path / "out2", format="listing", quantization="q8_0")
    with pytest.raises(ConfigError, match="export format 'gguff' is not installed.*did you mean 'gguf'.*installed: "
                                          "gguf, listing"):
        export(result, tmp_path / "out3", format="gguff")

    from finetune_sdk.cli.export_command import installed_formats

    assert installed_formats() == ["gguf", "listing"]


def test_export_help_lists_the_installed_formats():
    from finetune_sdk.cli import cli

    done = CliRunner().invoke(cli, ["export", "--help"], terminal_width=200)
    assert done.exit_code == 0 and "--format [gguf" in done.output  # the Choice is built when the CLI is imported
    bad = CliRunner().invoke(cli, ["export", "x", "--out", "y", "--format", "onnx"])
    assert bad.exit_code == 2 and "'onnx' is not" in bad.output and "gguf" in bad.output

"""Reading never creates state (issue 22, kind 7): a read that fails (load, export, merge, eval, registry list,
show, verify...) leaves the registry home as it was: absent when it was absent, byte for byte otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_sdk.errors import FinetuneError
from finetune_sdk.registry import Registry
from tests.safety_helpers import invoke, snapshot


def tree(folder: Path) -> tuple[list[str], dict[str, bytes]]:
    """Every entry name under ``folder`` and every file's bytes."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")), snapshot(folder)


def failing_reads(home: Path, work: Path) -> list[list[object]]:
    data = work / "rows.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    return [
        ["export", "nosuchbot@production", "--out", work / "export"],
        ["merge", "nosuchbot@production", "--out", work / "merged"],
        ["eval", "nosuchbot@production", data],
        ["generate", "nosuchbot@2", "hi"],
        ["predict", "nosuchbot@production", "hi"],
        ["registry", "show", "nosuchbot@production"],
        ["registry", "versions", "nosuchbot"],
        ["registry", "verify", "nosuchbot@1"],
        ["registry", "diff", "nosuchbot@1", "nosuchbot@2"],
        ["registry", "alias", "nosuchbot@1", "production"],
        ["registry", "tag", "nosuchbot@1", "t"],
        ["registry", "rm", "nosuchbot@1"],
    ]


def test_failing_reads_create_no_registry_where_none_was(tmp_path, monkeypatch):
    home = tmp_path / "home" / "registry"
    monkeypatch.setenv("FINETUNE_SDK_REGISTRY", str(home))
    for args in failing_reads(home, tmp_path):
        result = invoke(args)
        assert result.exit_code == 2 and "no adapter named 'nosuchbot'" in result.output, (args, result.output)
        assert not (tmp_path / "home").exists(), args
    assert invoke(["registry", "list"]).exit_code == 0
    assert not (tmp_path / "home").exists()
    registry = Registry(home)
    assert registry.list() == [] and registry.collect_garbage() == 0
    for read in (lambda: registry.resolve("nosuchbot@production"), lambda: registry.path("nosuchbot@1"),
                 lambda: registry.show("nosuchbot"), lambda: registry.verify("nosuchbot@1"),
                 lambda: registry.versions("nosuchbot"), lambda: registry.artifacts("nosuchbot@1")):
        with pytest.raises(FinetuneError, match="no adapter named 'nosuchbot'"):
            read()
    import finetune_sdk

    for api in (lambda: finetune_sdk.load("nosuchbot@production"),
                lambda: finetune_sdk.merge("nosuchbot@production", tmp_path / "m2"),
                lambda: finetune_sdk.export("nosuchbot@production", tmp_path / "e2")):
        with pytest.raises(FinetuneError, match="no adapter named 'nosuchbot'"):
            api()
    assert not (tmp_path / "home").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]  # no --out folder either


def test_failing_reads_leave_an_existing_registry_byte_for_byte(tmp_path, monkeypatch):
    home = tmp_path / "registry"
    result = tmp_path / "result"
    result.mkdir()
    (result / "finetune_manifest.json").write_text(json.dumps(
        {"format_version": 1, "technique": "lora", "task": "causal-lm", "options": {}, "base_model": {}}))
    (result / "adapter_model.safetensors").write_bytes(b"weights" * 64)
    Registry(home).publish(result, "bot", aliases=["staging"])
    before = tree(home)
    monkeypatch.setenv("FINETUNE_SDK_REGISTRY", str(home))
    for args in failing_reads(home, tmp_path) + [["export", "bot@production", "--out", tmp_path / "e"],
                                                 ["registry", "show", "bot@7"]]:
        outcome = invoke(args)
        assert outcome.exit_code == 2, (args, outcome.output)
        assert tree(home) == before, args
    assert invoke(["registry", "list"]).exit_code == 0 and tree(home) == before

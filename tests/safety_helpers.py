"""Shared checks of the safety tests: exact outcomes, untouched files, nothing left behind."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from finetune_sdk.cli import cli


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes), to compare before and after."""
    folder = Path(folder)
    if folder.is_file():
        return {folder.name: folder.read_bytes()}
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def scratch_left(parent: Path) -> list[str]:
    """The SDK's work/staging/old folders (and probes) left in ``parent``."""
    return sorted(p.name for p in Path(parent).iterdir()
                  if p.name.startswith(".") and any(k in p.name for k in (".work-", ".staging-", ".old-", "probe")))


def invoke(args: list[str], **kwargs) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args], **kwargs)


def assert_refused(result, *fragments: str) -> str:
    """Exit code 2, no traceback, one ``Error:`` line holding every fragment; returns that line."""
    output = result.output
    assert result.exit_code == 2, (result.exit_code, output, result.exception)
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, output
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def forbid_model_loading(monkeypatch) -> None:
    """Make any model or tokenizer load fail the test: refusals must come before loading."""
    import finetune_sdk.models.sources as models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(models, "load_tokenizer", refuse)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path

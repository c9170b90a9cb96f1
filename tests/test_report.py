"""The before/after comparison report: JSON, self-contained HTML with an SVG loss chart, and the rich table."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from rich.console import Console

from finetune_sdk.evaluation.report import better, comparison_table, loss_chart_svg, lower_is_better, render_html, write_report

EVIL_PROMPT = "<script>alert(1)</script> [INST] what is 2+2? [/INST]"


def causal_report() -> dict:
    return {
        "task": "causal-lm",
        "technique": "qlora",
        "base_model": "tiny-llama <b>bold</b>",
        "output_dir": "runs/out & more",
        "created": "2024-05-01T12:00:00+00:00",
        "base": {"eval_loss": 2.3125, "perplexity": 10.0997},
        "tuned": {"eval_loss": 1.4375, "perplexity": 4.2104},
        "generations": [
            {"prompt": EVIL_PROMPT, "base": "5 [bold]maybe[/bold]", "tuned": "4"},
            {"prompt": "[INST] say hi [/INST]", "base": "bye", "tuned": "hi \"friend\" & 'co'"},
        ],
        "log_history": [
            {"step": 10, "loss": 2.41, "epoch": 0.25, "learning_rate": 1e-4},
            {"step": 20, "loss": 1.93, "epoch": 0.5},
            {"step": 20, "eval_loss": 1.88, "epoch": 0.5},
            {"step": 30, "loss": 1.62, "epoch": 0.75},
            {"step": 40, "loss": 1.41, "epoch": 1.0},
            {"step": 40, "eval_loss": 1.44, "epoch": 1.0},
            {"step": 40, "train_loss": 1.84, "train_runtime": 12.0, "epoch": 1.0},
        ],
    }


def classifier_report() -> dict:
    return {
        "task": "classification", "technique": "lora", "base_model": "tiny-bert", "output_dir": "out",
        "created": "2024-05-01T12:00:00+00:00",
        "base": {"eval_loss": 0.69, "accuracy": 0.5, "macro_f1": 0.33},
        "tuned": {"eval_loss": 0.21, "accuracy": 0.92, "macro_f1": 0.91},
        "per_task": {"sentiment": {"base": {"accuracy": 0.5}, "tuned": {"accuracy": 0.95}},
                     "topic": {"base": {"accuracy": 0.6}, "tuned": {"accuracy": 0.55}}},
    }


def rendered(report: dict) -> str:
    console = Console(record=True, width=120)
    console.print(comparison_table(report))
    return console.export_text()


# --------------------------------------------------------------------------------------------------- better()


@pytest.mark.parametrize("metric,base,tuned,expected", [
    ("eval_loss", 2.0, 1.5, True), ("eval_loss", 1.5, 2.0, False), ("loss", 1.0, 1.0, False),
    ("perplexity", 10.0, 4.0, True), ("perplexity", 4.0, 10.0, False),
    ("accuracy", 0.5, 0.9, True), ("accuracy", 0.9, 0.5, False), ("macro_f1", 0.3, 0.8, True),
    ("macro_f1", 0.8, 0.3, False), ("accuracy", 0.7, 0.7, False),
    ("accuracy", None, 0.9, False), ("eval_loss", float("nan"), 1.0, False), ("accuracy", 0.5, "0.9", False),
    ("eval_runtime", 2.0, 1.0, False), ("eval_samples_per_second", 1.0, 2.0, False),
])
def test_better_directions(metric, base, tuned, expected):
    assert better(metric, base, tuned) is expected


def test_lower_is_better():
    assert lower_is_better("eval_loss") and lower_is_better("perplexity") and lower_is_better("Eval_Loss")
    assert not lower_is_better("accuracy") and not lower_is_better("macro_f1")


# --------------------------------------------------------------------------------------------------- files


def test_write_report_returns_both_paths_and_json_round_trips(tmp_path):
    report = causal_report()
    paths = write_report(tmp_path / "run", report)
    assert set(paths) == {"json", "html"}
    assert paths["json"] == tmp_path / "run" / "comparison.json" and paths["json"].is_file()
    assert paths["html"] == tmp_path / "run" / "comparison.html" and paths["html"].is_file()
    assert json.loads(paths["json"].read_text(encoding="utf-8")) == report
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["comparison.html", "comparison.json"]  # no temps


def test_html_is_self_contained_and_escaped(tmp_path):
    page = write_report(tmp_path, causal_report())["html"].read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    # every user string escaped, nothing of it interpreted
    assert "&lt;script&gt;alert(1)&lt;/script&gt; [INST] what is 2+2? [/INST]" in page
    assert "<script" not in page.lower()
    assert "<b>" not in page and "tiny-llama &lt;b&gt;bold&lt;/b&gt;" in page
    assert "runs/out &amp; more" in page
    assert "hi &quot;friend&quot; &amp; &#x27;co&#x27;" in page
    # nothing fetched from elsewhere: no external src/href, stylesheets, imports or fonts
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.IGNORECASE)
    assert "http://" not in page and "https://" not in page
    for needle in ("<link", "@import", "url(", "<iframe", "<img", "<object"):
        assert needle not in page.lower(), needle


def test_html_has_run_info_metrics_chart_and_generations():
    page = render_html(causal_report())
    for text in ("qlora", "causal-lm", "2024-05-01T12:00:00+00:00", "eval_loss", "perplexity",
                 "2.3125", "1.4375", "10.0997", "4.2104", "-0.8750", "✓", "[INST] say hi [/INST]"):
        assert text in page, text
    svg = re.search(r"<svg.*?</svg>", page, re.DOTALL)
    assert svg, "no inline SVG chart"
    chart = svg.group(0)
    assert "<polyline" in chart or "<path" in chart
    train = re.search(r'<polyline class="loss" points="([^"]+)"', chart)
    evals = re.search(r'<polyline class="eval_loss" points="([^"]+)"', chart)
    assert train and len(train.group(1).split()) == 4  # the train_loss summary line is not a point
    assert evals and len(evals.group(1).split()) == 2
    assert "Generations" in page and page.count("<tr><td><pre>") == 2


def test_loss_curve_goes_down_on_screen_as_loss_goes_down():
    svg = loss_chart_svg([{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 1.0}])
    points = re.search(r'<polyline class="loss" points="([^"]+)"', svg).group(1).split()
    xs = [float(p.split(",")[0]) for p in points]
    ys = [float(p.split(",")[1]) for p in points]
    assert xs == sorted(xs) and ys == sorted(ys)  # SVG y grows downwards: lower loss sits lower
    assert loss_chart_svg([]) == "" and loss_chart_svg(None) == ""
    single = loss_chart_svg([{"step": 5, "eval_loss": 1.0}])  # one point, flat range: no division by zero
    assert "<circle" in single and "nan" not in single.lower()


def test_classifier_and_per_task_sections(tmp_path):
    report = classifier_report()
    page = write_report(tmp_path, report)["html"].read_text(encoding="utf-8")
    for text in ("accuracy", "macro_f1", "Task: sentiment", "Task: topic", "✗"):
        assert text in page, text
    assert "No training log was recorded." in page and "<svg" not in page
    assert "Generations" not in page
    text = rendered(report)
    assert "task: sentiment" in text and "task: topic" in text and "macro_f1" in text


def test_missing_optional_sections(tmp_path):
    report = {"task": "causal-lm", "technique": "lora", "base_model": "m", "output_dir": "o",
              "base": {"eval_loss": 2.0}, "tuned": {}}
    paths = write_report(tmp_path, report)
    data = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert data["created"]  # filled in when missing
    assert {key: data[key] for key in report} == report
    page = paths["html"].read_text(encoding="utf-8")
    assert "eval_loss" in page and "—" in page and "<svg" not in page
    text = rendered(report)
    assert "eval_loss" in text and "generations" not in text
    # even a bare dict renders
    assert "No metrics were recorded." in render_html({})
    assert rendered({})


# --------------------------------------------------------------------------------------------------- rich


def test_rich_table_shows_brackets_literally():
    text = rendered(causal_report())
    assert "[INST] say hi [/INST]" in text
    assert "<script>alert(1)</script>" in text and "[INST]" in text
    assert "5 [bold]maybe[/bold]" in text  # markup in answers stays literal
    for name in ("eval_loss", "perplexity", "2.3125", "1.4375", "-0.8750", "✓"):
        assert name in text, name
    assert "base" in text and "fine-tuned" in text and "change" in text


def test_import_is_light():
    code = ("import sys, finetune_sdk.evaluation.report; "
            "print(sorted(m for m in ('torch', 'transformers', 'finetune_sdk.cli') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

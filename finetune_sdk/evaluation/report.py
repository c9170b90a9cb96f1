"""The before/after comparison report: base model against fine-tuned model, as a rich table, JSON and HTML.

The report is a plain dict (JSON-ready)::

    {
        "task": "causal-lm",                      # or "classification"
        "technique": "qlora",
        "base_model": "meta-llama/Llama-2-7b-hf",
        "output_dir": "runs/llama-qlora",
        "created": "2024-05-01T12:00:00+00:00",   # ISO time; write_report fills it in when missing
        "base": {"eval_loss": 2.31, "perplexity": 10.07},
        "tuned": {"eval_loss": 1.42, "perplexity": 4.14},
        # optional: side-by-side answers to the same prompts
        "generations": [{"prompt": "[INST] Hi [/INST]", "base": "...", "tuned": "..."}],
        # optional: transformers Trainer log history (training loss per logging step, eval loss per evaluation)
        "log_history": [{"step": 10, "loss": 2.1, "epoch": 0.5}, {"step": 20, "eval_loss": 1.6}],
        # optional: one metrics pair per task of a multi-task run
        "per_task": {"summarize": {"base": {...}, "tuned": {...}}},
    }

Generative models report ``eval_loss`` and ``perplexity``; classifiers ``eval_loss``, ``accuracy`` and ``macro_f1``.
The change column is ``tuned - base`` with a ✓ where the fine-tuned model is better (:func:`better`: lower is better
for losses and perplexity, higher for everything else).

Example:
    >>> from rich.console import Console
    >>> report = {"task": "causal-lm", "technique": "lora", "base_model": "tiny", "output_dir": "out",
    ...           "base": {"eval_loss": 2.0}, "tuned": {"eval_loss": 1.5}}
    >>> Console(width=80).print(comparison_table(report))  # doctest: +SKIP
    >>> paths = write_report("out", report)  # doctest: +SKIP
    >>> sorted(paths)  # doctest: +SKIP
    ['html', 'json']

Only the standard library and rich are imported: building a report never loads torch or transformers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any

from rich.table import Table

from finetune_sdk.fsutil import write_json_atomic, write_text_atomic
from finetune_sdk.models.sources import display_name
from finetune_sdk.training.output_paths import check_report_dir
from finetune_sdk.models.pairwise import is_tie
from finetune_sdk.feedback.screen_text import literal_text

JSON_NAME = "comparison.json"
HTML_NAME = "comparison.html"
#: A metric whose name contains one of these is better when it goes down; every other metric when it goes up.
LOWER_IS_BETTER = ("loss", "perplexity", "ppl", "error")
#: Bookkeeping numbers (timings, throughput, epoch) and tie counts, shown in the table but never judged either way.
NO_DIRECTION = ("runtime", "per_second", "epoch", "ties")
CAPTION = "✓ better: lower loss/perplexity, higher accuracy/F1"
TRAIN_COLOR = "#2563eb"
EVAL_COLOR = "#ea580c"
__all__ = ["better", "comparison_table", "generations_table", "loss_chart_svg", "lower_is_better",
           "metric_comparison_table", "render_html", "write_report"]


# --------------------------------------------------------------------------------------------------- metrics


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of ``metric`` is the better one.

    Example:
        >>> lower_is_better("eval_loss"), lower_is_better("perplexity"), lower_is_better("macro_f1")
        (True, True, False)
    """
    name = metric.lower()
    return any(word in name for word in LOWER_IS_BETTER)


def better(metric: str, base: Any, tuned: Any) -> bool:
    """Whether ``tuned`` is better than ``base`` for ``metric`` by more than float tolerance (:func:`is_tie`); False
    for ties, missing or NaN values and bookkeeping numbers (:data:`NO_DIRECTION`: runtimes, throughput, epoch).

    Example:
        >>> better("eval_loss", 2.0, 1.5), better("accuracy", 0.8, 0.7), better("accuracy", 0.8, 0.8)
        (True, False, False)
    """
    if not (_is_number(base) and _is_number(tuned)) or any(word in metric.lower() for word in NO_DIRECTION):
        return False
    return not is_tie(tuned - base, base, tuned) and (tuned < base if lower_is_better(metric) else tuned > base)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _fmt(value: Any) -> str:
    """Like ``finetune_sdk.cli.render.fmt`` (kept here so the library never imports the CLI); None shows as —."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:,.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _change(metric: str, base: Any, tuned: Any) -> tuple[str, bool | None]:
    """``("-0.5000 (-25.0%) ✓", True)``: the change text and whether it is an improvement (None: no comparison)."""
    if not (_is_number(base) and _is_number(tuned)):
        return "—", None
    delta = tuned - base
    if not math.isfinite(delta):
        return str(delta), None
    text = f"{delta:+,.4f}" if abs(delta) < 1000 else f"{delta:+,.0f}"
    if base and math.isfinite(base):
        text += f" ({delta / abs(base):+.1%})"
    if is_tie(delta, base, tuned) or any(word in metric.lower() for word in NO_DIRECTION):
        return text, None
    improved = better(metric, base, tuned)
    return f"{text} {'✓' if improved else '✗'}", improved


def _metric_rows(base: Mapping[str, Any] | None, tuned: Mapping[str, Any] | None
                 ) -> list[tuple[str, Any, Any, str, bool | None]]:
    """One ``(metric, base, tuned, change, improved)`` row per metric of either side, base's order first."""
    base, tuned = dict(base or {}), dict(tuned or {})
    names = list(base) + [name for name in tuned if name not in base]
    rows = []
    for name in names:
        change, improved = _change(name, base.get(name), tuned.get(name))
        rows.append((name, base.get(name), tuned.get(name), change, improved))
    return rows


def _short_title(report: Mapping[str, Any]) -> str:
    """``qlora · SmolLM2-135M-Instruct.Q4_1.gguf``: the technique and the base model, a path by its last part."""
    base_model = report.get("base_model")
    parts = (report.get("technique"), display_name(str(base_model)) if base_model else None)
    return " · ".join(str(part) for part in parts if part)


def _generations(report: Mapping[str, Any]) -> list[dict[str, str]]:
    rows = report.get("generations") or []
    return [{key: "" if row.get(key) is None else str(row.get(key)) for key in ("prompt", "base", "tuned")}
            for row in rows if isinstance(row, Mapping)]


# --------------------------------------------------------------------------------------------------- rich


def _text(value: Any, style: str = "") -> Any:
    """A cell shown literally: no rich markup (prompts hold brackets like ``[INST]``), controls escaped."""
    return literal_text(_fmt(value), style=style)


def metric_comparison_table(base: Mapping[str, Any] | None, tuned: Mapping[str, Any] | None,
                            title: str = "base vs fine-tuned", caption: str | None = CAPTION) -> Table:
    """Metrics side by side: metric, base, fine-tuned, change (✓ where the fine-tuned model is better).

    Example:
        >>> table = metric_comparison_table({"eval_loss": 2.0}, {"eval_loss": 1.5})
        >>> [column.header for column in table.columns]
        ['metric', 'base', 'fine-tuned', 'change']
    """
    table = Table(title=title, caption=caption, min_width=min(len(title) + 4, 80))  # the title on one line
    table.add_column("metric", no_wrap=True)
    table.add_column("base", justify="right")
    table.add_column("fine-tuned", justify="right")
    table.add_column("change", justify="right")
    for name, base_value, tuned_value, change, improved in _metric_rows(base, tuned):
        style = "" if improved is None else "green" if improved else "red"
        table.add_row(_text(name), _text(base_value), _text(tuned_value), _text(change, style))
    return table


def generations_table(generations: Sequence[Mapping[str, Any]], title: str = "generations") -> Table:
    """Prompt, base answer and fine-tuned answer, one row per prompt, all shown literally (controls escaped).

    Example:
        >>> generations_table([{"prompt": "[INST] 2+2? [/INST]", "base": "5", "tuned": "4"}]).row_count
        1
    """
    table = Table(title=title, show_lines=True, expand=True)
    table.add_column("prompt", overflow="fold", ratio=1)
    table.add_column("base", overflow="fold", ratio=1)
    table.add_column("fine-tuned", overflow="fold", ratio=1)
    for row in _generations({"generations": generations}):
        table.add_row(literal_text(row["prompt"]), literal_text(row["base"]), literal_text(row["tuned"]))
    return table


def comparison_table(report: Mapping[str, Any]) -> Table:
    """The whole comparison for a terminal: metrics, then per-task metrics and generations when the report has them.

    Returns a grid (a :class:`rich.table.Table`) holding one table per section; print it with a rich Console.

    Example:
        >>> from rich.console import Console
        >>> report = {"base": {"accuracy": 0.5}, "tuned": {"accuracy": 0.9},
        ...           "generations": [{"prompt": "[INST] hi [/INST]", "base": "?", "tuned": "hello"}]}
        >>> console = Console(record=True, width=100)
        >>> console.print(comparison_table(report))  # doctest: +SKIP
        >>> "[INST] hi [/INST]" in console.export_text()  # doctest: +SKIP
        True
    """
    title = _short_title(report)
    sections: list[Any] = [metric_comparison_table(report.get("base"), report.get("tuned"),
                                                   title=f"base vs fine-tuned: {title}" if title else
                                                   "base vs fine-tuned")]
    for task, pair in (report.get("per_task") or {}).items():
        pair = pair if isinstance(pair, Mapping) else {}
        sections.append(metric_comparison_table(pair.get("base"), pair.get("tuned"), title=f"task: {task}",
                                                caption=None))
    generations = _generations(report)
    if generations:
        sections.append(generations_table(generations))
    grid = Table.grid(padding=(0, 0, 1, 0), expand=True)
    grid.add_column()
    for section in sections:
        grid.add_row(section)
    return grid


# --------------------------------------------------------------------------------------------------- chart


def _loss_points(log_history: Iterable[Any], key: str) -> list[tuple[float, float]]:
    """``(step, value)`` for every log entry holding a finite ``key`` and a step, sorted by step."""
    points = []
    for entry in log_history or []:
        if not isinstance(entry, Mapping):
            continue
        step, value = entry.get("step"), entry.get(key)
        if _is_number(step) and _is_number(value) and math.isfinite(step) and math.isfinite(value):
            points.append((float(step), float(value)))
    return sorted(points, key=lambda point: point[0])


def _nice_ticks(low: float, high: float, count: int = 5, integer: bool = False) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 × 10ⁿ apart) covering ``[low, high]``.

    Example:
        >>> _nice_ticks(0.13, 2.9)
        [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    """
    if high <= low:
        pad = abs(low) * 0.1 or 1.0
        low, high = low - pad, high + pad
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = min((m * magnitude for m in (1, 2, 2.5, 5, 10)), key=lambda s: abs((high - low) / s - count))
    if integer:
        step = max(1.0, round(step))
    start, end = math.floor(low / step), math.ceil(high / step)
    return [round(i * step, 10) for i in range(start, end + 1)]


def _tick_label(value: float) -> str:
    return f"{value:,.0f}" if value == int(value) else f"{value:g}"


def loss_chart_svg(log_history: Sequence[Mapping[str, Any]] | None, width: int = 960, height: int = 360) -> str:
    """An inline SVG line chart of training loss per logged step and eval loss per evaluation; "" without points.

    Example:
        >>> svg = loss_chart_svg([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}, {"step": 2, "eval_loss": 1.2}])
        >>> svg.startswith("<svg") and "<polyline" in svg
        True
    """
    train, evals = _loss_points(log_history or [], "loss"), _loss_points(log_history or [], "eval_loss")
    if not train and not evals:
        return ""
    left, right, top, bottom = 64, 20, 16, 48
    xs = [x for x, _ in train + evals]
    ys = [y for _, y in train + evals]
    x_ticks = _nice_ticks(min(xs), max(xs), count=8, integer=True)
    y_ticks = _nice_ticks(min(ys), max(ys), count=5)
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    plot_w, plot_h = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def sy(y: float) -> float:
        return top + (y1 - y) / (y1 - y0) * plot_h

    parts = [f'<svg class="chart" role="img" aria-label="training and eval loss per step" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}" font-family="inherit" font-size="12">',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fff" stroke="#d1d5db"/>']
    for y in y_ticks:
        parts.append(f'<line x1="{left}" y1="{sy(y):.1f}" x2="{left + plot_w}" y2="{sy(y):.1f}" stroke="#e5e7eb"/>'
                     f'<text x="{left - 8}" y="{sy(y) + 4:.1f}" text-anchor="end" fill="#4b5563">'
                     f'{escape(_tick_label(y))}</text>')
    for x in x_ticks:
        parts.append(f'<line x1="{sx(x):.1f}" y1="{top + plot_h}" x2="{sx(x):.1f}" y2="{top + plot_h + 5}" '
                     f'stroke="#9ca3af"/><text x="{sx(x):.1f}" y="{top + plot_h + 19}" text-anchor="middle" '
                     f'fill="#4b5563">{escape(_tick_label(x))}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 6}" text-anchor="middle" fill="#111827">step</text>'
                 f'<text x="14" y="{top + plot_h / 2:.1f}" text-anchor="middle" fill="#111827" '
                 f'transform="rotate(-90 14 {top + plot_h / 2:.1f})">loss</text>')
    for name, points, color, dashed in (("loss", train, TRAIN_COLOR, False), ("eval_loss", evals, EVAL_COLOR, True)):
        if not points:
            continue
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
        dash = ' stroke-dasharray="6 4"' if dashed else ""
        parts.append(f'<polyline class="{name}" points="{coords}" fill="none" stroke="{color}" stroke-width="2"'
                     f'{dash} stroke-linejoin="round"/>')
        if dashed or len(points) <= 60:  # markers: every evaluation, and training steps while they stay readable
            radius = 3.5 if dashed else 2.5
            for x, y in points:
                parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{radius}" fill="{color}">'
                             f'<title>step {escape(_tick_label(x))}: {name} {y:.4f}</title></circle>')
    parts.append("</svg>")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: #111827;
       background: #f9fafb; margin: 0; padding: 24px; line-height: 1.45; }
main { max-width: 1100px; margin: 0 auto; }
h1 { font-size: 1.6em; margin: 0 0 16px; }
h2 { font-size: 1.2em; margin: 28px 0 10px; border-bottom: 1px solid #e5e7eb; padding-bottom: 4px; }
h3 { font-size: 1em; margin: 18px 0 8px; }
section { background: #fff; border: 1px solid #e5e7eb; border-radius: 8px; padding: 4px 20px 18px; margin: 16px 0; }
table { border-collapse: collapse; width: 100%; font-size: 0.95em; }
th, td { border-bottom: 1px solid #e5e7eb; padding: 6px 10px; text-align: left; vertical-align: top; }
th { background: #f3f4f6; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.info th { width: 160px; background: none; color: #4b5563; font-weight: 500; }
.better { color: #15803d; font-weight: 600; }
.worse { color: #b91c1c; }
.note { color: #6b7280; font-size: 0.85em; margin-top: 6px; }
.legend span { display: inline-block; margin-right: 18px; font-size: 0.9em; }
.swatch { display: inline-block; width: 18px; height: 3px; vertical-align: middle; margin-right: 6px; }
.chart { width: 100%; max-width: 1000px; height: auto; display: block; }
table.metrics { width: auto; min-width: 520px; }
pre { white-space: pre-wrap; word-break: break-word; margin: 0; font-family: ui-monospace, Menlo, Consolas, monospace;
      font-size: 0.9em; }
table.generations td { width: 33%; }
"""


def _e(value: Any) -> str:
    return escape(_fmt(value), quote=True)


def _metrics_html(base: Mapping[str, Any] | None, tuned: Mapping[str, Any] | None) -> str:
    rows = _metric_rows(base, tuned)
    if not rows:
        return '<p class="note">No metrics were recorded.</p>'
    lines = ['<table class="metrics"><thead><tr><th>metric</th><th class="num">base</th>'
             '<th class="num">fine-tuned</th><th class="num">change</th></tr></thead><tbody>']
    for name, base_value, tuned_value, change, improved in rows:
        css = "num" if improved is None else "num better" if improved else "num worse"
        hint = "lower is better" if lower_is_better(name) else "higher is better"
        lines.append(f'<tr><td title="{hint}">{_e(name)}</td><td class="num">{_e(base_value)}</td>'
                     f'<td class="num">{_e(tuned_value)}</td><td class="{css}">{_e(change)}</td></tr>')
    lines.append("</tbody></table>")
    return "\n".join(lines)


def render_html(report: Mapping[str, Any]) -> str:
    """The report as one self-contained HTML page: inline CSS and SVG, no scripts, every user string escaped.

    Example:
        >>> page = render_html({"base": {"eval_loss": 2.0}, "tuned": {"eval_loss": 1.5},
        ...                     "generations": [{"prompt": "<b>[INST]</b>", "base": "", "tuned": ""}]})
        >>> "&lt;b&gt;[INST]&lt;/b&gt;" in page and "<b>" not in page
        True
    """
    technique, base_model = report.get("technique"), report.get("base_model")
    short_base = display_name(str(base_model)) if base_model else base_model  # the full path is in the run table
    heading = "Fine-tuning report" + (f": {technique} on {short_base}" if technique and short_base else
                                      f": {short_base or technique}" if short_base or technique else "")
    info = [("task", report.get("task")), ("technique", technique), ("base model", base_model),
            ("output dir", report.get("output_dir")), ("date", report.get("created"))]
    if report.get("eval_data"):
        info.append(("eval data", report["eval_data"]))
    body = [f"<h1>{escape(heading)}</h1>", "<section><h2>Run</h2>", '<table class="info"><tbody>']
    body += [f"<tr><th>{escape(label)}</th><td>{_e(value)}</td></tr>" for label, value in info]
    body += ["</tbody></table></section>", "<section><h2>Metrics</h2>",
             _metrics_html(report.get("base"), report.get("tuned")),
             '<p class="note">change = fine-tuned − base; ✓ where the fine-tuned model is better '
             "(lower loss and perplexity, higher accuracy and F1).</p>"]
    for task, pair in (report.get("per_task") or {}).items():
        pair = pair if isinstance(pair, Mapping) else {}
        body += [f"<h3>Task: {_e(task)}</h3>", _metrics_html(pair.get("base"), pair.get("tuned"))]
    body.append("</section>")

    svg = loss_chart_svg(report.get("log_history"))
    body.append("<section><h2>Loss curve</h2>")
    if svg:
        body += ['<p class="legend">'
                 f'<span><i class="swatch" style="background:{TRAIN_COLOR}"></i>training loss</span>'
                 f'<span><i class="swatch" style="border-top:3px dashed {EVAL_COLOR}; height:0"></i>'
                 "eval loss (per evaluation)</span></p>",
                 svg]
    else:
        body.append('<p class="note">No training log was recorded.</p>')
    body.append("</section>")

    generations = _generations(report)
    if generations:
        body += ["<section><h2>Generations</h2>", '<table class="generations"><thead><tr><th>prompt</th>'
                 "<th>base</th><th>fine-tuned</th></tr></thead><tbody>"]
        body += [f"<tr><td><pre>{escape(row['prompt'])}</pre></td><td><pre>{escape(row['base'])}</pre></td>"
                 f"<td><pre>{escape(row['tuned'])}</pre></td></tr>" for row in generations]
        body.append("</tbody></table></section>")

    return "\n".join(['<!DOCTYPE html>', '<html lang="en">', "<head>", '<meta charset="utf-8">',
                      '<meta name="viewport" content="width=device-width, initial-scale=1">',
                      f"<title>{escape(heading)}</title>", f"<style>{_CSS}</style>", "</head>", "<body><main>",
                      *body, '<p class="note">Generated by finetune-sdk.</p>', "</main></body>", "</html>", ""])


def write_report(directory: str | os.PathLike[str], report: Mapping[str, Any]) -> dict[str, Path]:
    """Write ``comparison.json`` and ``comparison.html`` into ``directory``, each atomically; return their paths.

    A missing ``created`` is set to the current UTC time; a bad folder is a ConfigError (see ``check_report_dir``).

    Example:
        >>> paths = write_report("runs/llama-qlora", report)  # doctest: +SKIP
        >>> paths["html"].name  # doctest: +SKIP
        'comparison.html'
    """
    directory = check_report_dir(directory)  # a file there, or a comparison.* the SDK did not write: refused
    data = {**report, "created": report.get("created") or datetime.now(timezone.utc).isoformat(timespec="seconds")}
    paths = {"json": directory / JSON_NAME, "html": directory / HTML_NAME}
    write_json_atomic(paths["json"], data)  # a full disk: one line (fsutil.atomic_path)
    write_text_atomic(paths["html"], render_html(data))
    return paths

"""The studio's pages, rendered on the server as HTML (every value escaped); ``static/studio.js`` adds the live
parts (charts from the event stream, the form's checks, the preview, the registry graph). No template engine and no
Node build: four small functions of plain HTML.

Example:
    >>> "&lt;b&gt;" in layout("runs", "<b>", "", token="t")
    True
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any

NAV = (("runs", "/", "Runs"), ("new", "/new", "New run"), ("registry", "/registry", "Registry"), ("chat", "/chat", "Chat"),
       ("session", "/session", "Rate prompts"), ("export", "/export", "Export & compare"),
       ("federated", "/federated", "Federated"), ("scores", "/scores", "Scores"))


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def layout(page: str, title: str, body: str, *, token: str = "") -> str:
    """A whole page: header with navigation, ``body`` (already escaped HTML), the script. The token is in a
    ``<meta>`` the script reads for its ``X-Studio-Token`` header (another site's page can't read it)."""
    links = "".join(f'<a href="{href}" class="{"on" if key == page else ""}">{label}</a>' for key, href, label in NAV)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)} · finetune studio'
            f'</title><meta name="studio-token" content="{esc(token)}"><meta name="viewport" '
            f'content="width=device-width"><link rel="stylesheet" href="/static/studio.css"></head>'
            f'<body data-page="{esc(page)}"><header><strong>finetune studio</strong><nav>{links}</nav></header>'
            f'<main>{body}</main><script src="/static/studio.js"></script><script src="/static/loop.js"></script>'
            '</body></html>')


def _bytes(n: Any) -> str:
    from finetune_sdk.advice.machine import format_bytes

    return format_bytes(n) if isinstance(n, (int, float)) else "—"


def _when(t: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if isinstance(t, (int, float)) else "—"


def runs_page(runs: list[dict[str, Any]], folder: Path, token: str = "") -> str:
    rows = "".join(
        f'<tr data-run="{esc(r["name"])}"><td><input type="checkbox" class="overlay" value="{esc(r["name"])}" '
        f'checked></td><td><a href="/runs/{esc(r["name"])}">{esc(r["name"])}</a></td>'
        f'<td class="status {esc(r["status"])}">{esc(r["status"])}</td><td>{esc(r["step"])}/{esc(r["max_steps"])}'
        f'</td><td>{esc(r["model"])}</td><td>{esc(r["technique"])}</td><td>{esc(r["device"])}</td>'
        f'<td>{_when(r["started"])}</td></tr>' for r in runs)
    table = (f'<table class="runs"><thead><tr><th>overlay</th><th>run</th><th>status</th><th>step</th><th>model</th>'
             f'<th>technique</th><th>device</th><th>started</th></tr></thead><tbody>{rows}</tbody></table>'
             if runs else '<p class="empty">No runs yet: <a href="/new">start one</a>, or train with '
             f'<code>finetune train ... --output-dir {esc(folder)}/NAME</code>.</p>')
    body = (f'<h1>Runs in {esc(folder)}</h1>{table}<h2>Charts (checked runs overlaid)</h2>'
            f'<div id="charts" data-runs="{esc(",".join(r["name"] for r in runs[-8:]))}"></div>')
    return layout("runs", "Runs", body, token=token)


def run_page(run: dict[str, Any], token: str = "") -> str:
    facts = [("status", f'<span id="status" class="status {esc(run["status"])}">{esc(run["status"])}</span>'),
             ("step", f'<span id="step">{esc(run["step"])}</span> / {esc(run["max_steps"])}'),
             ("model", esc(run["model"])), ("technique", esc(run["technique"])),
             ("objective", esc(run["objective"])), ("device", f'<span id="device">{esc(run["device"])}</span>'),
             ("precision", esc(run["precision"])),
             ("memory estimate (before)", f'<span id="estimate">{_bytes(run["estimated_memory"])}</span>'),
             ("peak memory (after)", f'<span id="peak">{_bytes(run["peak_memory"])}</span>'),
             ("started", _when(run["started"]))]
    if run.get("error"):
        facts.append(("error", f'<span class="error">{esc(run["error"])}</span>'))
    rows = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts)
    buttons = (f'<button id="stop" {"" if run["can_stop"] else "disabled"}>Stop (checkpoint, resumable)</button> '
               f'<button id="resume" {"" if run["can_resume"] else "disabled"}>Resume</button>'
               '<span id="action-message"></span>')
    body = (f'<h1>Run {esc(run["name"])}</h1><table class="facts">{rows}</table><p>{buttons}</p>'
            f'<h2>Charts (whole history)</h2><div id="charts" data-runs="{esc(run["name"])}"></div>')
    return layout("run", f"Run {run['name']}", body, token=token)


def new_run_page(root: Path, token: str = "") -> str:
    body = (f'<h1>Start a run</h1><p>Files are picked under <code>{esc(root)}</code>. The options are those of '
            '<code>finetune train --help</code>; each value is checked as the CLI checks it.</p>'
            '<form id="run-form" autocomplete="off"><div id="form-fields"></div>'
            '<p><button type="button" id="preview-button">Preview data</button> '
            '<button type="button" id="advise-button">Advise</button> '
            '<button type="submit" id="start-button">Start run</button> <span id="form-message"></span></p></form>'
            '<section id="advice"></section><section id="preview"></section>')
    return layout("new", "New run", body, token=token)


def registry_page(home: Path, token: str = "") -> str:
    body = (f'<h1>Registry</h1><p>Home: <code>{esc(home)}</code></p><h2>Lineage</h2><div id="lineage"></div>'
            '<h2>Adapters</h2><div id="adapters"></div>')
    return layout("registry", "Registry", body, token=token)


LOOP_PAGES = {
    "chat": ("Chat", '<h1>Chat: base and fine-tuned side by side</h1><div id="chat-setup"></div>'
             '<form id="chat-form" autocomplete="off"><textarea id="prompt" rows="3" placeholder="Ask something"></textarea>'
             '<p><button type="submit" id="send">Send to all</button> <span id="chat-message"></span></p></form>'
             '<p id="sampling-shown"></p><div id="answers" class="answers"></div><div id="pair"></div>'
             '<h2>Retrain from the ratings</h2><div id="retrain"></div>'),
    "session": ("Rate prompts", '<h1>Rate the answers to a prompts file</h1><p>As <code>finetune feedback</code>: each '
                'prompt without a row in the ratings file is answered, you rate it, the row is appended at once.</p>'
                '<div id="session-setup"></div><div id="session-item"></div>'),
    "export": ("Export & compare", '<h1>Export to GGUF</h1><div id="export-form"></div><div id="export-result"></div>'
               '<h1>Compare with the base</h1><div id="compare-form"></div><div id="compare-result"></div>'),
    "federated": ("Federated", '<h1>Federated rounds</h1><div id="federated"></div>'),
    "scores": ("Scores", '<h1>Benchmark scoreboard</h1><p>From <code>finetune bench</code>: every version and the base, '
               'with standard errors; <em>significant</em>: the difference to the base exceeds twice the combined '
               'standard error.</p><div id="scoreboard"></div>'),
}


def loop_page(key: str, token: str = "") -> str:
    """One of the feedback loop's pages (:data:`LOOP_PAGES`): a fixed frame that ``static/loop.js`` fills."""
    title, body = LOOP_PAGES[key]
    return layout(key, title, body, token=token)

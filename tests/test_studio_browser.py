"""The studio in a real headless browser (Debian's chromium driven by playwright's Python client).

One walk through the pages, as a user would: open the printed URL, check a bad option value, preview the data, start
a run from the form, watch its loss chart gain points, close the page and the server while it trains, reopen: the
run finished and its whole history is drawn beside a run started from the CLI. A request without the token and a
path outside the folder are refused. Screenshots of each page go to docs/studio/*.png (docs/studio.md shows them).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = Path(__file__).parents[1] / "docs" / "studio"
ROWS = [{"prompt": f"what is {a} plus {b}?", "completion": f"{a} plus {b} is {a + b}."}
        for a in range(8) for b in range(8)]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="no chromium (scripts/setup.sh installs it)")]


def start_studio(root: Path, registry: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "finetune_sdk", "studio", "--runs", "runs", "--port", "0",
                                "--registry-home", str(registry)], cwd=root, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    assert line.startswith("finetune studio: http://127.0.0.1:"), line + process.stderr.read()
    url = line.split(": ", 1)[1].strip()
    base = url.split("/?")[0]
    deadline = time.monotonic() + 30
    import urllib.error
    import urllib.request

    while time.monotonic() < deadline:  # up when it answers (401 without the token)
        try:
            urllib.request.urlopen(base + "/", timeout=1)
        except urllib.error.HTTPError:
            break
        except OSError:
            time.sleep(0.1)
    return process, url


def stop_studio(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=20)
    return err


def wait(predicate, timeout=60.0, step=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("timed out waiting")


def points(page, metric="loss") -> int:
    found = page.locator(f'figure.chart[data-metric="{metric}"]')
    return int(found.get_attribute("data-points")) if found.count() else 0


def test_studio_in_a_browser(tmp_path):
    began = time.monotonic()
    marks = {}
    from finetune_sdk.registry import Registry
    from finetune_sdk.training.run_events import events_path, read_events
    from finetune_sdk.testing.tiny import save_tiny_model

    root, registry = tmp_path / "work", tmp_path / "registry"
    save_tiny_model(root / "model")
    (root / "data").mkdir()
    rows = [*ROWS, {"prompt": "Show <b>bold</b> & <img src=x onerror=alert(1)>", "completion": "<i>text</i>"}]
    (root / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[::-1]))
    (root / "data" / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[::9]))
    SHOTS.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli_run = subprocess.Popen([sys.executable, "-m", "finetune_sdk", "train", "--model", "model", "--data",
                                "data/train.jsonl", "--eval-data", "data/eval.jsonl", "--eval-steps", "10",
                                "--formatter", "chatml", "--max-steps", "40", "--logging-steps", "2",
                                "--learning-rate", "0.02", "-o", "runs/from-cli"], cwd=root, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    studio, url = start_studio(root, registry)
    base = url.split("/?")[0]
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            anonymous = browser.new_page()  # no token: refused
            response = anonymous.goto(base + "/runs/anything")
            assert response.status == 401 and "access token" in anonymous.text_content("body")
            assert anonymous.goto(base + "/api/runs").status == 401
            anonymous.close()

            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            assert page.url == base + "/"  # the token went into a cookie and out of the address bar

            marks["studio up"] = time.monotonic() - began
            page.goto(base + "/new")
            page.wait_for_selector("#f-r")
            page.fill("#f-r", "0")
            page.press("#f-r", "Tab")
            error = page.locator('.field-error[data-for="r"]')
            error.wait_for()
            wait(lambda: error.text_content())
            assert error.text_content() == "option 'r' must be at least 1, got 0; LoRA rank"  # the CLI's line
            page.fill("#f-data", "/etc/passwd")
            page.click("#preview-button")
            page.wait_for_selector("#preview .error")
            assert "outside the folders the studio may read" in page.text_content("#preview .error")
            page.click("#start-button")
            wait(lambda: page.locator('.field-error[data-for="data"]').text_content())
            assert "outside" in page.locator('.field-error[data-for="data"]').text_content()
            page.screenshot(path=str(SHOTS / "new-run-errors.png"), full_page=True)

            page.fill("#f-r", "4")
            page.press("#f-r", "Tab")
            wait(lambda: not error.text_content())
            page.fill("#f-data", "data/train.jsonl")
            page.select_option("#f-formatter", "chatml")
            page.click("#preview-button")
            page.wait_for_selector("#preview pre.row, #preview .error", timeout=60_000)
            assert page.locator("#preview .error").count() == 0, page.text_content("#preview")
            first = page.locator('#preview pre.row[data-row="0"]')
            assert "<img src=x" in first.text_content() and first.locator("img, b, i").count() == 0  # text only
            assert page.locator("#preview .tok.learnt").count() > 0 and page.locator("#preview .tok.masked").count()
            page.click("#advise-button")
            page.wait_for_selector("#chosen-memory")
            assert "memory estimate for these settings" in page.text_content("#chosen-memory")
            page.screenshot(path=str(SHOTS / "new-run-preview.png"), full_page=True)

            page.fill("#f-name", "from-page")
            page.fill("#f-max_steps", "160")
            page.fill("#f-logging_steps", "2")
            page.fill("#f-learning_rate", "0.02")
            page.click("#start-button")
            page.wait_for_url(base + "/runs/from-page")
            marks["run started"] = time.monotonic() - began
            seen = [wait(lambda: points(page), timeout=90, step=0.05)]
            wait(lambda: points(page) > seen[0], timeout=30, step=0.05)  # the loss chart gains points
            seen.append(points(page))
            assert page.text_content("#device").startswith("cpu")
            page.screenshot(path=str(SHOTS / "run-live.png"), full_page=True)
            page.close()
            marks["points seen"] = time.monotonic() - began
            stop_studio(studio)
            run_pid = read_events(events_path(root / "runs" / "from-page"))[0]["pid"]
            if not any(e["event"] == "end" for e in read_events(events_path(root / "runs" / "from-page"))):
                os.kill(run_pid, 0)  # still training with the page and the server gone
            wait(lambda: any(e["event"] == "end" for e in read_events(events_path(root / "runs" / "from-page"))),
                 timeout=120)
            assert cli_run.wait(timeout=120) == 0, cli_run.stderr.read()[-2000:]

            Registry(registry).publish(root / "runs" / "from-cli", "adder", aliases=["staging"])
            Registry(registry).publish(root / "runs" / "from-page", "adder", parent="adder@staging")

            marks["runs finished"] = time.monotonic() - began
            studio, url = start_studio(root, registry)  # reopen: a new server, a new token
            base = url.split("/?")[0]
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.goto(url.replace("/?", "/runs/from-page?"))
            page.wait_for_selector('figure.chart[data-metric="loss"]')
            logged = [e for e in read_events(events_path(root / "runs" / "from-page")) if e["event"] == "log"]
            wait(lambda: points(page) == len(logged) == 80)  # the whole history, not the last N
            assert page.text_content("#status") == "finished"
            assert page.text_content("#peak") not in ("", "—")
            page.screenshot(path=str(SHOTS / "run-finished.png"), full_page=True)

            page.goto(base + "/")
            page.wait_for_selector('figure.chart[data-metric="loss"] polyline[data-run="from-cli"]')
            page.wait_for_selector('figure.chart[data-metric="loss"] polyline[data-run="from-page"]')
            page.wait_for_selector('figure.chart[data-metric="eval_loss"][data-points="4"]')  # steps 10..40
            assert page.locator("td.status.finished").count() == 2
            page.screenshot(path=str(SHOTS / "runs.png"), full_page=True)

            page.goto(base + "/registry")
            page.wait_for_selector('svg.lineage line[data-edge="adder@1->adder@2"]', state="attached")
            row = page.locator('tr[data-ref="adder@2"]')
            assert row.locator("a.run-link").text_content() == "from-page"  # the run behind the version
            row.locator("input.alias").fill("production")
            row.locator("button.set-alias").click()
            page.wait_for_selector('tr[data-ref="adder@2"] >> text=production')
            assert Registry(registry).resolve("adder@production").version == 2
            page.locator('tr[data-ref="adder@1"] button.verify').click()
            wait(lambda: "ok" in page.locator('tr[data-ref="adder@1"] .verify-result').text_content())
            page.screenshot(path=str(SHOTS / "registry.png"), full_page=True)
            marks["done"] = time.monotonic() - began
            print("browser test timings (s):", {k: round(v, 1) for k, v in marks.items()})
        finally:
            browser.close()
            if studio.poll() is None:
                stop_studio(studio)
            if cli_run.poll() is None:
                cli_run.kill()

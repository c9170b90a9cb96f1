"""The feedback loop in a real headless browser (Debian's chromium through playwright), on a tiny model.

One walk as a person would: chat with the base model and a registry version side by side; rate 6 answers of a
prompts file by clicking (4 thumbs, 2 A/B) and check the rows equal those ``finetune feedback`` writes for the same
choices; rate in the chat (thumbs, A/B, an edit); retrain KTO from the thumbs in one click and see the new version
in the chat and in the registry lineage; two pages rating at once lose no row; a server killed while ratings are in
flight loses at most the one in flight; the federated rounds of a real run with DP on show the budget spent per
round. A second test serves a model whose answers hold ``<script>``, ``<img onerror>`` and terminal escapes and
checks they are shown as text. Screenshots go to docs/studio/.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
playwright_api = pytest.importorskip("playwright.sync_api")

from tests.studio_federated import dp_accounting_epsilons  # noqa: E402
from tests.test_studio_browser import CHROMIUM, SHOTS, start_studio, stop_studio, wait  # noqa: E402

PROMPTS = ["What is 2 plus 3?", "Name a colour.", "Say hello.", "Count to three."]
PAIR_PROMPTS = ["Pick a fruit.", "What is 1 plus 1?"]
ROWS = [{"prompt": f"what is {a} plus {b}?", "completion": f"{a} plus {b} is {a + b}."} for a in range(4)
        for b in range(4)]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="no chromium (scripts/setup.sh installs it)")]


@pytest.fixture(scope="module")
def tiny_version(tmp_path_factory, dp_federated_run):
    """A work folder with a tiny base model and one trained version ``tiny-bot@1`` in its registry (trained once
    for the module), scores stored for it and its base."""
    from finetune_sdk import Trainer
    from finetune_sdk.registry import Registry
    from finetune_sdk.registry.scores import store
    from finetune_sdk.testing.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("loop-browser")
    home = root / "registry"
    save_tiny_model(root / "model")
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[::3]))
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (root / "pair-prompts.txt").write_text("\n".join(PAIR_PROMPTS) + "\n")
    registry = Registry(home)
    Trainer(str(root / "model"), technique="lora", formatter="chatml", output_dir=root / "runs" / "v1",
            publish_as="tiny-bot", registry=registry, progress=False, max_steps=4, logging_steps=1, learning_rate=0.01, r=2).fit(ROWS)
    row = {"task": "arc_easy", "task_version": 1, "num_fewshot": 0, "limit": 20, "metric": "acc", "filter": "none",
           "lm_eval_version": "test", "seed": 0, "date": "2026-12-07T00:00:00Z"}
    store(registry, "tiny-bot@1", [{**row, "value": 0.35, "stderr": 0.107}])
    store(registry, "tiny-bot@1", [{**row, "value": 0.25, "stderr": 0.099}], base=True)
    fed = dp_federated_run[0]  # a real run with DP on: the session's, copied with its run area (fed.run)
    for entry in fed.parent.iterdir():
        if entry.name == fed.name or entry.name.startswith(fed.name + "."):
            copy = shutil.copytree if entry.is_dir() else shutil.copy2
            copy(entry, root / "runs" / entry.name)
    return root, home


def _session(page, prompts, mode, out, choices, shot=None):
    page.fill("#prompts-file", prompts)
    page.select_option("#mode", mode)
    assert page.input_value("#out-file") == {"thumbs": "thumbs.jsonl", "pairwise": "pairs.jsonl"}[mode]  # the chat's
    page.fill("#out-file", out)
    page.fill("#max_new_tokens", "6")
    page.fill("#temperature", "1.0")
    page.fill("#seed", "5")
    page.fill("#rater", "ana")
    page.click("#session-start")
    for choice in choices:
        page.wait_for_selector("#session-item h3.prompt, #session-item .error")
        assert page.locator("#session-item .error").count() == 0, page.text_content("#session-item")
        if shot:
            page.screenshot(path=str(SHOTS / shot), full_page=True)
            shot = None
        item = page.get_attribute("#session-item", "data-item")
        page.click(f"#session-item button.{choice}")
        wait(lambda: page.get_attribute("#session-item", "data-item") not in (item, "") or
             page.locator("#session-done").count(), timeout=60)
    page.wait_for_selector("#session-done")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _without_time(rows):
    return [{k: v for k, v in r.items() if k != "rated_at"} for r in rows]


def test_the_loop_in_a_browser(tiny_version, monkeypatch):
    from finetune_sdk.feedback.session import collect_feedback
    from finetune_sdk.feedback.ratings_file import KTO_ROWS, read_ratings
    from finetune_sdk.registry import Registry

    root, home = tiny_version
    monkeypatch.setenv("FINETUNE_SDK_REGISTRY", str(home))  # collect_feedback resolves tiny-bot@1 there too
    studio, url = start_studio(root, home)
    base = url.split("/?")[0]
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 1000})
            page = context.new_page()
            page.goto(url)
            # -- a ratings session: 4 thumbs, 2 A/B, by clicking; the rows are finetune feedback's -------------
            page.goto(base + "/session")
            page.wait_for_selector("#session-model")
            page.select_option("#session-model", "tiny-bot@1")
            _session(page, "prompts.txt", "thumbs", "thumbs.jsonl", ["thumb-up", "thumb-down", "thumb-up",
                                                                      "thumb-down"])
            _session(page, "pair-prompts.txt", "pairwise", "pairs.jsonl", ["b-better", "tie"], shot="rate-pairs.png")
            labels = iter([True, False, True, False])
            collect_feedback("tiny-bot@1", root / "prompts.txt", root / "cli-thumbs.jsonl", rater="ana",
                             max_new_tokens=6, temperature=1.0, seed=5, ask=lambda prompt, answers: next(labels))
            picks = iter([1, "tie"])
            collect_feedback("tiny-bot@1", root / "pair-prompts.txt", root / "cli-pairs.jsonl", mode="pairwise",
                             rater="ana", max_new_tokens=6, temperature=1.0, seed=5,
                             ask=lambda prompt, answers: next(picks))
            for page_file, cli_file in (("thumbs.jsonl", "cli-thumbs.jsonl"), ("pairs.jsonl", "cli-pairs.jsonl")):
                in_page, in_cli = _rows(root / page_file), _rows(root / cli_file)
                assert [list(r) for r in in_page] == [list(r) for r in in_cli]  # fields and their order
                assert _without_time(in_page) == _without_time(in_cli)
            assert _rows(root / "thumbs.jsonl")[0]["model"]["version"] == "tiny-bot@1"

            # -- chat: base and tiny-bot@1 side by side, rated in the page -------------------------------------
            page.goto(base + "/chat")
            page.wait_for_selector("#model-choice", state="attached")
            for box in page.locator("input.model").all():
                box.set_checked(box.get_attribute("value") in (str(root / "model"), "tiny-bot@1"))
            page.fill("#max_new_tokens", "8")
            page.fill("#thumbs-file", "chat-thumbs.jsonl")
            page.fill("#prompt", "What is 2 plus 3?")
            page.click("#send")
            page.wait_for_selector('.answer[data-column="1"][data-done="1"]', timeout=60_000)
            assert page.locator(".answer").count() == 2
            assert "temperature=0.8, max_new_tokens=8" in page.text_content("#sampling-shown")
            page.locator('.answer[data-column="1"] button.thumb-up').click()
            page.wait_for_selector('.answer[data-column="1"][data-rated="up"]')
            page.click("#pair button.a-better")
            wait(lambda: "appended" in page.text_content("#pair-message"))
            page.locator('.answer[data-column="0"] button.edit').click()
            page.fill('.answer[data-column="0"] textarea.edit-text', "2 plus 3 is 5.")
            page.locator('.answer[data-column="0"] button.save-edit').click()
            page.wait_for_selector('.answer[data-column="0"][data-rated="edited"]')
            assert _rows(root / "edits.jsonl")[0]["completion"] == "2 plus 3 is 5."
            assert list(_rows(root / "pairs.jsonl")[-1])[:3] == ["prompt", "chosen", "rejected"]
            page.screenshot(path=str(SHOTS / "chat.png"), full_page=True)

            # -- retrain KTO from the thumbs in one click; the new version answers in the chat ----------------
            page.fill("#thumbs-file", "thumbs.jsonl")
            page.select_option("#objective", "kto")
            page.select_option("#rated", "tiny-bot@1")
            page.fill("#retrain-max-steps", "2")
            page.click("#retrain-check")
            page.wait_for_selector("#retrain-plan .counts")
            assert "2 desirable, 2 undesirable" in page.text_content("#retrain-plan .counts")
            assert "only 4 usable ratings" in page.text_content("#retrain-plan")
            page.click("#retrain-button")
            wait(lambda: page.get_attribute("#retrain-message", "data-version") or
                 "error" in (page.get_attribute("#retrain-message", "class") or ""), timeout=240)
            assert page.get_attribute("#retrain-message", "data-version") == "tiny-bot@2"
            page.screenshot(path=str(SHOTS / "retrain.png"), full_page=True)
            assert Registry(home).resolve("tiny-bot@2").parent == "tiny-bot@1"
            assert Registry(home).resolve("tiny-bot@2").manifest["objective"] == "kto"
            for box in page.locator("input.model").all():
                box.set_checked(box.get_attribute("value") in ("tiny-bot@1", "tiny-bot@2"))
            page.click("#send")
            page.wait_for_selector('.answer[data-column="1"][data-done="1"]', timeout=60_000)
            assert page.text_content('.answer[data-column="1"] h3').startswith("tiny-bot@2")

            lineage = context.new_page()
            lineage.goto(base + "/registry")
            lineage.wait_for_selector('svg.lineage line[data-edge="tiny-bot@1->tiny-bot@2"]', state="attached")
            lineage.goto(base + "/scores")
            lineage.wait_for_selector("table.scores")
            assert "0.107" in lineage.text_content("table.scores")
            lineage.screenshot(path=str(SHOTS / "scores.png"))
            lineage.goto(base + "/federated")
            lineage.wait_for_selector("table.federated-rounds")
            shown = lineage.text_content("table.federated-rounds")
            for epsilon in dp_accounting_epsilons():  # the budget spent through each round, as dp-accounting gives
                assert f"ε {epsilon:.4g}, δ 0.00001" in shown
            assert "clinic-a" in shown and "clinic-b" in shown and "held-out loss, global model" in shown
            history = json.loads((root / "runs" / "fed" / "finetune_manifest.json").read_text())["federated"]["history"]
            cells = lineage.locator("table.federated-rounds tr").nth(2).locator("td").all_text_contents()
            assert cells[3] == "clinic-a" and float(cells[5]) == pytest.approx(  # round 1, its global model
                history[0]["global_eval"]["per_client"]["clinic-a"], rel=1e-3)
            lineage.screenshot(path=str(SHOTS / "federated.png"), full_page=True)
            lineage.goto(base + "/export")
            lineage.wait_for_selector("#export-ref")
            lineage.select_option("#export-ref", "tiny-bot@1")
            lineage.select_option("#quantization", "q8_0")
            lineage.fill("#export-out", "exports/tiny")
            lineage.click("#export-button")
            lineage.wait_for_selector("#ollama-command, #export-result .error", timeout=120_000)
            assert lineage.locator("#export-result .error").count() == 0, lineage.text_content("#export-result")
            assert lineage.text_content("#ollama-command").startswith("ollama create ")
            assert list((root / "exports" / "tiny").glob("*q8_0.gguf"))
            lineage.select_option("#compare-ref", "tiny-bot@1")
            lineage.fill("#compare-data", "eval.jsonl")
            lineage.fill("#compare-dir", "reports/compare")
            lineage.fill("#compare-prompts", "What is 2 plus 3?")
            lineage.click("#compare-button")
            lineage.wait_for_selector("#compare-metrics, #compare-result .error", timeout=120_000)
            assert lineage.locator("#compare-result .error").count() == 0, lineage.text_content("#compare-result")
            assert "eval_loss" in lineage.text_content("#compare-metrics")
            wait(lambda: lineage.evaluate("() => document.getElementById('compare-plot').naturalWidth") > 0)
            assert (root / "reports" / "compare" / "comparison.json").is_file()
            lineage.screenshot(path=str(SHOTS / "export-compare.png"), full_page=True)

            # -- two pages rating at once lose no row ----------------------------------------------------------
            before = len(_rows(root / "chat-two.jsonl")) if (root / "chat-two.jsonl").exists() else 0
            lineage.goto(base + "/chat")
            lineage.wait_for_selector("#model-choice", state="attached")
            lineage.fill("#prompt", "Hi")
            lineage.fill("#max_new_tokens", "4")
            lineage.click("#send")
            lineage.wait_for_selector('.answer[data-column="0"][data-done="1"]', timeout=60_000)
            burst = """n => { window.acked = 0; window.burst = Promise.all(Array.from({length: n}, () =>
                api("POST", "/api/rate", {kind: "thumbs", answers: [ANSWERS[0].id], value: true,
                    out: "chat-two.jsonl"}).then(r => { if (r.ok) window.acked += 1; }))); }"""
            page.evaluate(burst, 20)
            lineage.evaluate(burst, 20)
            page.evaluate("() => window.burst")
            lineage.evaluate("() => window.burst")
            assert page.evaluate("() => window.acked") == lineage.evaluate("() => window.acked") == 20
            assert len(_rows(root / "chat-two.jsonl")) == before + 40

            # -- a killed server loses at most the rating in flight --------------------------------------------
            page.evaluate("""() => { window.acked = 0; window.loop = (async () => { for (let i = 0; i < 400; i++) {
                const r = await api("POST", "/api/rate", {kind: "thumbs", answers: [ANSWERS[0].id], value: false,
                    out: "killed.jsonl"}); if (!r.ok) break; window.acked += 1; } })(); }""")
            wait(lambda: page.evaluate("() => window.acked") >= 5, timeout=60)
            os.kill(studio.pid, signal.SIGKILL)
            studio.wait(timeout=20)
            page.evaluate("() => window.loop.catch(() => null)")
            acked = page.evaluate("() => window.acked")
            contents = read_ratings(root / "killed.jsonl", KTO_ROWS)  # every line whole, or one torn tail
            assert acked <= contents.rows <= acked + 1
            assert contents.torn_bytes == 0 or contents.rows == acked
        finally:
            browser.close()
            if studio.poll() is None:
                stop_studio(studio)


class _HostileModel:
    """Answers with HTML, script and terminal escapes, through the chat's real streaming path."""

    ANSWER = 'ok <script>window.owned=1</script><img src=x onerror="window.owned=2"> \x1b[2J\x1b]0;title\x07 \u202eevil'
    formatter = None

    def __init__(self):
        from finetune_sdk.testing.tiny import tiny_tokenizer

        self.tokenizer = tiny_tokenizer()

    def generation_settings(self, **options):
        return dict(options)

    def generate(self, prompts, streamer=None, **options):
        if streamer is not None:
            streamer.on_finalized_text(self.ANSWER, stream_end=True)
        return [self.ANSWER for _ in prompts]


def test_model_output_is_shown_as_text_only(tmp_path, monkeypatch):
    import uvicorn

    from finetune_sdk.studio import free_port
    from finetune_sdk.studio.app import create_app

    monkeypatch.setenv("FINETUNE_SDK_REGISTRY", str(tmp_path / "registry"))
    (tmp_path / "prompts.txt").write_text("Say something.\n")
    app = create_app(tmp_path / "runs", tmp_path, token="t" * 20, registry_home=tmp_path / "registry")
    app.state.chat.models[("hostile", None)] = app.state.chat.models[("hostile", "chatml")] = _HostileModel()
    port = free_port("127.0.0.1")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait(lambda: server.started, timeout=30)
    dialogs = []
    try:
        with playwright_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page()
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(f"http://127.0.0.1:{port}/?token={'t' * 20}")
            page.goto(f"http://127.0.0.1:{port}/chat")
            page.wait_for_selector("#model-choice", state="attached")
            page.evaluate("""() => { const c = document.createElement("input"); c.type = "checkbox";
                c.className = "model"; c.value = "hostile"; c.checked = true;
                document.querySelectorAll("input.model").forEach(x => x.checked = false);
                document.getElementById("model-choice").append(c); }""")
            page.fill("#prompt", "Say something.")
            page.click("#send")
            page.wait_for_selector('.answer[data-column="0"][data-done="1"]')
            shown = page.text_content('.answer[data-column="0"] pre.text')
            assert "<script>window.owned=1</script>" in shown and '<img src=x onerror="window.owned=2">' in shown
            assert "\\x1b[2J" in shown and "\\x1b]0;title\\x07" in shown and "\\u202e" in shown
            assert "\x1b" not in shown and "\u202e" not in shown
            assert page.locator(".answer img, .answer script").count() == 0
            assert page.evaluate("() => window.owned") is None and not dialogs
            page.goto(f"http://127.0.0.1:{port}/session")
            page.wait_for_selector("#session-model")
            page.evaluate("""() => { const s = document.getElementById("session-model");
                const o = document.createElement("option"); o.value = "hostile"; o.textContent = "hostile";
                s.append(o); s.value = "hostile"; }""")
            page.fill("#prompts-file", "prompts.txt")
            page.fill("#out-file", "hostile.jsonl")
            page.click("#session-start")
            page.wait_for_selector("#session-item pre.text")
            assert "<script>" in page.text_content("#session-item pre.text")
            assert page.locator("#session-item img, #session-item script").count() == 0
            page.click("#session-item button.thumb-up")
            page.wait_for_selector("#session-done")
            assert page.evaluate("() => window.owned") is None and not dialogs
            assert json.loads((tmp_path / "hostile.jsonl").read_text())["completion"] == _HostileModel.ANSWER
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=20)

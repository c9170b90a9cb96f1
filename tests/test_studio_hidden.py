"""Faults a tester found in the studio's server: path-valued options, list values, endpoints that crash."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from finetune_sdk.studio.app import create_app  # noqa: E402

TOKEN = "hidden-token-0123456789"
H = {"X-Studio-Token": TOKEN}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("work")
    (root / "model").mkdir()
    (root / "data.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    (root / "runs").mkdir()
    return root


@pytest.fixture
def client(work, tmp_path):
    app = create_app(work / "runs", work, token=TOKEN, registry_home=tmp_path / "registry")
    return TestClient(app, base_url="http://127.0.0.1:8765")


@pytest.mark.parametrize("option", ["deepspeed", "fsdp_config", "reward_model"])
def test_path_valued_options_are_confined_like_model_and_data(client, work, tmp_path, option):
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    body = {"name": f"run-{option}", "model": "model", "data": "data.jsonl", "options": {option: str(outside)}}
    response = client.post("/api/runs", headers=H, json=body)
    assert response.status_code == 400, response.text
    assert "outside the folders" in response.json()["fields"][option]
    assert not (work / "runs" / f"run-{option}.run").exists()


def test_list_and_number_options_reach_the_cli_as_the_cli_spells_them(client, work, monkeypatch):
    started = {}
    monkeypatch.setattr(client.app.state.runs, "start",
                        lambda name, args, cwd: started.setdefault("args", args) and {"name": name})
    body = {"name": "lists", "model": "model", "data": "data.jsonl",
            "options": {"target_modules": ["q_proj", "v_proj"], "learning_rate": "1e-3", "packing": False}}
    assert client.post("/api/runs", headers=H, json=body).status_code == 200
    args = started["args"]
    assert args[args.index("--target-modules") + 1] == "q_proj,v_proj"
    assert args[args.index("--learning-rate") + 1] == "0.001" and "--no-packing" in args


def test_a_taken_port_is_one_line_before_any_url_is_printed(tmp_path):
    import socket
    import subprocess
    import sys

    from finetune_sdk.errors import ConfigError
    from finetune_sdk.studio import serve

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        announced: list[str] = []
        with pytest.raises(ConfigError, match=f"can't listen on 127.0.0.1:{port}"):
            serve(tmp_path / "runs", port=port, root=tmp_path, registry_home=tmp_path / "reg",
                  announce=announced.append)
        assert announced == []
        done = subprocess.run([sys.executable, "-m", "finetune_sdk", "studio", "--runs", str(tmp_path / "runs"),
                               "--port", str(port)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 2 and "token=" not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr and f"can't listen on 127.0.0.1:{port}" in done.stderr


def test_stopping_a_run_that_ends_meanwhile_is_one_line_not_a_server_error(client, monkeypatch):
    """The run's process exits between the status check and the signal: a 400 with one line, not a 500."""
    from finetune_sdk.studio import runs as runs_module
    from finetune_sdk.training.run_events import EventLog

    with EventLog(client.app.state.runs.folder / "ending", fresh=True) as log:
        log.append({"event": "start", "pid": 424242, "max_steps": 2, "step": 0})
    folder = client.app.state.runs
    monkeypatch.setattr(folder, "summary", lambda name: {"name": name, "status": "running", "can_stop": True})
    monkeypatch.setattr(runs_module, "_alive", lambda pid, since=None: False)
    response = client.post("/api/runs/ending/stop", headers=H)
    assert response.status_code == 400
    assert response.json() == {"error": "run 'ending' is no longer running: nothing to stop"}


@pytest.mark.parametrize("path", ["/api/runs", "/api/preview", "/api/advise"])
@pytest.mark.parametrize("options", ["r=1", [["r", 1]], 3])
def test_options_that_are_not_an_object_are_one_line_not_a_server_error(client, path, options):
    body = {"name": "bad-options", "model": "model", "data": "data.jsonl", "options": options}
    response = client.post(path, headers=H, json=body)
    assert response.status_code == 400, response.text
    assert response.json() == {"error": "'options' must be a JSON object of option name -> value, e.g. {\"r\": 16}"}


HOSTILE = "<img src=x onerror=\"window.__pwned=1\"><script>window.__pwned=2</script>\x1b[31mred\x1b[0m"


@pytest.mark.slow
def test_hostile_text_in_a_runs_events_is_shown_as_text_in_a_real_browser(tmp_path):
    """Event values written by any process (model name, device, error, an objective's metric name) are drawn as text:
    no markup runs; the token leaves the address bar after the redirect."""
    import shutil
    import signal

    playwright_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium (scripts/setup.sh installs it)")
    from finetune_sdk.training.run_events import EventLog

    with EventLog(tmp_path / "runs" / "hostile", fresh=True) as log:
        log.append({"event": "start", "pid": 1, "model": HOSTILE, "technique": HOSTILE, "max_steps": 2, "step": 0,
                    "device": HOSTILE, "precision": HOSTILE})
        log.append({"event": "log", "step": 1, "loss": 2.0, HOSTILE: 1.0})
        log.append({"event": "failed", "step": 1, "error": HOSTILE})
    from tests.test_studio_browser import start_studio

    process, url = start_studio(tmp_path, tmp_path / "reg")
    base = url.split("/?")[0]
    try:
        with playwright_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(url)
            assert "token" not in page.url
            page.goto(base + "/runs/hostile")
            page.wait_for_timeout(1500)  # the stream draws the charts
            assert page.evaluate("window.__pwned") is None
            assert page.locator("img").count() == 0
            text = page.inner_text("main")
            assert "<img src=x" in text and "<script>" in text
            page.goto(base + "/")
            page.wait_for_timeout(1000)
            assert page.evaluate("window.__pwned") is None and page.locator("img").count() == 0
            browser.close()
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=20)
    assert url.split("token=")[1] not in err

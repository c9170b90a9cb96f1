"""The studio's server: every endpoint, the token, CSRF, path confinement, the event stream, start/stop/resume."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from finetune_sdk.training.run_events import EventLog, events_path, read_events  # noqa: E402
from finetune_sdk.studio.app import create_app  # noqa: E402

TOKEN = "test-token-0123456789"
H = {"X-Studio-Token": TOKEN}
ROWS = [{"prompt": f"what is {a} plus {b}?", "completion": f"{a} plus {b} is {a + b}."}
        for a in range(5) for b in range(5)]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder the studio starts in: a tiny model, a data file, a runs folder with one finished CLI-style run."""
    from finetune_sdk.testing.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("work")
    save_tiny_model(root / "model")
    (root / "data").mkdir()
    (root / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (root / ".hidden.jsonl").write_text("{}\n")
    with EventLog(root / "runs" / "cli-run", fresh=True) as log:
        log.append({"event": "start", "pid": 1, "model": "m", "technique": "lora", "max_steps": 2, "step": 0,
                    "device": "cpu: test", "precision": "float32 weights (test)", "estimated_memory": 2**20})
        for step, loss in ((1, 2.0), (2, 1.5)):
            log.append({"event": "log", "step": step, "loss": loss, "learning_rate": 0.01, "grad_norm": 1.0,
                        "tokens_per_second": 100.0})
        log.append({"event": "eval", "step": 2, "eval_loss": 1.7})
        log.append({"event": "end", "step": 2, "metrics": {"train_steps": 2}, "peak_memory": 3 * 2**20})
    return root


@pytest.fixture
def client(work, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_SECRETsecretSECRETsecret")
    app = create_app(work / "runs", work, token=TOKEN, registry_home=tmp_path / "registry")
    return TestClient(app, base_url="http://127.0.0.1:8765")


ENDPOINTS = [("GET", "/"), ("GET", "/new"), ("GET", "/registry"), ("GET", "/runs/cli-run"), ("GET", "/api/runs"),
             ("GET", "/api/runs/cli-run"), ("GET", "/api/stream?runs=cli-run"), ("GET", "/api/options"),
             ("GET", "/api/files"), ("GET", "/api/registry"), ("GET", "/static/studio.js"),
             ("POST", "/api/runs"), ("POST", "/api/runs/cli-run/stop"), ("POST", "/api/runs/cli-run/resume"),
             ("POST", "/api/validate"), ("POST", "/api/preview"), ("POST", "/api/advise"),
             ("POST", "/api/registry/alias"), ("POST", "/api/registry/verify")]


@pytest.mark.parametrize("method,path", ENDPOINTS)
def test_every_endpoint_refuses_a_request_without_the_token(client, method, path):
    for headers in ({}, {"X-Studio-Token": "wrong"}):
        response = client.request(method, path, headers=headers, json={})
        assert response.status_code == 401, (path, response.status_code)
        assert "access token" in response.text and TOKEN not in response.text


def test_the_token_in_the_url_becomes_a_strict_cookie_and_leaves_the_url(client):
    response = client.get(f"/runs/cli-run?token={TOKEN}&x=1", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/runs/cli-run?x=1"
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    page = client.get("/runs/cli-run")  # the cookie now carries it
    assert page.status_code == 200 and "Run cli-run" in page.text
    assert client.get(f"/?token=wrong", follow_redirects=False).status_code == 401


def test_changes_need_the_header_not_the_cookie_and_a_same_origin(client):
    client.cookies.set("finetune_studio", TOKEN)
    assert client.get("/api/runs").status_code == 200
    refused = client.post("/api/validate", json={"name": "r", "value": "4"})  # cookie only: a forged form
    assert refused.status_code == 401 and "X-Studio-Token" in refused.text
    foreign = client.post("/api/validate", json={"name": "r", "value": "4"},
                          headers={**H, "Origin": "http://evil.example"})
    assert foreign.status_code == 403
    same = client.post("/api/validate", json={"name": "r", "value": "4"},
                       headers={**H, "Origin": "http://127.0.0.1:8765"})
    assert same.status_code == 200 and same.json() == {"error": None}


def test_pages_and_api_never_carry_the_hub_token_and_set_a_strict_content_policy(client):
    for method, path in ENDPOINTS:
        if method == "GET" and "stream" not in path:
            response = client.get(path, headers=H)
            assert response.status_code == 200, path
            assert "hf_SECRET" not in response.text
    page = client.get("/", headers=H)
    assert "script-src" not in page.headers["content-security-policy"] and \
        "default-src 'self'" in page.headers["content-security-policy"]


def test_runs_list_and_summary_read_the_event_log(client):
    runs = client.get("/api/runs", headers=H).json()
    assert [r["name"] for r in runs] == ["cli-run"]
    run = runs[0]
    assert (run["status"], run["step"], run["loss"], run["device"]) == ("finished", 2, 1.5, "cpu: test")
    assert run["estimated_memory"] == 2**20 and run["peak_memory"] == 3 * 2**20 and not run["can_stop"]
    detail = client.get("/api/runs/cli-run", headers=H).json()
    assert [e["event"] for e in detail["events"]] == ["start", "log", "log", "eval", "end"]
    missing = client.get("/api/runs/nope", headers=H)
    assert missing.status_code == 400 and "no run named 'nope'" in missing.json()["error"]
    page = client.get("/", headers=H).text
    assert 'data-runs="cli-run"' in page and "finished" in page
    assert "3.0 MiB" in client.get("/runs/cli-run", headers=H).text  # the peak, after


def test_option_schema_and_field_checks_give_the_clis_messages(client, work):
    from click.testing import CliRunner

    from finetune_sdk.cli.main import cli

    schema = client.get("/api/options", headers=H).json()
    assert {"lora", "qlora", "full"} <= set(schema["techniques"]) and "chatml" in schema["formatters"]
    fields = {f["name"]: f for f in schema["fields"]}
    assert fields["r"]["group"].startswith("technique") and fields["r"]["range"] == "x >= 1"
    assert fields["learning_rate"]["group"] == "training"
    error = client.post("/api/validate", json={"name": "r", "value": "0"}, headers=H).json()["error"]
    assert error == "option 'r' must be at least 1, got 0; LoRA rank"
    cli_run = CliRunner().invoke(cli, ["train", "--model", str(work / "model"), "--data",
                                       str(work / "data" / "train.jsonl"), "--r", "0", "-o", str(work / "x")])
    assert cli_run.exit_code == 2 and f"Error: {error}" in cli_run.output
    assert client.post("/api/validate", json={"name": "lora_dropout", "value": "1"}, headers=H).json()["error"] == \
        "option 'lora_dropout' must be less than 1, got 1.0; dropout on the LoRA input"
    assert "did you mean 'learning_rate'" in client.post(
        "/api/validate", json={"name": "learning_rat", "value": "1"}, headers=H).json()["error"]


def test_start_refuses_bad_fields_with_messages_beside_each(client, work):
    response = client.post("/api/runs", headers=H, json={
        "name": "../escape", "model": "model", "data": "/etc/passwd", "technique": "lorra",
        "options": {"r": "0", "learning_rate": "fast"}})
    assert response.status_code == 400
    fields = response.json()["fields"]
    assert set(fields) == {"name", "data", "technique", "r", "learning_rate"}
    assert "outside the folders the studio may read" in fields["data"]
    assert fields["r"] == "option 'r' must be at least 1, got 0; LoRA rank"
    assert "did you mean 'lora'" not in fields["technique"] and "unknown technique 'lorra'" in fields["technique"]
    assert not (work / "runs" / "..").joinpath("escape.run").exists()
    taken = client.post("/api/runs", headers=H, json={"name": "cli-run", "model": "model",
                                                       "data": "data/train.jsonl"})
    assert taken.status_code == 400 and "a run named 'cli-run' exists" in taken.json()["fields"]["name"]
    assert client.post("/api/runs", headers=H, content=b"[1, 2").json() == \
        {"error": "the request body must be a JSON object"}


def test_paths_outside_the_folders_are_refused_symlinks_too(client, work, tmp_path):
    outside = tmp_path / "secret.jsonl"
    outside.write_text(json.dumps(ROWS[0]) + "\n")
    (work / "data" / "link.jsonl").unlink(missing_ok=True)
    (work / "data" / "link.jsonl").symlink_to(outside)
    for data in ("/etc/passwd", "../../../../etc/passwd", str(outside), "data/link.jsonl"):
        response = client.post("/api/preview", headers=H, json={"model": "model", "data": data})
        assert response.status_code == 400, data
        assert "outside the folders the studio may read" in response.json()["error"]
    assert client.post("/api/advise", headers=H, json={"model": "/usr"}).status_code == 400
    files = client.get("/api/files", headers=H).json()
    assert "data/train.jsonl" in files["data"] and ".hidden.jsonl" not in files["data"]
    assert files["models"] == ["model"]
    (work / "data" / "link.jsonl").unlink()


@pytest.mark.slow
def test_preview_marks_learnt_and_masked_tokens_and_advice_estimates_memory(client):
    preview = client.post("/api/preview", headers=H, json={"model": "model", "data": "data/train.jsonl",
                                                           "formatter": "chatml"}).json()
    assert preview["formatter"] == "chatml" and preview["total_rows"] == 25 and len(preview["rows"]) == 3
    tokens = preview["rows"][0]
    learnt = "".join(text for text, flag in tokens if flag)
    masked = "".join(text for text, flag in tokens if not flag)
    assert "0 plus 0 is 0." in learnt and "what is 0 plus 0?" in masked and "what is" not in learnt
    advice = client.post("/api/advise", headers=H, json={"model": "model", "data": "data/train.jsonl",
                                                         "technique": "lora"}).json()
    assert advice["recommended"]["technique"] in ("lora", "full", "qlora")
    assert advice["recommended"]["command"].startswith("finetune train")
    assert advice["chosen"]["total"] > 0
    bad = client.post("/api/preview", headers=H, json={"model": "model", "data": "data/train.jsonl",
                                                       "formatter": "alpaca"})
    assert bad.status_code == 400 and "instruction" in bad.json()["error"]


def test_registry_overview_alias_and_verify_use_the_registry(client, tmp_path, work):
    from finetune_sdk.registry import Registry

    result = tmp_path / "result"
    result.mkdir()
    metrics = {"train_loss": 1.25, "train_runtime": 3.5, "train_steps": 7}
    (result / "finetune_manifest.json").write_text(json.dumps({"format_version": 1, "technique": "lora",
                                                               "metrics": metrics}))
    with EventLog(tmp_path / "runs" / "behind", fresh=True) as log:  # the run this result came from
        log.append({"event": "end", "step": 7, "metrics": metrics})
    (result / "adapter_model.safetensors").write_bytes(b"weights")
    registry = Registry(tmp_path / "registry")
    registry.publish(result, "adder", aliases=["staging"])
    registry.publish(result, "adder", parent="adder@1", tags=["smaller"])
    data = client.get("/api/registry", headers=H).json()
    (adapter,) = data["adapters"]
    assert [v["ref"] for v in adapter["versions"]] == ["adder@1", "adder@2"]
    assert data["edges"] == [["adder@1", "adder@2"]] and adapter["versions"][0]["aliases"] == ["staging"]
    assert adapter["versions"][1]["train_loss"] == 1.25
    assert adapter["versions"][0]["run"] is None  # the studio's runs folder doesn't hold it
    other = TestClient(create_app(tmp_path / "runs", work, token=TOKEN, registry_home=tmp_path / "registry"))
    assert [v["run"] for v in other.get("/api/registry", headers=H).json()["adapters"][0]["versions"]] == \
        ["behind", "behind"]
    moved = client.post("/api/registry/alias", headers=H, json={"ref": "adder@2", "alias": "production"}).json()
    assert moved["ref"] == "adder@2" and registry.resolve("adder@production").version == 2
    bad = client.post("/api/registry/alias", headers=H, json={"ref": "adder@2", "alias": "v3"})
    assert bad.status_code == 400 and "looks like a version number" in bad.json()["error"]
    assert client.post("/api/registry/verify", headers=H, json={"ref": "adder@1"}).json()["ok"] is True
    blob = next(p for p in (registry.home / "blobs").rglob("*") if p.is_file() and p.read_bytes() == b"weights")
    blob.chmod(0o644)
    blob.write_bytes(b"tampered")
    verdict = client.post("/api/registry/verify", headers=H, json={"ref": "adder@1"}).json()
    assert verdict["ok"] is False and "adapter_model.safetensors" in verdict["error"]


def serve_in_thread(app):
    import uvicorn

    from finetune_sdk.studio import free_port

    port = free_port("127.0.0.1")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", log_config=None,
                                           access_log=False, timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{port}"


def test_the_event_stream_sends_the_whole_history_then_new_events(work, tmp_path):
    app = create_app(work / "runs", work, token=TOKEN, registry_home=tmp_path / "registry", poll_seconds=0.05)
    server, thread, url = serve_in_thread(app)
    try:
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"{url}/api/stream?runs=cli-run", timeout=5)
        request = urllib.request.Request(f"{url}/api/stream?runs=cli-run", headers=H)
        seen = []
        with urllib.request.urlopen(request, timeout=10) as stream:
            for raw in stream:
                line = raw.decode().strip()
                if line.startswith("data:"):
                    seen.append(json.loads(line[5:]))
                    if "status" in seen[-1] and len(seen) == 6:  # the history was sent: the run writes on
                        with EventLog(work / "runs" / "cli-run", fresh=False) as log:
                            log.append({"event": "log", "step": 3, "loss": 1.25})
                if any(e.get("step") == 3 and e.get("event") == "log" for e in seen):
                    break
        events = [e for e in seen if "event" in e]
        assert [e["event"] for e in events] == ["start", "log", "log", "eval", "end", "log"]
        assert all(e["run"] == "cli-run" for e in events)
        assert seen[5]["status"] == "finished" and seen[5]["name"] == "cli-run"  # then the status message
    finally:
        server.should_exit = True
        thread.join(10)
        lines = events_path(work / "runs" / "cli-run").read_text().splitlines()
        events_path(work / "runs" / "cli-run").write_text("\n".join(lines[:-1]) + "\n")


@pytest.mark.slow
def test_a_run_started_here_is_its_own_process_stops_cleanly_and_resumes(client, work):
    import os

    response = client.post("/api/runs", headers=H, json={
        "name": "api-run", "model": "model", "data": "data/train.jsonl", "formatter": "chatml",
        "options": {"max_steps": "40", "logging_steps": "1", "per_device_train_batch_size": "2",
                    "save_steps": "0", "learning_rate": "0.01"}})
    assert response.status_code == 200, response.text
    app_pid = os.getpid()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        events = read_events(events_path(work / "runs" / "api-run"))
        if sum(e["event"] == "log" for e in events) >= 2:
            break
        time.sleep(0.1)
    else:
        raise AssertionError((work / "runs" / "api-run.run" / "output.log").read_text()[-2000:])
    start = events[0]
    assert start["pid"] != app_pid and os.getsid(start["pid"]) == start["pid"]  # its own session
    assert client.get("/api/runs/api-run", headers=H).json()["status"] == "running"
    assert client.post("/api/runs/api-run/stop", headers=H).json()["status"] == "stopping"
    while client.get("/api/runs/api-run", headers=H).json()["status"] == "running":
        time.sleep(0.1)
    summary = client.get("/api/runs/api-run", headers=H).json()
    assert summary["status"] == "stopped" and summary["can_resume"], summary
    stopped = summary["events"][-1]
    assert stopped["event"] == "stopped" and stopped["checkpoint"].endswith(f"checkpoint-{stopped['step']}")
    again = client.post("/api/runs/api-run/resume", headers=H)
    assert again.status_code == 200 and again.json()["status"] in ("starting", "running")
    deadline = time.monotonic() + 180
    while client.get("/api/runs/api-run", headers=H).json()["status"] != "finished":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    events = client.get("/api/runs/api-run", headers=H).json()["events"]
    assert [e["step"] for e in events if e["event"] == "log"][-1] == 40
    assert events[[e["event"] for e in events].index("start", 1)]["resumed_from"] == stopped["checkpoint"]
    assert (work / "runs" / "api-run" / "adapter_model.safetensors").is_file()
    assert client.post("/api/runs/api-run/stop", headers=H).status_code == 400  # finished: nothing to stop


def test_a_run_of_a_live_python_process_is_running_and_a_reused_pid_is_not(tmp_path, work):
    import os

    from finetune_sdk.studio.runs import RunsFolder

    runs = RunsFolder(tmp_path / "runs")
    with EventLog(tmp_path / "runs" / "from-python", fresh=True) as log:  # this pytest process: no "finetune" in argv
        log.append({"event": "start", "pid": os.getpid(), "max_steps": 9})
        log.append({"event": "log", "step": 1, "loss": 2.0})
    with EventLog(tmp_path / "runs" / "reused", fresh=True) as log:  # an id now held by a process started later
        log.append({"event": "start", "pid": os.getpid(), "max_steps": 9, "time": 1_000_000.0})
    summaries = {s["name"]: s for s in runs.list()}
    assert summaries["from-python"]["status"] == "running" and summaries["from-python"]["can_stop"]
    assert summaries["reused"]["status"] == "interrupted" and not summaries["reused"]["can_stop"]
    assert not summaries["reused"]["can_resume"]  # not started here: the CLI's --resume, as the message says

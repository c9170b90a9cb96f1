"""The registry stays consistent against concurrent writers and hostile or stalled remotes (issue 10, item 3)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from finetune_sdk.errors import RegistryError
from finetune_sdk.registry import Registry
from tests.hub_server import HubTestServer
from tests.safety_helpers import assert_refused, invoke

TOKEN = "hf_registry_safety_token"


def fake_result(folder: Path, unique: str, size: int = 4096) -> Path:
    """A small result folder (a manifest and weights-like files): publishing needs no model."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "finetune_manifest.json").write_text(json.dumps(
        {"format_version": 1, "technique": "lora", "task": "causal-lm", "options": {}, "base_model": {}}))
    (folder / "shared.bin.txt").write_text("shared by every version\n" * 64)
    (folder / "adapter_model.safetensors").write_bytes(unique.encode() * (size // len(unique)))
    return folder


CHURN = textwrap.dedent("""
    import random, sys
    from pathlib import Path
    from finetune_sdk.errors import IntegrityError, RegistryError
    from finetune_sdk.registry import Registry

    home, role, rounds, folders = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    registry = Registry(home)
    rng = random.Random(role)
    i = 0
    while role == "deleter" and (i < rounds or len(list(folders.glob("done-*"))) < 4):
        i += 1
        try:
            versions = [v for a in registry.list() for v in registry.versions(a["name"])]
        except RegistryError:
            continue  # every version was deleted meanwhile
        for version in rng.sample(versions, min(2, len(versions))):
            try:
                registry.delete(version.ref, force=True)
            except RegistryError:
                pass  # deleted meanwhile
        registry.collect_garbage()
        print("deleted round", i, flush=True)
    try:
        for i in range(rounds if role != "deleter" else 0):
            version = registry.publish(folders / f"{role}-{i}", "bot")
            try:
                registry.verify(version.ref)
            except IntegrityError as exc:
                print("BROKEN", exc, flush=True)
                sys.exit(3)
            except RegistryError:
                pass  # the deleter removed it already: fine
            print("published", version.ref, flush=True)
    finally:
        (folders / f"done-{role}").write_text("done")
""")


def run_churn(home: Path, folders: Path, rounds: int, pause: str) -> list[subprocess.CompletedProcess]:
    env = {**os.environ, "FINETUNE_SDK_REGISTRY_PAUSE": pause}
    procs = [subprocess.Popen([sys.executable, "-c", CHURN, str(home), role, str(rounds), str(folders)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for role in ("p0", "p1", "p2", "p3", "deleter")]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        outputs.append((proc.returncode, out, err[-2000:]))
    return outputs


def test_four_publishers_and_a_deleter_leave_every_listed_version_whole(tmp_path):
    rounds = 20
    for publisher in range(4):
        for i in range(rounds):
            fake_result(tmp_path / "folders" / f"p{publisher}-{i}", f"p{publisher}-round-{i}|")
    home = tmp_path / "registry"
    Registry(home)
    # each publish sleeps between storing its blobs and recording its version: where a deleter's garbage
    # collection used to remove the blobs of a publish in progress
    outputs = run_churn(home, tmp_path / "folders", rounds, "after_blobs:0.02")
    assert all(code == 0 for code, _, _ in outputs), outputs
    published = sum(out.count("published") for _, out, _ in outputs)
    assert published == 4 * rounds
    registry = Registry(home)
    listed = [v for a in registry.list() for v in registry.versions(a["name"])]
    for version in listed:
        registry.verify(version.ref)  # raises IntegrityError naming a missing blob
    assert len(listed) < published  # the deleter really deleted
    registry.collect_garbage()
    for version in listed:
        registry.verify(version.ref)
    assert not any(p.name.startswith(".incoming-") for p in (home / "blobs").iterdir())


@pytest.fixture
def hub(tmp_path):
    with HubTestServer(tmp_path / "hub", tokens={TOKEN}) as server:
        yield server


def push_record(hub, tmp_path, repo_id: str, edit) -> None:
    """Push a real version, then commit a registry.json changed by ``edit`` on top of it."""
    registry = Registry(tmp_path / "publisher")
    registry.publish(fake_result(tmp_path / "result", "weights|"), "good")
    registry.push("good@1", repo_id, endpoint=hub.url, token=TOKEN)
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token=TOKEN)
    record = json.loads(hub.read_file(repo_id, "registry.json"))
    edit(record)
    api.upload_file(path_or_fileobj=json.dumps(record).encode(), path_in_repo="registry.json", repo_id=repo_id)


def leftovers(home: Path) -> list[str]:
    tmp = home / "tmp"
    mine = sorted(p.name for p in tmp.iterdir()) if tmp.is_dir() else []
    system = [p for p in os.listdir(tempfile.gettempdir()) if p.startswith(("finetune-pull", "finetune-pulled"))]
    return mine + system


@pytest.mark.usefixtures("hub_online")
@pytest.mark.parametrize("edit,message", [
    (lambda r: r.update(name="../../evil"), "registry.json names the adapter badly"),
    (lambda r: r["files"].update({"../../../etc/os-release": next(iter(r["files"].values()))}),
     "registry.json lists a bad file (file '../../../etc/os-release' is not a plain relative path"),
    (lambda r: r["files"].update({"/etc/passwd": next(iter(r["files"].values()))}), "'/etc/passwd' is not a plain"),
    (lambda r: r.update(version="1; DROP TABLE"), "has version '1; DROP TABLE'"),
    (lambda r: r.update(parent="../up@1"), "has parent '../up@1'"),
    (lambda r: r["files"]["adapter_model.safetensors"].update(sha256="../x"), "no valid sha256 and size"),
])
def test_a_hostile_registry_json_is_refused_before_anything_is_stored(hub, tmp_path, edit, message):
    push_record(hub, tmp_path, "team/hostile", edit)
    home = tmp_path / "fresh"
    result = invoke(["registry", "--home", home, "pull", "hf://team/hostile", "--endpoint", hub.url])
    assert_refused(result, "hf://team/hostile", message, "refusing")
    registry = Registry(home)
    assert registry.list() == []
    assert not (home / "blobs").exists() or not any((home / "blobs").rglob("*"))
    assert leftovers(home) == []
    assert not (tmp_path / "evil").exists()


@pytest.mark.usefixtures("hub_online")
def test_a_bad_local_name_is_refused_before_any_request(hub, tmp_path):
    hub.reset_counters()
    result = invoke(["registry", "--home", tmp_path / "r", "pull", "hf://team/x", "--endpoint", hub.url,
                     "--name", "../../evil"])
    assert_refused(result, "adapter name '../../evil' is not allowed")
    assert hub.request_count == 0


@pytest.mark.usefixtures("hub_online")
def test_a_failed_pull_leaves_no_staging_folders(hub, tmp_path, monkeypatch):
    import huggingface_hub

    registry = Registry(tmp_path / "publisher")
    registry.publish(fake_result(tmp_path / "result", "weights|"), "good")
    registry.push("good@1", "team/good", endpoint=hub.url, token=TOKEN)
    real = huggingface_hub.snapshot_download

    def truncating(*args, **kwargs):
        path = Path(real(*args, **kwargs))
        (path / "adapter_model.safetensors").write_bytes(b"cut")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", truncating)
    home = tmp_path / "fresh"
    assert_refused(invoke(["registry", "--home", home, "pull", "hf://team/good@v1", "--endpoint", hub.url]),
                   "downloaded adapter_model.safetensors does not match its recorded sha256")
    assert leftovers(home) == [] and Registry(home).list() == []


@pytest.fixture
def stalled_endpoint():
    """A server that accepts connections (the kernel completes the handshake) and never answers."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


@pytest.fixture
def short_hub_timeout(monkeypatch):
    """1.5 s Hub timeouts for this test only (the client factory is process-wide: restore the default after)."""
    from finetune_sdk.network import bounded_hub_client

    monkeypatch.setenv("FINETUNE_SDK_HUB_TIMEOUT", "1.5")
    yield
    monkeypatch.delenv("FINETUNE_SDK_HUB_TIMEOUT")
    bounded_hub_client()


@pytest.mark.usefixtures("hub_online", "short_hub_timeout")
def test_a_stalled_server_is_a_bounded_one_line_error(stalled_endpoint, tmp_path):
    started = time.monotonic()
    result = invoke(["registry", "--home", tmp_path / "r", "pull", "hf://team/x@v1", "--endpoint", stalled_endpoint])
    elapsed = time.monotonic() - started
    assert_refused(result, f"resolving hf://team/x@v1 at {stalled_endpoint}: no answer within 1.5 s",
                   "is the endpoint up?")
    assert elapsed < 20
    registry = Registry(tmp_path / "r")
    registry.publish(fake_result(tmp_path / "result", "w|"), "bot")
    result = invoke(["registry", "--home", tmp_path / "r", "push", "bot@1", "team/bot", "--endpoint",
                     stalled_endpoint])
    assert_refused(result, f"at {stalled_endpoint}: no answer within 1.5 s")
    assert leftovers(tmp_path / "r") == []


@pytest.mark.slow
def test_a_stalled_server_with_default_timeouts_ends_within_60_seconds(stalled_endpoint, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                            "FINETUNE_SDK_HUB_TIMEOUT")}
    env["FINETUNE_SDK_REGISTRY"] = str(tmp_path / "r")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "finetune_sdk", "generate", "hf://team/x@v1", "hi", "--max-new-tokens",
                           "1"], env={**env, "HF_ENDPOINT": stalled_endpoint}, capture_output=True, text=True,
                          timeout=90)
    elapsed = time.monotonic() - started
    assert elapsed < 60, elapsed
    assert proc.returncode == 2, proc.stderr
    assert f"at {stalled_endpoint}: no answer within 10 s" in proc.stderr and "Traceback" not in proc.stderr


def test_a_corrupt_index_a_file_home_and_bad_repo_ids_are_one_line_errors(tmp_path):
    home = tmp_path / "reg"
    home.mkdir()
    (home / "index.db").write_bytes(b"this is not an sqlite database, just garbage " * 20)
    assert_refused(invoke(["registry", "--home", home, "list"]), f"registry index {home / 'index.db'} is damaged",
                   "move it aside")
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_refused(invoke(["registry", "--home", afile, "list"]), f"registry home {afile} is a file")
    assert afile.read_text() == "x"
    for ref in ("hf://org/re..po", "hf://org/-repo", "hf://org/repo-", "hf://o--rg/repo"):
        assert_refused(invoke(["registry", "--home", tmp_path / "ok", "pull", ref]), "a Hub repo id reads org/name")
    with pytest.raises(RegistryError, match="a Hub repo id reads org/name"):
        Registry(tmp_path / "ok").push("x@1", "org/re..po")


def test_a_bad_stored_file_list_never_escapes_the_checkout_folder(tmp_path):
    registry = Registry(tmp_path / "reg")
    version = registry.publish(fake_result(tmp_path / "result", "w|"), "bot")
    files = dict(version.files)
    files["../../escaped.txt"] = files["shared.bin.txt"]
    with registry.index.write() as db:  # a row written by an older, unvalidated pull
        db.execute("UPDATE versions SET files = ? WHERE name = 'bot'", (json.dumps(files),))
    with pytest.raises(RegistryError, match="'../../escaped.txt' is not a plain relative path"):
        registry.path("bot@1")
    assert not (tmp_path / "reg" / "escaped.txt").exists() and not (tmp_path / "escaped.txt").exists()

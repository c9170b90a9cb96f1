"""Drive the local Hub-protocol test server (tests/hub_server.py) with the REAL huggingface_hub client.

The suite runs with HF_HUB_OFFLINE=1 and HF_HUB_DISABLE_XET=1 (tests/conftest.py); the `hub_online` fixture lifts
offline mode for these tests only (huggingface_hub reads `constants.HF_HUB_OFFLINE` at call time).
"""

from __future__ import annotations

import hashlib
import os
import random

import huggingface_hub
import pytest
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.hub_server import HubTestServer, git_blob_oid

pytestmark = pytest.mark.usefixtures("hub_online")

TOKEN = "hf_test_token"
README_V1 = "---\nlicense: apache-2.0\nlibrary_name: peft\ntags:\n- lora\n---\n\n# Adapter\n\nFirst version.\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with HubTestServer(tmp_path_factory.mktemp("hub-root"), tokens={TOKEN}) as srv:
        yield srv
        assert srv.errors == [], "unexpected server-side exceptions:\n" + "\n".join(srv.errors)


@pytest.fixture()
def api(server):
    return HfApi(endpoint=server.url, token=TOKEN)


def _write_folder(folder, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


def test_client_is_configured_for_plain_lfs():
    assert constants.HF_HUB_DISABLE_XET is True
    assert constants.is_offline_mode() is False
    assert huggingface_hub.__version__.startswith("2.")


def test_push_tag_branch_and_pull_roundtrip(server, api, tmp_path):
    repo_id = "org/adapter-roundtrip"
    url = api.create_repo(repo_id, private=True)
    assert url.repo_id == repo_id and url.startswith(server.url)
    # exist_ok works, and a second create without it is a 409
    assert api.create_repo(repo_id, private=True, exist_ok=True).repo_id == repo_id
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_repo(repo_id)
    assert exc.value.response.status_code == 409

    info = api.model_info(repo_id)
    assert info.private is True and len(info.sha) == 40
    assert [s.rfilename for s in info.siblings] == [".gitattributes"]

    # --- v1: small json, README with YAML header, 2 MiB safetensors (LFS)
    weights = random.Random(0).randbytes(2 * 1024 * 1024)
    v1 = {
        "adapter_config.json": b'{"r": 8, "lora_alpha": 16}\n',
        "README.md": README_V1.encode(),
        "adapter_model.safetensors": weights,
    }
    folder = tmp_path / "out"
    _write_folder(folder, v1)
    server.reset_counters()
    c1 = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="v1")
    assert len(c1.oid) == 40 and c1.commit_url.endswith(f"/{repo_id}/commit/{c1.oid}")
    calls = server.requests
    assert ("POST", "/api/validate-yaml") in calls
    assert ("POST", f"/api/models/{repo_id}/preupload/main") in calls
    assert ("POST", f"/{repo_id}.git/info/lfs/objects/batch") in calls
    assert ("POST", f"/api/models/{repo_id}/commit/main") in calls
    puts = [r for r in server.request_log if r["method"] == "PUT"]
    assert len(puts) == 1 and puts[0]["path"] == "/lfs-upload/" + hashlib.sha256(weights).hexdigest()
    assert puts[0]["authorization"] is None and puts[0]["status"] == 200  # presigned URL: no token sent
    assert all(r["authorization"] == f"Bearer {TOKEN}" for r in server.request_log if r["method"] != "PUT")
    assert set(server.seen_tokens) == {f"Bearer {TOKEN}"}
    api.create_tag(repo_id, tag="v1", tag_message="first")

    tree = {f.path: f for f in api.list_repo_tree(repo_id, recursive=True)}
    assert tree["adapter_model.safetensors"].lfs.sha256 == hashlib.sha256(weights).hexdigest()
    assert tree["adapter_model.safetensors"].size == len(weights)
    assert tree["adapter_config.json"].lfs is None
    assert tree["adapter_config.json"].blob_id == git_blob_oid(v1["adapter_config.json"])

    # --- v2: change the config, add a file; the unchanged LFS file must not be re-uploaded
    v2 = dict(v1, **{"adapter_config.json": b'{"r": 16, "lora_alpha": 32}\n', "extra/notes.txt": b"v2 notes\n"})
    _write_folder(folder, v2)
    server.reset_counters()
    c2 = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="v2")
    assert c2.oid != c1.oid
    assert not any(m == "PUT" for m, _ in server.requests)
    api.create_tag(repo_id, tag="v2")
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_tag(repo_id, tag="v2")
    assert exc.value.response.status_code == 409
    api.create_tag(repo_id, tag="v2", exist_ok=True)

    # --- branches & refs
    api.create_branch(repo_id, branch="dev", revision="v1")
    refs = api.list_repo_refs(repo_id)
    assert {b.name: b.target_commit for b in refs.branches} == {"main": c2.oid, "dev": c1.oid}
    assert {t.name: t.target_commit for t in refs.tags} == {"v1": c1.oid, "v2": c2.oid}
    assert refs.tags[0].ref == "refs/tags/v1" and refs.converts == []
    assert api.model_info(repo_id, revision="dev").sha == c1.oid
    api.delete_branch(repo_id, branch="dev")
    assert [b.name for b in api.list_repo_refs(repo_id).branches] == ["main"]
    commits = api.list_repo_commits(repo_id)
    assert [c.commit_id for c in commits[:2]] == [c2.oid, c1.oid] and len(commits) == 3
    assert commits[0].title == "v2"

    # --- pull v1 by tag: byte-identical v1 files, nothing from v2
    snap = snapshot_download(repo_id, revision="v1", endpoint=server.url, token=TOKEN, cache_dir=tmp_path / "cache")
    pulled = {
        os.path.relpath(os.path.join(d, f), snap).replace(os.sep, "/"): open(os.path.join(d, f), "rb").read()
        for d, _, fs in os.walk(snap)
        for f in fs
    }
    pulled.pop(".gitattributes")  # created by the server with the repo, like on the real Hub
    assert pulled == v1
    assert os.path.basename(snap) == c1.oid

    # --- single file at v2 / main
    path = hf_hub_download(
        repo_id, "adapter_config.json", endpoint=server.url, token=TOKEN, cache_dir=tmp_path / "cache2"
    )
    assert open(path, "rb").read() == v2["adapter_config.json"]
    path = hf_hub_download(
        repo_id, "adapter_model.safetensors", revision="v2", endpoint=server.url, token=TOKEN,
        local_dir=tmp_path / "local",
    )
    assert open(path, "rb").read() == weights
    assert server.read_file(repo_id, "extra/notes.txt", revision="v2") == b"v2 notes\n"


def test_auth_and_error_mapping(server, api, tmp_path):
    repo_id = "org/private-errors"
    api.create_repo(repo_id, private=True)
    api.upload_file(repo_id=repo_id, path_or_fileobj=b"hello\n", path_in_repo="a.txt")

    # writes without a token (or with a bad one) are 401s
    anon = HfApi(endpoint=server.url, token=False)
    bad = HfApi(endpoint=server.url, token="hf_wrong")
    for client in (anon, bad):
        with pytest.raises(HfHubHTTPError) as exc:
            client.create_repo("org/should-not-exist")
        assert exc.value.response.status_code == 401
        with pytest.raises(HfHubHTTPError) as exc:
            client.upload_file(repo_id=repo_id, path_or_fileobj=b"x", path_in_repo="b.txt")
        assert exc.value.response.status_code == 401
        with pytest.raises(HfHubHTTPError) as exc:
            client.create_tag(repo_id, tag="nope")
        assert exc.value.response.status_code == 401
    assert not server.repo_exists("org/should-not-exist")
    assert "Bearer hf_wrong" in server.seen_tokens

    # private repo is invisible without a token
    with pytest.raises(RepositoryNotFoundError):
        anon.model_info(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo_id, "a.txt", endpoint=server.url, token=False, cache_dir=tmp_path / "c0")

    # unknown repo / revision / file
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/does-not-exist")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/does-not-exist", "a.txt", endpoint=server.url, token=TOKEN, cache_dir=tmp_path / "c1")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo_id, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(repo_id, revision="v9", endpoint=server.url, token=TOKEN, cache_dir=tmp_path / "c2")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "missing.txt", endpoint=server.url, token=TOKEN, cache_dir=tmp_path / "c3")
    assert api.file_exists(repo_id, "a.txt") and not api.file_exists(repo_id, "missing.txt")

    # stale parent commit is rejected
    head = api.model_info(repo_id).sha
    api.upload_file(repo_id=repo_id, path_or_fileobj=b"v2\n", path_in_repo="a.txt")
    with pytest.raises(HfHubHTTPError) as exc:
        api.upload_file(repo_id=repo_id, path_or_fileobj=b"v3\n", path_in_repo="a.txt", parent_commit=head)
    assert exc.value.response.status_code == 412


def test_fail_next_is_visible_and_retries_are_bounded(server, api):
    repo_id = "org/flaky"
    api.create_repo(repo_id)

    # a non-retried call surfaces the injected status, after exactly one request
    before = server.request_count
    server.fail_next(1, status=500)
    with pytest.raises(HfHubHTTPError) as exc:
        api.model_info(repo_id)
    assert exc.value.response.status_code == 500
    assert server.request_count == before + 1

    # a retried call (tree listing uses http_backoff) recovers after one injected 503
    server.reset_counters()
    server.fail_next(1, status=503)
    assert api.list_repo_files(repo_id) == [".gitattributes"]
    assert server.requests == [("GET", f"/api/models/{repo_id}/tree/main")] * 2
    assert [r["status"] for r in server.request_log] == [503, 200]

    # everything is fine again afterwards
    assert api.model_info(repo_id).id == repo_id

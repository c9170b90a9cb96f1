"""Pushing versions to, and pulling them from, the Hugging Face Hub (or a self-hosted Hub-compatible server).

Layout: one model repo per adapter. Each pushed version is one commit on ``main`` holding the result's files, the
manifest, ``registry.json`` (name, version, parent, file hashes) and a model card, tagged ``v<N>``. Aliases are
branches pointing at a version's commit, moved when the alias moves.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from finetune_sdk.errors import IntegrityError, RegistryError
from finetune_sdk.fsutil import sha256_file, write_json_atomic
from finetune_sdk.training.manifest import read_manifest
from finetune_sdk.network import TIMEOUT_ENV, bounded_hub_client, hub_timeout, resolve_endpoint
from finetune_sdk.registry.local import AdapterVersion, LocalRegistry
from finetune_sdk.registry.locks import publishing
from finetune_sdk.registry.model_card import model_card
from finetune_sdk.registry.record import read_record, scratch
from finetune_sdk.registry.refs import inside, parse_ref, validate_name, validate_repo_id

REGISTRY_FILE = "registry.json"
ARTIFACTS = "artifacts"
ATTEMPTS = 3
T = TypeVar("T")


def _call(endpoint: str, what: str, fn: Callable[[], T]) -> T:
    """Run a Hub call with bounded retries on server errors and connection failures; errors name the endpoint.

    Tokens never appear in messages: huggingface_hub errors are reduced to their status and server message.
    """
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    delay = 0.25
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return fn()
        except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
            raise RegistryError(f"{what} at {endpoint}: {_status(exc)} not found "
                                "(check the repo name and revision; private repos need a token)") from None
        except HfHubHTTPError as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status in (401, 403):
                raise RegistryError(f"{what} at {endpoint} was refused ({status}): a valid token with write access is"
                                    " needed (set HF_TOKEN or run `hf auth login`)") from None
            if status is not None and status < 500 and status != 429:
                raise RegistryError(f"{what} at {endpoint} failed: {_status(exc)}") from None
            reason = f"HTTP {status}"
        except OSError as exc:  # connection refused, DNS, timeouts (httpx errors are OSError subclasses or wrap them)
            reason = type(exc).__name__
            if isinstance(exc, TimeoutError):
                raise _no_answer(what, endpoint) from None
        except Exception as exc:  # noqa: BLE001 - httpx transport errors aren't OSError
            if type(exc).__module__.split(".")[0].rstrip("0123456789") not in ("httpx", "httpcore", "requests",
                                                                                 "urllib"):
                raise
            if "Timeout" in type(exc).__name__:  # a stalled server stays stalled: no retry
                raise _no_answer(what, endpoint) from None
            reason = type(exc).__name__
        if attempt < ATTEMPTS:
            time.sleep(delay)
            delay *= 2
    raise RegistryError(f"{what} at {endpoint} failed after {ATTEMPTS} attempts ({reason}); is the endpoint up?")


def _no_answer(what: str, endpoint: str) -> RegistryError:
    return RegistryError(f"{what} at {endpoint}: no answer within {hub_timeout():g} s (the server accepted the "
                         f"connection but sent nothing); is the endpoint up? ({TIMEOUT_ENV} sets the timeout)")


def _status(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", "")
    message = (getattr(response, "headers", {}) or {}).get("X-Error-Message", "") if response is not None else ""
    return f"{code} {message}".strip()


def _api(endpoint: str, token: str | None, what: str) -> Any:
    from huggingface_hub import HfApi

    _check_online(what)
    bounded_hub_client()
    return HfApi(endpoint=endpoint, token=token)


def _check_online(what: str) -> None:
    """Refuse a Hub call under ``HF_HUB_OFFLINE`` in one line, before any request (huggingface_hub would refuse
    each request, which reads as a failing endpoint after the retries)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise RegistryError(f"{what}: Hugging Face Hub offline mode is on (HF_HUB_OFFLINE=1), so nothing can be "
                            "downloaded or uploaded; unset HF_HUB_OFFLINE (a version pulled before, hf://org/repo@vN, "
                            "loads offline)")


def _no_progress_bars() -> type:
    """A tqdm class for huggingface_hub calls that draws nothing: a pull reports itself in one line (its own
    activity, or its one-line error), without "Fetching N files" bars."""
    from huggingface_hub.utils import tqdm as hub_tqdm

    class NoBars(hub_tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return NoBars


def push(registry: LocalRegistry, ref: str, repo_id: str, *, endpoint: str | None = None, token: str | None = None,
         private: bool = False) -> dict[str, Any]:
    """Push a version to ``repo_id``: create the repo if needed, commit the files, tag ``v<N>``, move aliases.

    The token comes from the argument, else from where huggingface_hub reads it (``HF_TOKEN``, saved login).
    """
    validate_repo_id(repo_id)
    _check_online(f"pushing {ref} to {repo_id}")
    version = registry.resolve(ref)
    source = registry.path(version.ref)  # every stored file and the checkout re-hashed before any network call
    endpoint = resolve_endpoint(endpoint)
    api = _api(endpoint, token, f"pushing {version.ref} to {repo_id}")
    _call(endpoint, f"creating {repo_id}", lambda: api.create_repo(repo_id, private=private, exist_ok=True))
    with scratch(registry.home, "push") as folder:
        for rel in version.files:
            target = inside(folder, rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / rel, target)
        extra = registry.artifacts(version.ref)
        for file, info in extra.items():
            registry.blobs.copy_to(info["sha256"], inside(folder, f"{ARTIFACTS}/{validate_name(file, 'artifact')}"),
                                   f"{version.ref}: {file}")
        write_json_atomic(folder / REGISTRY_FILE, {
            "name": version.name, "version": version.version, "parent": version.parent,
            "description": version.description, "created": version.created, "tags": version.tags,
            "files": version.files, "artifacts": extra})
        card = model_card(version, repo_id, artifacts=extra, scores=registry.scores(version.ref))
        (folder / "README.md").write_text(card, encoding="utf-8")
        commit = _call(endpoint, f"pushing {version.ref} to {repo_id}", lambda: api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), commit_message=f"{version.name} v{version.version}",
            delete_patterns=["*"]))
    sha = commit.oid
    tag = f"v{version.version}"
    refs = _call(endpoint, f"listing refs of {repo_id}", lambda: api.list_repo_refs(repo_id))
    if any(t.name == tag for t in refs.tags):
        _call(endpoint, f"moving tag {tag}", lambda: api.delete_tag(repo_id, tag=tag))
    _call(endpoint, f"tagging {tag}", lambda: api.create_tag(repo_id, tag=tag, revision=sha,
                                                            tag_message=f"{version.name} v{version.version}"))
    branches = {b.name for b in refs.branches}
    for alias in version.aliases:
        if alias in branches:
            _call(endpoint, f"moving alias {alias}", lambda a=alias: api.delete_branch(repo_id, branch=a))
        _call(endpoint, f"setting alias {alias}", lambda a=alias: api.create_branch(repo_id, branch=a, revision=sha))
    return {"repo_id": repo_id, "commit": sha, "tag": tag, "aliases": version.aliases,
            "url": f"{endpoint}/{repo_id}/tree/{tag}"}


def pull(registry: LocalRegistry, ref: str, *, endpoint: str | None = None, token: str | None = None,
         name: str | None = None) -> AdapterVersion:
    """Pull ``hf://org/repo[@vN|@alias|@commit]`` into the local registry and return the local version.

    The revision is resolved to a commit, downloaded with ``snapshot_download`` at that exact commit, and every
    file is checked against ``registry.json``'s sha256 before anything is stored. A version pulled before
    (``@vN`` or a commit) is served locally without network.
    """
    parsed = parse_ref(ref)
    if not parsed.is_hub:
        raise RegistryError(f"{ref!r} is not a Hub reference; pull takes hf://org/repo[@v3]")
    if name is not None:
        validate_name(name)
    endpoint = resolve_endpoint(endpoint)
    revision = parsed.revision or "main"
    immutable = revision[:1] == "v" and revision[1:].isdigit() or len(revision) == 40
    cached = registry._remote_version(parsed, endpoint)
    if cached is not None and immutable:
        return cached
    from huggingface_hub import snapshot_download

    api = _api(endpoint, token, f"pulling {parsed}")
    info = _call(endpoint, f"resolving {parsed}", lambda: api.model_info(parsed.repo_id, revision=revision))
    sha = info.sha
    if cached is not None and _remote_commit(registry, endpoint, parsed.repo_id, revision) == sha:
        return cached
    with scratch(registry.home, "pull") as download, scratch(registry.home, "pulled") as stage:
        _call(endpoint, f"downloading {parsed}", lambda: snapshot_download(
            parsed.repo_id, revision=sha, endpoint=endpoint, token=token, local_dir=download,
            etag_timeout=hub_timeout(), tqdm_class=_no_progress_bars()))
        record = read_record(download / REGISTRY_FILE, f"{parsed} (commit {sha[:12]})")
        for rel, meta in record["files"].items():
            path = inside(download, rel)
            if not path.is_file() or path.is_symlink():
                raise IntegrityError(f"{parsed}: {rel} listed in {REGISTRY_FILE} was not downloaded")
            actual = sha256_file(path)
            if actual != meta["sha256"] or path.stat().st_size != meta["size"]:
                raise IntegrityError(f"{parsed}: downloaded {rel} does not match its recorded sha256 "
                                     f"({actual[:12]}... instead of {meta['sha256'][:12]}...)")
        for rel in record["files"]:
            target = inside(stage, rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(download / rel, target)
        manifest = read_manifest(stage)
        local = _store(registry, stage, manifest, record, name or record["name"], parsed, endpoint, sha)
        _store_artifacts(registry, local.ref, download, record, parsed)
        return local


def _store_artifacts(registry: LocalRegistry, ref: str, download: Path, record: dict[str, Any], parsed: Any) -> None:
    """Attach the pulled version's artifacts (``artifacts/`` in the repo), each checked against its sha256."""
    artifacts = record.get("artifacts") or {}
    if not isinstance(artifacts, dict) or not all(isinstance(meta, dict) for meta in artifacts.values()):
        raise RegistryError(f"{parsed}: {REGISTRY_FILE} lists artifacts that are not objects; refusing to pull it")
    for file, meta in artifacts.items():
        path = download / ARTIFACTS / validate_name(file, "artifact file name")
        if not path.is_file() or path.is_symlink() or sha256_file(path) != meta.get("sha256"):
            raise IntegrityError(f"{parsed}: artifact {file} is missing or does not match its recorded sha256")
        registry.attach(ref, path, kind=str(meta.get("kind", "file")), metadata=meta.get("metadata") or {})


def _remote_commit(registry: LocalRegistry, endpoint: str, repo_id: str, revision: str) -> str | None:
    with registry.index.read() as db:
        row = db.execute("SELECT commit_sha FROM remotes WHERE endpoint = ? AND repo_id = ? AND revision = ?",
                         (endpoint, repo_id, revision)).fetchone()
    return row[0] if row else None


def _store(registry: LocalRegistry, folder: Path, manifest: dict[str, Any], record: dict[str, Any], name: str,
           parsed: Any, endpoint: str, sha: str) -> AdapterVersion:
    with publishing(registry.home):  # garbage collection waits until the version's row is in
        return _store_locked(registry, folder, manifest, record, name, parsed, endpoint, sha)


def _store_locked(registry: LocalRegistry, folder: Path, manifest: dict[str, Any], record: dict[str, Any], name: str,
                  parsed: Any, endpoint: str, sha: str) -> AdapterVersion:
    files = registry._store_files(folder)
    version = int(record["version"])
    try:
        existing = registry.resolve(f"{name}@{version}")
    except RegistryError:
        existing = None
    if existing is not None and existing.files != files:
        raise RegistryError(f"local {existing.ref} differs from {parsed}; pull it under another name (name=...)")
    if existing is None:
        existing = registry._insert(name, version, manifest, files, record.get("description", ""),
                                    record.get("parent"), [], list(record.get("tags") or []), str(parsed))
    with registry.index.write() as db:
        for revision in {parsed.revision or "main", f"v{version}", sha}:
            db.execute("INSERT OR REPLACE INTO remotes VALUES (?, ?, ?, ?, ?, ?)",
                       (endpoint, parsed.repo_id, revision, name, version, sha))
    return registry.resolve(existing.ref)

"""A local, stdlib-only HTTP server speaking the subset of the Hugging Face Hub protocol used by
the real ``huggingface_hub`` (2.4) client for repo creation, commits (regular + LFS), refs,
listings and downloads.

Usage (the client reads ``HF_HUB_DISABLE_XET`` at import time, so set it first)::

    os.environ["HF_HUB_DISABLE_XET"] = "1"
    from huggingface_hub import HfApi, snapshot_download

    with HubTestServer(tmp_path / "hub") as server:
        api = HfApi(endpoint=server.url, token="hf_test_token")
        api.create_repo("org/model", private=True)
        api.upload_folder(repo_id="org/model", folder_path=...)
        snapshot_download("org/model", endpoint=server.url, token="hf_test_token", cache_dir=...)

Endpoints (``{t}`` is ``models``/``datasets``/``spaces``; ``{p}`` is the URL prefix ``""``/
``datasets/``/``spaces/``; revisions and tree paths may be ``%2F``-quoted):

    POST   /api/repos/create                    {name, organization, type, visibility|private}
    DELETE /api/repos/delete                    {name, organization, type}
    GET    /api/whoami-v2
    POST   /api/validate-yaml                   -> {"errors": [], "warnings": []}
    GET    /api/{t}/{repo}[/revision/{rev}]     repo info (sha, siblings, private, ...; ?blobs=1)
    PUT    /api/{t}/{repo}/settings             {visibility|private, gated}
    POST   /api/{t}/{repo}/preupload/{rev}      {files: [{path, size, sample}]} -> uploadMode/oid
    POST   /api/{t}/{repo}/commit/{rev}         NDJSON (header/file/lfsFile/deletedFile/deletedFolder)
    POST   /api/{t}/{repo}/tag/{rev}            {tag, message}
    DELETE /api/{t}/{repo}/tag/{tag}
    POST   /api/{t}/{repo}/branch/{name}        {startingPoint}
    DELETE /api/{t}/{repo}/branch/{name}
    GET    /api/{t}/{repo}/refs[?include_prs=1]
    GET    /api/{t}/{repo}/commits/{rev}
    GET    /api/{t}/{repo}/tree/{rev}[/{path}]  ?recursive=&expand=
    POST   /api/{t}/{repo}/paths-info/{rev}     form or JSON {paths, expand}
    POST   /{p}{repo}.git/info/lfs/objects/batch
    POST   /{p}{repo}.git/info/lfs/objects/verify
    PUT    /lfs-upload/{sha256}?size=&sig=      presigned-style upload URL (no token needed)
    GET    /lfs-objects/{sha256}?sig=           presigned-style download URL (batch "download")
    HEAD/GET /{p}{repo}/resolve/{rev}/{path}    X-Repo-Commit, ETag / X-Linked-Etag, Range support

Storage (under ``root``): ``blobs/<sha256>`` content-addressed file contents (shared by all
repos, also the LFS object store); ``repos/<type>/<namespace>/<name>/repo.json`` (visibility,
branches, tags, PR refs); ``repos/.../commits/<sha>.json`` one snapshot per commit
(``files: {path: {sha256, size, lfs, oid}}``). Commit ids are real git commit hashes computed
from the git tree of the snapshot, the parent, author, date and message.

Test hooks: ``fail_next(n, status)``, ``request_count``, ``requests`` (list of ``(method, path)``),
``request_log`` (one dict per request: method, path, query, authorization, status),
``seen_tokens`` (every ``Authorization`` header value received, in order), ``errors`` (tracebacks
of unexpected server-side exceptions), ``page_size`` (set to an int to paginate tree/commit
listings with ``Link: <...>; rel="next"``).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import html
import json
import os
import pathlib
import re
import secrets
import shutil
import socket
import tempfile
import threading
import time
import traceback
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterable
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

__all__ = ["HubTestServer"]

DEFAULT_BRANCH = "main"
LFS_THRESHOLD = 1024 * 1024  # files >= 1 MiB go through LFS
LFS_SUFFIXES = (".safetensors",)

_API_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_API_OPS = {
    "revision",
    "preupload",
    "commit",
    "tag",
    "branch",
    "refs",
    "commits",
    "tree",
    "paths-info",
    "settings",
}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)

_DEFAULT_GITATTRIBUTES = b"""*.7z filter=lfs diff=lfs merge=lfs -text
*.bin filter=lfs diff=lfs merge=lfs -text
*.ckpt filter=lfs diff=lfs merge=lfs -text
*.gguf filter=lfs diff=lfs merge=lfs -text
*.h5 filter=lfs diff=lfs merge=lfs -text
*.onnx filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.pth filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
"""


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _now_iso() -> str:
    now = datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def git_blob_oid(data: bytes) -> str:
    """git's object id of a blob (``git hash-object``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().lower() in ("1", "true", "yes", "on")


def _header_safe(text: str) -> str:
    text = " ".join(str(text).split())
    return text.encode("latin-1", "replace").decode("latin-1")[:1000]


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})


def _repo_not_found(status: int = 404) -> _HubError:
    return _HubError(status, "Repository not found", "RepoNotFound")


def _validate_path(path: str) -> str:
    if not isinstance(path, str) or not path or path.startswith("/") or path.endswith("/"):
        raise _HubError(400, f"Invalid path in repo: {path!r}")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts) or parts[0] == ".git":
        raise _HubError(400, f"Invalid path in repo: {path!r}")
    return path


# ----------------------------------------------------------------------------------------------
# storage
# ----------------------------------------------------------------------------------------------


class _Store:
    """On-disk, content-addressed storage. All calls must hold ``lock`` except blob reads."""

    def __init__(self, root: pathlib.Path):
        self.root = pathlib.Path(root)
        self.blobs = self.root / "blobs"
        self.repos = self.root / "repos"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.repos.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self._repo_cache: dict[tuple[str, str], dict] = {}
        self._commit_cache: dict[tuple[str, str, str], dict] = {}

    # blobs --------------------------------------------------------------------------------
    def blob_path(self, sha256: str) -> pathlib.Path:
        return self.blobs / sha256

    def has_blob(self, sha256: str) -> bool:
        return _SHA256_RE.match(sha256 or "") is not None and self.blob_path(sha256).is_file()

    def put_blob(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        dest = self.blob_path(sha)
        if not dest.is_file():
            fd, tmp = tempfile.mkstemp(dir=self.blobs, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, dest)
        return sha

    def read_blob(self, sha256: str) -> bytes:
        return self.blob_path(sha256).read_bytes()

    # json -------------------------------------------------------------------------------------
    @staticmethod
    def _write_json(path: pathlib.Path, data: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)

    # repos ------------------------------------------------------------------------------------
    def repo_dir(self, rtype: str, repo_id: str) -> pathlib.Path:
        return self.repos.joinpath(rtype, *repo_id.split("/"))

    def load_repo(self, rtype: str, repo_id: str) -> dict | None:
        key = (rtype, repo_id)
        if key in self._repo_cache:
            return self._repo_cache[key]
        path = self.repo_dir(rtype, repo_id) / "repo.json"
        if not path.is_file():
            return None
        state = json.loads(path.read_text(encoding="utf-8"))
        self._repo_cache[key] = state
        return state

    def save_repo(self, state: dict) -> None:
        key = (state["type"], state["id"])
        self._repo_cache[key] = state
        self._write_json(self.repo_dir(*key) / "repo.json", state)

    def delete_repo(self, rtype: str, repo_id: str) -> None:
        self._repo_cache.pop((rtype, repo_id), None)
        for k in [k for k in self._commit_cache if k[:2] == (rtype, repo_id)]:
            del self._commit_cache[k]
        shutil.rmtree(self.repo_dir(rtype, repo_id), ignore_errors=True)

    # commits ----------------------------------------------------------------------------------
    def load_commit(self, rtype: str, repo_id: str, sha: str) -> dict | None:
        key = (rtype, repo_id, sha)
        if key in self._commit_cache:
            return self._commit_cache[key]
        if not _SHA1_RE.match(sha):
            return None
        path = self.repo_dir(rtype, repo_id) / "commits" / f"{sha}.json"
        if not path.is_file():
            return None
        commit = json.loads(path.read_text(encoding="utf-8"))
        self._commit_cache[key] = commit
        return commit

    def save_commit(self, rtype: str, repo_id: str, commit: dict) -> None:
        self._commit_cache[(rtype, repo_id, commit["id"])] = commit
        self._write_json(self.repo_dir(rtype, repo_id) / "commits" / f"{commit['id']}.json", commit)


# ----------------------------------------------------------------------------------------------
# git-like tree helpers
# ----------------------------------------------------------------------------------------------


def _nested(files: dict[str, dict]) -> dict:
    root: dict = {}
    for path, entry in files.items():
        node = root
        parts = path.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = entry
    return root


def _is_file_entry(node: Any) -> bool:
    return isinstance(node, dict) and "sha256" in node and "oid" in node


def _tree_oid(node: dict) -> str:
    """Real git tree object id of a nested {name: entry|subtree} dict."""

    def sort_key(name: str) -> str:
        return name if _is_file_entry(node[name]) else name + "/"

    body = b""
    for name in sorted(node, key=sort_key):
        child = node[name]
        if _is_file_entry(child):
            body += b"100644 " + name.encode() + b"\0" + bytes.fromhex(child["oid"])
        else:
            body += b"40000 " + name.encode() + b"\0" + bytes.fromhex(_tree_oid(child))
    return hashlib.sha1(b"tree %d\0" % len(body) + body).hexdigest()


def _dir_paths(files: dict[str, dict]) -> set[str]:
    dirs = set()
    for path in files:
        parts = path.split("/")
        for i in range(1, len(parts)):
            dirs.add("/".join(parts[:i]))
    return dirs


def _subtree(files: dict[str, dict], directory: str) -> dict:
    node = _nested(files)
    for part in directory.split("/") if directory else []:
        node = node[part]
    return node


# ----------------------------------------------------------------------------------------------
# request handler
# ----------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "HubTestServer/1.0"
    timeout = 60

    @property
    def hub(self) -> "HubTestServer":
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        if self.hub.verbose:
            super().log_message(format, *args)

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch()

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch()

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch()

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch()

    # low level io -------------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                line = self.rfile.readline()
                if not line:
                    break
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: dict | None = None,
        content_type: str = "application/json; charset=utf-8",
        content_length: int | None = None,
    ) -> None:
        self._log_entry["status"] = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("X-Request-Id", self._request_id)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, data: Any, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers=headers)

    def _send_error(self, err: _HubError) -> None:
        headers = {"X-Error-Message": _header_safe(err.message), **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._json({"error": err.message}, status=err.status, headers=headers)

    # dispatch ---------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        hub = self.hub
        self._request_id = uuid.uuid4().hex
        split = urlsplit(self.path)
        self._raw_path = split.path
        self._query = parse_qs(split.query, keep_blank_values=True)
        self._query_string = split.query
        body = self._read_body()
        auth_header = self.headers.get("Authorization")
        self._log_entry = {
            "method": self.command,
            "path": split.path,
            "query": split.query,
            "authorization": auth_header,
            "status": None,
        }
        with hub._meta_lock:
            hub.request_count += 1
            hub.requests.append((self.command, split.path))
            hub.request_log.append(self._log_entry)
            if auth_header is not None:
                hub.seen_tokens.append(auth_header)
            injected = None
            if hub._fail_remaining > 0:
                hub._fail_remaining -= 1
                injected = hub._fail_status
        try:
            if injected is not None:
                raise _HubError(injected, f"Injected failure (HTTP {injected})")
            self._route(body, auth_header)
        except _HubError as err:
            self._send_error(err)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # pragma: no cover - surfaced to tests through `server.errors`
            hub.errors.append(traceback.format_exc())
            try:
                self._send_error(_HubError(500, f"Internal test-server error: {exc!r}"))
            except OSError:
                self.close_connection = True

    def _param(self, name: str, default: str | None = None) -> str | None:
        values = self._query.get(name)
        return values[-1] if values else default

    def _route(self, body: bytes, auth_header: str | None) -> None:
        segs = [unquote(s) for s in self._raw_path.split("/")[1:]]
        raw_segs = self._raw_path.split("/")[1:]
        method = self.command

        # Presigned-style object URLs: no Authorization involved at all.
        if len(segs) == 2 and segs[0] == "lfs-upload" and method == "PUT":
            return self._lfs_put(segs[1], body)
        if len(segs) == 2 and segs[0] == "lfs-objects" and method in ("GET", "HEAD"):
            return self._lfs_get(segs[1])

        user = self._authenticate(auth_header)

        if segs[:1] == ["api"]:
            if segs[1:] == ["repos", "create"] and method == "POST":
                return self._create_repo(body, user)
            if segs[1:] == ["repos", "delete"] and method == "DELETE":
                return self._delete_repo(body, user)
            if segs[1:] == ["whoami-v2"] and method == "GET":
                if user is None:
                    raise _HubError(401, "Invalid credentials in Authorization header")
                return self._json(self._whoami(user))
            if segs[1:] == ["validate-yaml"] and method == "POST":
                return self._validate_yaml(body)
            if len(segs) >= 3 and segs[1] in _API_TYPES:
                return self._repo_api(_API_TYPES[segs[1]], raw_segs[2:], body, user)
            raise _HubError(404, f"Unknown API route: {method} {self._raw_path}")

        # /{prefix}{repo}.git/info/lfs/objects/{batch,verify}
        for i, seg in enumerate(segs):
            if seg.endswith(".git") and segs[i + 1 : i + 4] == ["info", "lfs", "objects"] and len(segs) == i + 5:
                rtype, repo_id = self._split_type(segs[: i] + [seg[: -len(".git")]])
                if method == "POST" and segs[i + 4] == "batch":
                    return self._lfs_batch(rtype, repo_id, body, user)
                if method == "POST" and segs[i + 4] == "verify":
                    return self._lfs_verify(rtype, repo_id, body, user)
                break

        # /{prefix}{repo}/resolve/{rev}/{path}
        if "resolve" in segs and method in ("GET", "HEAD"):
            idx = segs.index("resolve")
            if 1 <= idx and len(segs) >= idx + 3:
                rtype, repo_id = self._split_type(segs[:idx])
                revision = segs[idx + 1]
                filename = "/".join(segs[idx + 2 :])
                return self._resolve(rtype, repo_id, revision, filename, user)

        raise _HubError(404, f"Unknown route: {method} {self._raw_path}")

    @staticmethod
    def _split_type(parts: list[str]) -> tuple[str, str]:
        if len(parts) >= 2 and parts[0] in ("datasets", "spaces"):
            return _API_TYPES[parts[0]], "/".join(parts[1:])
        return "model", "/".join(parts)

    # auth -------------------------------------------------------------------------------------
    def _authenticate(self, auth_header: str | None) -> str | None:
        """Return the user name for a valid token, None when anonymous, raise 401 on a bad token."""
        if auth_header is None:
            return None
        scheme, _, token = auth_header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or token not in self.hub.tokens:
            raise _HubError(401, "Invalid credentials in Authorization header")
        return self.hub.username

    @staticmethod
    def _require_write(user: str | None) -> None:
        if user is None:
            raise _HubError(401, "Authorization is required for this operation: no valid token was provided")

    def _get_repo(self, rtype: str, repo_id: str, user: str | None, write: bool = False) -> dict:
        if write:
            self._require_write(user)
        state = self.hub._store.load_repo(rtype, repo_id)
        if state is None:
            raise _repo_not_found(404)
        if state["private"] and user is None:
            raise _repo_not_found(401)
        return state

    # repo lifecycle ---------------------------------------------------------------------------
    def _parse_json(self, body: bytes) -> dict:
        if not body:
            return {}
        try:
            data = json.loads(body)
        except ValueError:
            raise _HubError(400, "Request body is not valid JSON")
        if not isinstance(data, dict):
            raise _HubError(400, "Request body must be a JSON object")
        return data

    def _repo_url(self, rtype: str, repo_id: str) -> str:
        return f"{self.hub.url}/{_URL_PREFIX[rtype]}{repo_id}"

    def _create_repo(self, body: bytes, user: str | None) -> None:
        self._require_write(user)
        data = self._parse_json(body)
        name = data.get("name")
        namespace = data.get("organization") or user
        rtype = data.get("type") or "model"
        if rtype not in _URL_PREFIX:
            raise _HubError(400, f"Invalid repo type: {rtype!r}")
        if not isinstance(name, str) or not _NAME_RE.match(name) or not _NAME_RE.match(str(namespace)):
            raise _HubError(400, f"Invalid repo name: {namespace}/{name}")
        if "visibility" in data:
            private = data["visibility"] == "private"
        else:
            private = bool(data.get("private", False))
        repo_id = f"{namespace}/{name}"
        url = self._repo_url(rtype, repo_id)
        store = self.hub._store
        with store.lock:
            if store.load_repo(rtype, repo_id) is not None:
                return self._json(
                    {"error": f"You already created this {rtype} repo", "url": url},
                    status=409,
                    headers={"X-Error-Message": f"You already created this {rtype} repo"},
                )
            now = _now_iso()
            state = {
                "type": rtype,
                "id": repo_id,
                "private": private,
                "gated": False,
                "createdAt": now,
                "lastModified": now,
                "branches": {},
                "tags": {},
                "pulls": {},
            }
            files: dict[str, dict] = {}
            if self.hub.initial_gitattributes:
                files[".gitattributes"] = self._regular_entry(_DEFAULT_GITATTRIBUTES)
            commit = self._make_commit(state, files, parents=[], title="initial commit", description="", user=user)
            state["branches"][DEFAULT_BRANCH] = commit["id"]
            store.save_repo(state)
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self, body: bytes, user: str | None) -> None:
        self._require_write(user)
        data = self._parse_json(body)
        rtype = data.get("type") or "model"
        repo_id = f"{data.get('organization') or user}/{data.get('name')}"
        store = self.hub._store
        with store.lock:
            if rtype not in _URL_PREFIX or store.load_repo(rtype, repo_id) is None:
                raise _repo_not_found(404)
            store.delete_repo(rtype, repo_id)
        self._json({})

    def _whoami(self, user: str) -> dict:
        return {
            "type": "user",
            "id": hashlib.sha1(user.encode()).hexdigest()[:24],
            "name": user,
            "fullname": user,
            "email": f"{user}@example.com",
            "emailVerified": True,
            "isPro": False,
            "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "hub-test-server", "role": "write"}},
        }

    def _validate_yaml(self, body: bytes) -> None:
        data = self._parse_json(body)
        content = data.get("content") or ""
        errors = []
        lines = content.splitlines()
        if lines and lines[0].strip() == "---" and not any(line.strip() == "---" for line in lines[1:]):
            errors.append({"message": "Invalid YAML metadata: the metadata block opened by '---' is never closed"})
        if errors:
            return self._json({"errors": errors, "warnings": []}, status=400)
        self._json({"errors": [], "warnings": []})

    # /api/{type}s/{repo}/... ----------------------------------------------------------------
    def _repo_api(self, rtype: str, raw: list[str], body: bytes, user: str | None) -> None:
        store = self.hub._store
        segs = [unquote(s) for s in raw]
        if len(segs) >= 2 and (
            segs[1] not in _API_OPS or store.load_repo(rtype, f"{segs[0]}/{segs[1]}") is not None
        ):
            repo_id, rest, raw_rest = f"{segs[0]}/{segs[1]}", segs[2:], raw[2:]
        else:
            repo_id, rest, raw_rest = segs[0], segs[1:], raw[1:]
        method = self.command
        op = rest[0] if rest else ""
        arg = rest[1] if len(rest) >= 2 else None

        with store.lock:
            if op == "" and method == "GET":
                return self._repo_info(rtype, repo_id, DEFAULT_BRANCH, user)
            if op == "revision" and method == "GET" and len(rest) >= 2:
                return self._repo_info(rtype, repo_id, "/".join(rest[1:]), user)
            if op == "settings" and method == "PUT" and len(rest) == 1:
                return self._settings(rtype, repo_id, body, user)
            if op == "preupload" and method == "POST" and len(rest) == 2:
                return self._preupload(rtype, repo_id, arg, body, user)
            if op == "commit" and method == "POST" and len(rest) == 2:
                return self._commit(rtype, repo_id, arg, body, user)
            if op == "tag" and len(rest) == 2 and method in ("POST", "DELETE"):
                if method == "POST":
                    return self._create_tag(rtype, repo_id, arg, body, user)
                return self._delete_tag(rtype, repo_id, arg, user)
            if op == "branch" and len(rest) == 2 and method in ("POST", "DELETE"):
                if method == "POST":
                    return self._create_branch(rtype, repo_id, arg, body, user)
                return self._delete_branch(rtype, repo_id, arg, user)
            if op == "refs" and method == "GET" and len(rest) == 1:
                return self._refs(rtype, repo_id, user)
            if op == "commits" and method == "GET" and len(rest) == 2:
                return self._commits(rtype, repo_id, arg, user)
            if op == "tree" and method == "GET" and len(rest) >= 2:
                path = "/".join(unquote(s) for s in raw_rest[2:]).strip("/")
                return self._tree(rtype, repo_id, arg, path, user)
            if op == "paths-info" and method == "POST" and len(rest) == 2:
                return self._paths_info(rtype, repo_id, arg, body, user)
        raise _HubError(404, f"Unknown API route: {method} {self._raw_path}")

    # revisions --------------------------------------------------------------------------------
    def _resolve_rev(self, state: dict, revision: str) -> str:
        rev = revision
        if rev.startswith("refs/heads/"):
            rev = rev[len("refs/heads/") :]
            if rev in state["branches"]:
                return state["branches"][rev]
        elif rev.startswith("refs/tags/"):
            rev = rev[len("refs/tags/") :]
            if rev in state["tags"]:
                return state["tags"][rev]["target"]
        elif rev.startswith("refs/pr/"):
            if rev[len("refs/pr/") :] in state["pulls"]:
                return state["pulls"][rev[len("refs/pr/") :]]
        else:
            if rev in state["branches"]:
                return state["branches"][rev]
            if rev in state["tags"]:
                return state["tags"][rev]["target"]
            if _SHA1_RE.match(rev) and self.hub._store.load_commit(state["type"], state["id"], rev) is not None:
                return rev
        raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _commit_obj(self, state: dict, sha: str) -> dict:
        commit = self.hub._store.load_commit(state["type"], state["id"], sha)
        if commit is None:  # pragma: no cover - corrupted store
            raise _HubError(500, f"Missing commit object {sha}")
        return commit

    # commits ----------------------------------------------------------------------------------
    def _regular_entry(self, data: bytes) -> dict:
        sha = self.hub._store.put_blob(data)
        return {"sha256": sha, "size": len(data), "lfs": False, "oid": git_blob_oid(data)}

    @staticmethod
    def _lfs_entry(sha256: str, size: int) -> dict:
        return {"sha256": sha256, "size": size, "lfs": True, "oid": git_blob_oid(lfs_pointer(sha256, size))}

    def _make_commit(
        self, state: dict, files: dict, parents: list[str], title: str, description: str, user: str | None
    ) -> dict:
        date = _now_iso()
        timestamp = int(time.time())
        tree = _tree_oid(_nested(files))
        author = user or self.hub.username
        message = title + (f"\n\n{description}" if description else "")
        raw = f"tree {tree}\n"
        raw += "".join(f"parent {p}\n" for p in parents)
        raw += f"author {author} <{author}@users.noreply.huggingface.co> {timestamp} +0000\n"
        raw += f"committer {author} <{author}@users.noreply.huggingface.co> {timestamp} +0000\n"
        raw += f"\n{message}\n"
        data = raw.encode()
        sha = hashlib.sha1(b"commit %d\0" % len(data) + data).hexdigest()
        commit = {
            "id": sha,
            "tree": tree,
            "parents": parents,
            "title": title,
            "message": description,
            "date": date,
            "authors": [author],
            "files": files,
        }
        self.hub._store.save_commit(state["type"], state["id"], commit)
        state["lastModified"] = date
        return commit

    def _commit(self, rtype: str, repo_id: str, revision: str, body: bytes, user: str | None) -> None:
        state = self._get_repo(rtype, repo_id, user, write=True)
        create_pr = _truthy(self._param("create_pr"))
        try:
            lines = [json.loads(line) for line in body.decode("utf-8").splitlines() if line.strip()]
        except (ValueError, UnicodeDecodeError):
            raise _HubError(400, "Commit payload must be NDJSON")
        if not lines or not isinstance(lines[0], dict) or lines[0].get("key") != "header":
            raise _HubError(400, "First NDJSON line must be the commit header")
        header = lines[0].get("value") or {}
        title = str(header.get("summary") or "").strip()
        if not title:
            raise _HubError(400, "Commit summary is required")
        description = str(header.get("description") or "")

        # target ref
        branch = revision[len("refs/heads/") :] if revision.startswith("refs/heads/") else revision
        pr_num = None
        if create_pr:
            base = self._resolve_rev(state, revision)
        elif revision.startswith("refs/pr/"):
            pr_num = revision[len("refs/pr/") :]
            base = self._resolve_rev(state, revision)
        elif branch in state["branches"]:
            base = state["branches"][branch]
        else:
            self._resolve_rev(state, revision)  # raises RevisionNotFound when unknown
            raise _HubError(400, f"Invalid rev id: {revision} is not a branch, cannot commit to it")

        parent_commit = header.get("parentCommit")
        if parent_commit and not base.startswith(str(parent_commit).lower()):
            raise _HubError(412, "A commit has happened since. Please refresh and try again.")

        files = dict(self._commit_obj(state, base)["files"])
        store = self.hub._store
        for item in lines[1:]:
            key, value = item.get("key"), item.get("value") or {}
            if key == "file":
                path = _validate_path(value.get("path"))
                content = value.get("content") or ""
                if value.get("encoding") == "base64":
                    try:
                        data = base64.b64decode(content, validate=True)
                    except ValueError:
                        raise _HubError(400, f"Invalid base64 content for {path}")
                else:
                    data = content.encode("utf-8")
                self._check_no_file_dir_clash(files, path)
                files[path] = self._regular_entry(data)
            elif key == "lfsFile":
                path = _validate_path(value.get("path"))
                oid = str(value.get("oid") or "")
                if value.get("algo", "sha256") != "sha256" or not store.has_blob(oid):
                    raise _HubError(
                        400, f"LFS object {oid} for {path} was not uploaded (call the LFS batch API first)"
                    )
                size = store.blob_path(oid).stat().st_size
                if value.get("size") is not None and int(value["size"]) != size:
                    raise _HubError(400, f"LFS object {oid} has size {size}, not {value['size']}")
                self._check_no_file_dir_clash(files, path)
                files[path] = self._lfs_entry(oid, size)
            elif key == "deletedFile":
                path = str(value.get("path") or "")
                if path not in files:
                    raise _HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                prefix = str(value.get("path") or "").strip("/")
                doomed = [p for p in files if not prefix or p.startswith(prefix + "/")]
                if not doomed:
                    raise _HubError(404, f"A folder with this name doesn't exist: {prefix}", "EntryNotFound")
                for p in doomed:
                    del files[p]
            else:
                raise _HubError(400, f"Unknown commit operation key: {key!r}")

        commit = self._make_commit(state, files, [base], title, description, user)
        pr_url = None
        if create_pr:
            pr_num = str(max([int(n) for n in state["pulls"]] or [0]) + 1)
        if pr_num is not None:
            state["pulls"][pr_num] = commit["id"]
            pr_url = f"{self._repo_url(rtype, repo_id)}/discussions/{pr_num}"
        else:
            state["branches"][branch] = commit["id"]
        store.save_repo(state)
        self._json(
            {
                "success": True,
                "commitOid": commit["id"],
                "commitUrl": f"{self._repo_url(rtype, repo_id)}/commit/{commit['id']}",
                "commitMessage": title,
                "hookOutput": "",
                "pullRequestUrl": pr_url,
            }
        )

    @staticmethod
    def _check_no_file_dir_clash(files: dict, path: str) -> None:
        parts = path.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in files:
                raise _HubError(400, f"Cannot create {path}: {'/'.join(parts[:i])} is a file")
        if any(p.startswith(path + "/") for p in files):
            raise _HubError(400, f"Cannot create file {path}: a folder with that name exists")

    def _preupload(self, rtype: str, repo_id: str, revision: str, body: bytes, user: str | None) -> None:
        state = self._get_repo(rtype, repo_id, user, write=True)
        sha = self._resolve_rev(state, revision)
        files = self._commit_obj(state, sha)["files"]
        data = self._parse_json(body)
        patterns = [
            line.strip()
            for line in str(data.get("gitIgnore") or "").splitlines()
            if line.strip() and not line.strip().startswith("#")
        ]
        answer = []
        for item in data.get("files") or []:
            path = str(item.get("path"))
            size = int(item.get("size") or 0)
            lfs = size >= self.hub.lfs_threshold or path.lower().endswith(tuple(self.hub.lfs_suffixes))
            existing = files.get(path)
            oid = None
            if existing is not None:
                oid = existing["sha256"] if existing["lfs"] else existing["oid"]
            ignored = any(
                fnmatch.fnmatch(path, p.lstrip("/")) or fnmatch.fnmatch(path.rsplit("/", 1)[-1], p)
                for p in patterns
            )
            answer.append(
                {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": ignored, "oid": oid}
            )
        self._json({"files": answer, "commitOid": sha})

    # refs -------------------------------------------------------------------------------------
    def _create_tag(self, rtype: str, repo_id: str, revision: str, body: bytes, user: str | None) -> None:
        state = self._get_repo(rtype, repo_id, user, write=True)
        data = self._parse_json(body)
        tag = data.get("tag")
        if not isinstance(tag, str) or not tag or any(c.isspace() for c in tag) or tag.startswith("refs/"):
            raise _HubError(400, f"Invalid tag name: {tag!r}")
        target = self._resolve_rev(state, revision)
        if tag in state["tags"]:
            raise _HubError(409, f"Tag {tag} already exists")
        state["tags"][tag] = {"target": target, "message": str(data.get("message") or "")}
        self.hub._store.save_repo(state)
        self._json({})

    def _delete_tag(self, rtype: str, repo_id: str, tag: str, user: str | None) -> None:
        state = self._get_repo(rtype, repo_id, user, write=True)
        if tag not in state["tags"]:
            raise _HubError(404, f"Invalid rev id: {tag}", "RevisionNotFound")
        del state["tags"][tag]
        self.hub._store.save_repo(state)
        self._json({})

    def _create_branch(self, rtype: str, repo_id: str, branch: str, body: bytes, user: str | None) -> None:
        state = self._get_repo(rtype, repo_id, user, write=True)
        data = self._parse_json(body)
        if not branch or any(c.isspace() for c in branch) or branch.startswith("refs/") or ".." in branch:
            raise _HubError(400, f"Invalid branch name: {branch!r}")
        starting_point = data.get("startingPoint") or DEFAULT_BRANCH
        target = self._resolve_rev(state, str(starting_point))
        if branch in state["branches"]:
            raise _HubError(409, f"Branch {branch} already exists")
        state["branches"][branch] = target
        self.hub._store.save_repo(state)
        self._json({})

    def _delete_branch(self, rtype: str, repo_id: str, branch: str, user: str | None) -> None:
        state = self._get_repo(rtype, repo_id, user, write=True)
        if branch not in state["branches"]:
            raise _HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        if branch == DEFAULT_BRANCH:
            raise _HubError(403, "Cannot delete the default branch")
        del state["branches"][branch]
        self.hub._store.save_repo(state)
        self._json({})

    def _refs(self, rtype: str, repo_id: str, user: str | None) -> None:
        state = self._get_repo(rtype, repo_id, user)
        data = {
            "branches": [
                {"name": n, "ref": f"refs/heads/{n}", "targetCommit": c} for n, c in sorted(state["branches"].items())
            ],
            "converts": [],
            "tags": [
                {"name": n, "ref": f"refs/tags/{n}", "targetCommit": t["target"]}
                for n, t in sorted(state["tags"].items())
            ],
        }
        if _truthy(self._param("include_prs")):
            data["pullRequests"] = [
                {"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": c}
                for n, c in sorted(state["pulls"].items(), key=lambda kv: int(kv[0]))
            ]
        self._json(data)

    # listings ---------------------------------------------------------------------------------
    def _paginated(self, items: list) -> None:
        page_size = self.hub.page_size
        if not page_size:
            return self._json(items)
        start = int(self._param("cursor", "0") or 0)
        page = items[start : start + page_size]
        headers = {}
        if start + page_size < len(items):
            query = {k: v[-1] for k, v in self._query.items()}
            query["cursor"] = str(start + page_size)
            headers["Link"] = f'<{self.hub.url}{self._raw_path}?{urlencode(query)}>; rel="next"'
        self._json(page, headers=headers)

    def _commits(self, rtype: str, repo_id: str, revision: str, user: str | None) -> None:
        state = self._get_repo(rtype, repo_id, user)
        sha: str | None = self._resolve_rev(state, revision)
        formatted = "formatted" in (self._query.get("expand[]") or []) + (self._query.get("expand") or [])
        items = []
        while sha:
            commit = self._commit_obj(state, sha)
            item = {
                "id": commit["id"],
                "title": commit["title"],
                "message": commit["message"],
                "authors": [{"user": a, "avatar": None} for a in commit["authors"]],
                "date": commit["date"],
            }
            if formatted:
                item["formatted"] = {"title": html.escape(commit["title"]), "message": html.escape(commit["message"])}
            items.append(item)
            sha = commit["parents"][0] if commit["parents"] else None
        self._paginated(items)

    def _last_commit(self, state: dict, head: str, path: str, is_dir: bool) -> dict:
        """Most recent commit (first-parent history) that changed `path`."""

        def snapshot(commit: dict) -> Any:
            if not is_dir:
                entry = commit["files"].get(path)
                return None if entry is None else (entry["oid"], entry["sha256"])
            prefix = path + "/" if path else ""
            return sorted((p, e["oid"]) for p, e in commit["files"].items() if p.startswith(prefix))

        commit = self._commit_obj(state, head)
        current = snapshot(commit)
        while commit["parents"]:
            parent = self._commit_obj(state, commit["parents"][0])
            if snapshot(parent) != current:
                break
            commit = parent
        return {"id": commit["id"], "title": commit["title"], "date": commit["date"]}

    def _entry_json(self, state: dict, head: str, files: dict, path: str, expand: bool) -> dict:
        if path in files:
            entry = files[path]
            data: dict[str, Any] = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
            if entry["lfs"]:
                pointer = lfs_pointer(entry["sha256"], entry["size"])
                data["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": len(pointer)}
            is_dir = False
        else:
            data = {"type": "directory", "oid": _tree_oid(_subtree(files, path)), "size": 0, "path": path}
            is_dir = True
        if expand:
            data["lastCommit"] = self._last_commit(state, head, path, is_dir)
        return data

    def _tree(self, rtype: str, repo_id: str, revision: str, path: str, user: str | None) -> None:
        state = self._get_repo(rtype, repo_id, user)
        head = self._resolve_rev(state, revision)
        files = self._commit_obj(state, head)["files"]
        dirs = _dir_paths(files)
        if path and path not in dirs:
            raise _HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": head})
        recursive = _truthy(self._param("recursive"))
        expand = _truthy(self._param("expand"))
        prefix = path + "/" if path else ""
        candidates = sorted((set(files) | dirs) - {""})
        selected = []
        for candidate in candidates:
            if not candidate.startswith(prefix):
                continue
            if not recursive and "/" in candidate[len(prefix) :]:
                continue
            selected.append(candidate)
        if not recursive:  # like the Hub: folders first
            selected.sort(key=lambda p: (p in files, p))
        self._paginated([self._entry_json(state, head, files, p, expand) for p in selected])

    def _paths_info(self, rtype: str, repo_id: str, revision: str, body: bytes, user: str | None) -> None:
        state = self._get_repo(rtype, repo_id, user)
        head = self._resolve_rev(state, revision)
        files = self._commit_obj(state, head)["files"]
        if "json" in (self.headers.get("Content-Type") or ""):
            data = self._parse_json(body)
            paths = data.get("paths") or []
            paths = [paths] if isinstance(paths, str) else paths
            expand = bool(data.get("expand"))
        else:
            form = parse_qs(body.decode("utf-8"), keep_blank_values=True)
            paths = form.get("paths", [])
            expand = _truthy((form.get("expand") or ["false"])[-1])
        dirs = _dir_paths(files)
        result = []
        for p in paths:
            p = str(p).strip("/")
            if p in files or p in dirs:
                result.append(self._entry_json(state, head, files, p, expand))
        self._json(result)

    def _repo_info(self, rtype: str, repo_id: str, revision: str, user: str | None) -> None:
        state = self._get_repo(rtype, repo_id, user)
        sha = self._resolve_rev(state, revision)
        files = self._commit_obj(state, sha)["files"]
        blobs = _truthy(self._param("blobs"))
        siblings = []
        for path in sorted(files):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                entry = files[path]
                sibling["size"] = entry["size"]
                sibling["blobId"] = entry["oid"]
                if entry["lfs"]:
                    sibling["lfs"] = {
                        "size": entry["size"],
                        "sha256": entry["sha256"],
                        "pointerSize": len(lfs_pointer(entry["sha256"], entry["size"])),
                    }
            siblings.append(sibling)
        info = {
            "_id": hashlib.sha1(f"{rtype}/{repo_id}".encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": sha,
            "createdAt": state["createdAt"],
            "lastModified": state["lastModified"],
            "private": state["private"],
            "gated": state.get("gated", False),
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(e["size"] for e in files.values()),
        }
        if rtype == "model":
            info["modelId"] = repo_id
        self._json(info)

    def _settings(self, rtype: str, repo_id: str, body: bytes, user: str | None) -> None:
        state = self._get_repo(rtype, repo_id, user, write=True)
        data = self._parse_json(body)
        if "visibility" in data:
            state["private"] = data["visibility"] == "private"
        if "private" in data:
            state["private"] = bool(data["private"])
        if "gated" in data:
            state["gated"] = data["gated"]
        self.hub._store.save_repo(state)
        self._json({})

    # LFS --------------------------------------------------------------------------------------
    def _sign(self, oid: str) -> str:
        return hmac.new(self.hub._secret, oid.encode(), hashlib.sha256).hexdigest()[:32]

    def _lfs_batch(self, rtype: str, repo_id: str, body: bytes, user: str | None) -> None:
        data = self._parse_json(body)
        operation = data.get("operation")
        store = self.hub._store
        with store.lock:
            state = self._get_repo(rtype, repo_id, user, write=(operation != "download"))
            ref = (data.get("ref") or {}).get("name")
            if ref:
                self._resolve_rev(state, ref)
        if operation not in ("upload", "download"):
            raise _HubError(400, f"Unsupported LFS operation: {operation!r}")
        transfers = data.get("transfers") or ["basic"]
        if "basic" not in transfers:
            raise _HubError(400, "Only the 'basic' LFS transfer is supported by this server")
        verify_href = f"{self.hub.url}/{_URL_PREFIX[rtype]}{state['id']}.git/info/lfs/objects/verify"
        objects = []
        for obj in data.get("objects") or []:
            oid, size = obj.get("oid"), obj.get("size")
            if not isinstance(oid, str) or not _SHA256_RE.match(oid) or not isinstance(size, int) or size < 0:
                objects.append({"oid": str(oid), "size": size if isinstance(size, int) else 0,
                                "error": {"code": 422, "message": "Invalid oid or size"}})
                continue
            present = store.has_blob(oid) and store.blob_path(oid).stat().st_size == size
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if operation == "upload":
                if not present:
                    entry["actions"] = {
                        "upload": {
                            "href": f"{self.hub.url}/lfs-upload/{oid}?size={size}&sig={self._sign(oid)}",
                            "expires_in": 3600,
                        },
                        "verify": {"href": verify_href, "expires_in": 3600},
                    }
            elif present:
                entry["actions"] = {
                    "download": {"href": f"{self.hub.url}/lfs-objects/{oid}?sig={self._sign(oid)}", "expires_in": 3600}
                }
            else:
                entry["error"] = {"code": 404, "message": "Object does not exist"}
            objects.append(entry)
        self._send(
            200,
            json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode(),
            content_type="application/vnd.git-lfs+json",
        )

    def _lfs_put(self, oid: str, body: bytes) -> None:
        if not _SHA256_RE.match(oid) or not hmac.compare_digest(self._param("sig", "") or "", self._sign(oid)):
            raise _HubError(403, "Invalid or missing upload signature")
        expected_size = self._param("size")
        if expected_size is not None and int(expected_size) != len(body):
            raise _HubError(400, f"Size mismatch: expected {expected_size} bytes, got {len(body)}")
        if hashlib.sha256(body).hexdigest() != oid:
            raise _HubError(400, "Uploaded content does not match its sha256 oid")
        self.hub._store.put_blob(body)
        self._send(200, b"", headers={"ETag": f'"{hashlib.md5(body).hexdigest()}"'}, content_type="text/plain")

    def _lfs_get(self, oid: str) -> None:
        if not _SHA256_RE.match(oid) or not hmac.compare_digest(self._param("sig", "") or "", self._sign(oid)):
            raise _HubError(403, "Invalid or missing download signature")
        if not self.hub._store.has_blob(oid):
            raise _HubError(404, "Object does not exist")
        self._send_content(self.hub._store.read_blob(oid), {})

    def _lfs_verify(self, rtype: str, repo_id: str, body: bytes, user: str | None) -> None:
        with self.hub._store.lock:
            self._get_repo(rtype, repo_id, user)
        data = self._parse_json(body)
        oid, size = str(data.get("oid") or ""), data.get("size")
        store = self.hub._store
        if not store.has_blob(oid):
            raise _HubError(404, f"LFS object {oid} not found")
        if size is not None and store.blob_path(oid).stat().st_size != int(size):
            raise _HubError(422, f"LFS object {oid} has a different size")
        self._json({"success": True})

    # downloads --------------------------------------------------------------------------------
    def _resolve(self, rtype: str, repo_id: str, revision: str, filename: str, user: str | None) -> None:
        store = self.hub._store
        with store.lock:
            state = self._get_repo(rtype, repo_id, user)
            sha = self._resolve_rev(state, revision)
            entry = self._commit_obj(state, sha)["files"].get(filename)
        if entry is None:
            raise _HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
        if entry["lfs"]:
            headers["ETag"] = f'"{entry["sha256"]}"'
            headers["X-Linked-Etag"] = f'"{entry["sha256"]}"'
            headers["X-Linked-Size"] = str(entry["size"])
        else:
            headers["ETag"] = f'"{entry["oid"]}"'
        if self.command == "HEAD" and not self.headers.get("Range"):
            return self._send(200, b"", headers=headers, content_type="application/octet-stream",
                              content_length=entry["size"])
        self._send_content(store.read_blob(entry["sha256"]), headers)

    def _send_content(self, data: bytes, headers: dict) -> None:
        range_header = self.headers.get("Range")
        if range_header:
            match = _RANGE_RE.match(range_header)
            total = len(data)
            start = end = None
            if match and (match.group(1) or match.group(2)):
                if match.group(1):
                    start = int(match.group(1))
                    end = int(match.group(2)) if match.group(2) else total - 1
                else:
                    start = max(total - int(match.group(2)), 0)
                    end = total - 1
                end = min(end, total - 1)
            if start is None or end is None or start > end or start >= total:
                raise _HubError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{total}"})
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{total}"}
            chunk = data[start : end + 1]
            return self._send(206, chunk, headers=headers, content_type="application/octet-stream")
        self._send(200, data, headers=headers, content_type="application/octet-stream")


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    hub: "HubTestServer"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._open_conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()

    def get_request(self):  # type: ignore[override]
        sock, addr = super().get_request()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._conns_lock:
            self._open_conns.add(sock)
        return sock, addr

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._open_conns.discard(request)
        super().shutdown_request(request)

    def close_open_connections(self) -> None:
        """Drop keep-alive connections so that no handler thread outlives the server."""
        with self._conns_lock:
            conns = list(self._open_conns)
            self._open_conns.clear()
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


# ----------------------------------------------------------------------------------------------
# public interface
# ----------------------------------------------------------------------------------------------


class HubTestServer:
    """Local Hugging Face Hub-protocol server for tests (see module docstring)."""

    def __init__(
        self,
        root: pathlib.Path,
        tokens: Iterable[str] = frozenset({"hf_test_token"}),
        *,
        username: str = "hub-test-user",
        lfs_threshold: int = LFS_THRESHOLD,
        lfs_suffixes: Iterable[str] = LFS_SUFFIXES,
        initial_gitattributes: bool = True,
        page_size: int | None = None,
        verbose: bool = False,
    ):
        self.root = pathlib.Path(root)
        self.tokens = set(tokens)
        self.username = username
        self.lfs_threshold = lfs_threshold
        self.lfs_suffixes = tuple(s.lower() for s in lfs_suffixes)
        self.initial_gitattributes = initial_gitattributes
        self.page_size = page_size
        self.verbose = verbose
        self.url = ""
        self.request_count = 0
        self.requests: list[tuple[str, str]] = []
        self.request_log: list[dict] = []
        self.seen_tokens: list[str] = []
        self.errors: list[str] = []
        self._meta_lock = threading.Lock()
        self._fail_remaining = 0
        self._fail_status = 500
        self._secret = secrets.token_bytes(16)
        self._store = _Store(self.root)
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # lifecycle --------------------------------------------------------------------------------
    def start(self) -> "HubTestServer":
        if self._httpd is not None:
            return self
        httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        httpd.hub = self
        self._httpd = httpd
        host, port = httpd.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="HubTestServer", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        httpd.close_open_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "HubTestServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # test hooks -------------------------------------------------------------------------------
    def fail_next(self, n: int, status: int = 500) -> None:
        """Make the next ``n`` requests (of any kind) answer ``status`` with a JSON error body."""
        with self._meta_lock:
            self._fail_remaining = int(n)
            self._fail_status = int(status)

    def reset_counters(self) -> None:
        with self._meta_lock:
            self.request_count = 0
            self.requests.clear()
            self.request_log.clear()
            self.seen_tokens.clear()

    # direct (non-HTTP) inspection helpers -------------------------------------------------------
    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._store.lock:
            return self._store.load_repo(repo_type, repo_id) is not None

    def refs(self, repo_id: str, repo_type: str = "model") -> dict:
        """{"branches": {name: sha}, "tags": {name: sha}} read straight from the store."""
        with self._store.lock:
            state = self._store.load_repo(repo_type, repo_id)
            if state is None:
                raise KeyError(repo_id)
            return {
                "branches": dict(state["branches"]),
                "tags": {n: t["target"] for n, t in state["tags"].items()},
            }

    def read_file(self, repo_id: str, path: str, revision: str = DEFAULT_BRANCH, repo_type: str = "model") -> bytes:
        """Content of ``path`` at ``revision`` (branch, tag or commit sha), read straight from the store."""
        with self._store.lock:
            state = self._store.load_repo(repo_type, repo_id)
            if state is None:
                raise KeyError(repo_id)
            sha = state["branches"].get(revision) or (state["tags"].get(revision) or {}).get("target") or revision
            commit = self._store.load_commit(repo_type, repo_id, sha)
            if commit is None or path not in commit["files"]:
                raise KeyError(f"{path}@{revision}")
            return self._store.read_blob(commit["files"][path]["sha256"])

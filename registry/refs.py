"""Adapter names and references: ``name``, ``name@3``, ``name@production``, ``hf://org/repo@v3``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from finetune_sdk.errors import RegistryError

MAX_NAME = 96
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
HUB_REPO = re.compile(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*$")


def validate_name(name: str, what: str = "adapter name") -> str:
    """Return ``name`` if it is a safe name (letters, digits, ``.``, ``_``, ``-``; at most 96 characters).

    Names become folder names, so separators, ``..`` and control characters are refused.

    >>> validate_name("support-bot")
    'support-bot'
    """
    if not isinstance(name, str) or not name:
        raise RegistryError(f"{what} is empty; use letters, digits, '.', '_' or '-'")
    if len(name) > MAX_NAME:
        raise RegistryError(f"{what} {name[:20]!r}... is {len(name)} characters long; the limit is {MAX_NAME}")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise RegistryError(f"{what} {name!r} contains control characters; use letters, digits, '.', '_' or '-'")
    if "/" in name or "\\" in name or ".." in name or not NAME.match(name):
        raise RegistryError(
            f"{what} {name!r} is not allowed: use letters, digits, '.', '_' or '-' (no path separators or '..'), "
            "starting with a letter or digit")
    return name


def validate_repo_id(repo_id: str, ref: str | None = None) -> str:
    """Return ``repo_id`` if it reads ``org/name`` under the Hub's rules (no ``..`` or ``--``, no leading or
    trailing ``.`` or ``-``, at most 96 characters per part).

    >>> validate_repo_id("org/re..po")
    Traceback (most recent call last):
    finetune_sdk.errors.RegistryError: 'org/re..po': a Hub repo id reads org/name with letters, digits, '.', '_' or '-' (no '..' or '--', not starting or ending with '.' or '-')
    """
    shown = repr(ref if ref is not None else repo_id)
    parts = repo_id.split("/") if isinstance(repo_id, str) else []
    if not HUB_REPO.match(repo_id or "") or len(parts) != 2 or any(
            ".." in p or "--" in p or p[-1] in ".-" or len(p) > MAX_NAME for p in parts):
        raise RegistryError(f"{shown}: a Hub repo id reads org/name with letters, digits, '.', '_' or '-' (no '..' "
                            "or '--', not starting or ending with '.' or '-')")
    return repo_id


def validate_relative_path(rel: str, what: str = "file") -> str:
    """Return ``rel`` if it is a plain relative path (``a/b.json``) that stays inside its folder.

    Absolute paths, ``..`` or ``.`` parts, backslashes, empty parts, control characters and hidden (``.x``) parts
    are refused: file lists come from remotes that may be hostile.

    >>> validate_relative_path("../../../etc/os-release")
    Traceback (most recent call last):
    finetune_sdk.errors.RegistryError: file '../../../etc/os-release' is not a plain relative path inside the folder; refusing it
    """
    parts = rel.split("/") if isinstance(rel, str) else [""]
    if (not isinstance(rel, str) or not rel or len(rel) > 1024 or "\\" in rel or ":" in rel
            or any(ord(c) < 32 or ord(c) == 127 for c in rel)
            or any(part in ("", ".", "..") or part.startswith(".") for part in parts)
            or PurePosixPath(rel).is_absolute()):
        raise RegistryError(f"{what} {rel!r} is not a plain relative path inside the folder; refusing it")
    return rel


def inside(folder: Path, rel: str, what: str = "file") -> Path:
    """``folder / rel`` after :func:`validate_relative_path` (a last check that it resolves inside ``folder``)."""
    target = Path(folder) / validate_relative_path(rel, what)
    if not target.resolve().is_relative_to(Path(folder).resolve()):
        raise RegistryError(f"{what} {rel!r} leads outside {folder}; refusing it")
    return target


@dataclass(frozen=True)
class Ref:
    """A parsed reference: a local adapter (``name`` + optional version or alias) or a Hub repo."""

    name: str | None = None
    version: int | None = None
    alias: str | None = None
    repo_id: str | None = None
    revision: str | None = None

    @property
    def is_hub(self) -> bool:
        return self.repo_id is not None

    def __str__(self) -> str:
        if self.is_hub:
            return f"hf://{self.repo_id}" + (f"@{self.revision}" if self.revision else "")
        suffix = f"@{self.version}" if self.version is not None else (f"@{self.alias}" if self.alias else "")
        return f"{self.name}{suffix}"


def parse_ref(ref: str) -> Ref:
    """Parse ``name``, ``name@3``, ``name@v3``, ``name@alias``, ``hf://org/repo`` or ``hf://org/repo@rev``.

    >>> parse_ref("bot@production")
    Ref(name='bot', version=None, alias='production', repo_id=None, revision=None)
    >>> parse_ref("hf://acme/bot@v3").revision
    'v3'
    """
    if not isinstance(ref, str) or not ref.strip():
        raise RegistryError("empty adapter reference; use name, name@3, name@alias or hf://org/repo@v3")
    ref = ref.strip()
    if ref.startswith("hf://"):
        body = ref[len("hf://"):]
        repo_id, _, revision = body.partition("@")
        validate_repo_id(repo_id, ref)
        if revision:
            validate_name(revision, "revision")
        return Ref(repo_id=repo_id, revision=revision or None)
    name, at, selector = ref.partition("@")
    validate_name(name)
    if not at:
        return Ref(name=name)
    if re.fullmatch(r"v?\d+", selector):
        version = int(selector.lstrip("v"))
        if version < 1:
            raise RegistryError(f"{ref!r}: versions start at 1")
        return Ref(name=name, version=version)
    return Ref(name=name, alias=validate_name(selector, "alias"))

"""Adapter names and references: ``name``, ``name@3``, ``name@production``, ``hf://org/repo@v3``."""

from __future__ import annotations

import re
from dataclasses import dataclass

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
        if not HUB_REPO.match(repo_id):
            raise RegistryError(f"{ref!r}: a Hub reference reads hf://org/repo or hf://org/repo@v3")
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

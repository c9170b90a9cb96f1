"""Who may talk to the studio and which files it may touch.

* **The token** (as Jupyter's): ``secrets.token_urlsafe(32)``, printed once in the URL. Every request, the event
  stream included, carries it: in the ``X-Studio-Token`` header, or in the ``finetune_studio`` cookie that a
  ``GET`` with ``?token=`` sets (``HttpOnly``, ``SameSite=Strict``) before redirecting to the same URL without the
  token (so it leaves the address bar and the history). Requests without it get ``401`` and one line.
* **CSRF**: a request that changes state (``POST``) must carry the token in the header, which another site's page
  can't set (a cookie alone is refused), and an ``Origin`` header, when sent, must be the studio's own.
* **Bodies**: :func:`json_body` accepts a JSON object and nothing else (one line otherwise).
* **Paths**: :class:`Confinement` resolves a path the page names (symlinks followed) and refuses one outside the
  folders the studio may read: the folder it started in, the runs folder and the registry home.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from finetune_sdk.errors import ConfigError, FinetuneError

COOKIE = "finetune_studio"
HEADER = "x-studio-token"
SAFE_METHODS = frozenset({"GET", "HEAD"})


def new_token() -> str:
    """A fresh access token: 32 random bytes, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def token_matches(given: str | None, token: str) -> bool:
    """Constant-time comparison of a presented token with the studio's."""
    return bool(given) and secrets.compare_digest(given.encode(), token.encode())


def origin_allowed(origin: str | None, host: str | None) -> bool:
    """True when a request's ``Origin`` is absent or names the host the request was sent to (``Host`` header)."""
    if not origin:
        return True
    if origin == "null" or not host:
        return False
    return urlsplit(origin).netloc == host


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost: addresses no other machine can reach."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Confinement:
    """The folders the studio may read (``roots``); :meth:`check` refuses a path outside all of them.

    Example:
        >>> c = Confinement([Path("/srv/work")])
        >>> c.check("/etc/passwd")
        Traceback (most recent call last):
        finetune_sdk.errors.ConfigError: /etc/passwd is outside the folders the studio may read (/srv/work); pick a \
file under them
    """

    roots: list[Path] = field(default_factory=list)
    base: Path = field(default_factory=Path.cwd)

    def __post_init__(self) -> None:
        self.roots = [Path(os.path.realpath(r)) for r in self.roots]

    def check(self, path: str | os.PathLike[str]) -> Path:
        """``path`` (relative to ``base``) resolved; raises :class:`ConfigError` naming it when outside."""
        text = str(path)
        if not text or "\x00" in text:
            raise ConfigError("empty path: pick a file under the folder the studio started in")
        candidate = Path(text).expanduser()
        resolved = Path(os.path.realpath(candidate if candidate.is_absolute() else self.base / candidate))
        if not any(resolved == root or root in resolved.parents for root in self.roots):
            raise ConfigError(f"{text} is outside the folders the studio may read "
                              f"({', '.join(map(str, self.roots))}); pick a file under them")
        return resolved


async def json_body(request: Any) -> dict[str, Any]:
    """A request's JSON body (a ``fastapi.Request``'s), which must be an object.

    Raises:
        FinetuneError: the body isn't JSON or isn't an object (the studio answers ``400`` with the line)."""
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise FinetuneError("the request body must be a JSON object")
    return body

"""finetune studio: a local web page to start, watch and compare fine-tuning runs and browse the registry.

``finetune studio`` (or :func:`serve`) serves the runs folder on 127.0.0.1 behind a random token printed once in
its URL, as Jupyter does. Runs started from the page are ``finetune train`` processes of their own and outlive the
page and the server; their charts are read from the run event log (:mod:`finetune_sdk.training.run_events`). Needs the
``studio`` extra: ``pip install 'finetune-sdk[studio]'`` (FastAPI and uvicorn). See docs/studio.md.

Example:
    >>> from finetune_sdk.studio import serve
    >>> serve("finetune-runs", port=8765)  # doctest: +SKIP
    finetune studio: http://127.0.0.1:8765/?token=...
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from finetune_sdk.errors import ConfigError

INSTALL_HINT = "finetune studio needs the 'studio' extra: pip install 'finetune-sdk[studio]' (fastapi, uvicorn)"
logger = logging.getLogger("finetune_sdk")


def check_installed() -> None:
    """Raise :class:`ConfigError` with the install command when FastAPI or uvicorn is missing."""
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"{INSTALL_HINT}; missing: {', '.join(missing)}")


def free_port(host: str) -> int:
    """A TCP port free on ``host`` now (the OS picks it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (``port`` 0: one the OS picks), handed to uvicorn as is, so the URL
    printed is the one served. Raises :class:`ConfigError` (one line) when the port is taken or the host can't be
    bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    bound = socket.socket(family, socket.SOCK_STREAM)
    bound.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        bound.bind((host, port))
    except OSError as exc:
        bound.close()
        raise ConfigError(f"can't listen on {host}:{port} ({exc.strerror or exc}); pick another --port "
                          "(0: any free port) or --host") from None
    return bound


def serve(runs: str | os.PathLike[str] = "finetune-runs", *, host: str = "127.0.0.1", port: int = 8765,
          root: str | os.PathLike[str] | None = None, registry_home: str | os.PathLike[str] | None = None,
          token: str | None = None, announce: Callable[[str], None] | None = None) -> None:
    """Serve the studio until interrupted (Ctrl-C).

    Args:
        runs: the runs folder (created when missing); every run in it is shown.
        host: the address to bind; anything but loopback is warned about (the token is still required).
        port: the TCP port (0: any free port).
        root: the folder whose files the page may pick (default: the current folder).
        registry_home: the registry shown (default: ``FINETUNE_SDK_REGISTRY`` or its default home).
        token: the access token (default: a fresh ``secrets.token_urlsafe(32)``).
        announce: called once with the URL to open (default: printed to stdout).

    Raises:
        ConfigError: the ``studio`` extra is not installed, ``runs`` is a file, or ``host:port`` can't be bound
            (in use): nothing is printed then.
    """
    check_installed()
    import uvicorn

    from finetune_sdk.studio.access import is_loopback, new_token
    from finetune_sdk.studio.app import create_app

    runs_path = Path(runs).expanduser()
    if runs_path.exists() and not runs_path.is_dir():
        raise ConfigError(f"--runs {runs_path} is a file, not a folder; pick a folder for the runs")
    runs_path.mkdir(parents=True, exist_ok=True)
    token = token or new_token()
    if not is_loopback(host):
        logger.warning("finetune studio listens on %s: other machines can reach it; the token still guards every "
                       "request, but anyone who sees the URL can start runs (use 127.0.0.1 and an SSH tunnel)", host)
    listening = bind_socket(host, port)  # before the URL is printed: a taken port is one line, not a dead URL
    port = port or int(listening.getsockname()[1])
    app = create_app(runs_path, Path(root or Path.cwd()), token=token, registry_home=registry_home)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/?token={token}"
    (announce or (lambda text: print(f"finetune studio: {text}", flush=True)))(url)
    # log_config=None: uvicorn's default log config goes through logging.config.dictConfig, which closes every
    # logging handler of the process (the application's own, pytest's); uvicorn's loggers get the level only
    config = uvicorn.Config(app, host=host, port=port, access_log=False, log_level="warning", log_config=None,
                            timeout_graceful_shutdown=2)
    uvicorn.Server(config).run(sockets=[listening])
    print("finetune studio stopped; runs started from it keep going", file=sys.stderr)

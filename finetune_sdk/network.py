"""Bounded network calls: every request to a Hub endpoint has connect and read timeouts.

huggingface_hub's shared HTTP client has no timeout by default (``timeout=None``, also passed per request by
``HfApi`` methods), so a server that accepts the connection and never answers blocks a call forever.
:func:`bounded_hub_client` installs, once per process, a client factory that builds the library's default client
plus a request hook filling in every missing limit with ``FINETUNE_SDK_HUB_TIMEOUT`` seconds (default 10, the value
huggingface_hub uses for its own metadata requests) for connecting, each read and each write. A factory the user set
themselves (``huggingface_hub.set_client_factory``) is left alone.
"""

from __future__ import annotations

import os
import threading

from finetune_sdk.errors import ConfigError

TIMEOUT_ENV = "FINETUNE_SDK_HUB_TIMEOUT"
DEFAULT_TIMEOUT = 10.0
_installed = threading.Lock()


def resolve_endpoint(endpoint: str | None) -> str:
    """The Hub endpoint: the argument, else ``HF_ENDPOINT``, else https://huggingface.co (no trailing slash).

    >>> resolve_endpoint("https://hub.example.com/")
    'https://hub.example.com'
    """
    return (endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def hub_timeout() -> float:
    """Seconds allowed to connect to a Hub endpoint and for each read (``FINETUNE_SDK_HUB_TIMEOUT``, default 10)."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < 3600:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r}: give the seconds as a number between 0 and 3600")
    return value


def bounded_hub_client() -> float:
    """Make huggingface_hub's HTTP client time out (see the module docs); return the timeout in seconds."""
    from huggingface_hub.utils import _http

    seconds = hub_timeout()
    with _installed:
        factory = _http._GLOBAL_CLIENT_FACTORY
        if getattr(factory, "finetune_sdk_timeout", None) == seconds:
            return seconds
        if factory is not _http.default_client_factory and not hasattr(factory, "finetune_sdk_timeout"):
            return seconds  # the user's own client configuration wins

        def bound_timeouts(request):  # type: ignore[no-untyped-def]
            # huggingface_hub passes timeout=None (no limit) per request: fill in every missing limit
            limits = dict(request.extensions.get("timeout") or {})
            request.extensions["timeout"] = {key: limits.get(key) if limits.get(key) is not None else seconds
                                             for key in ("connect", "read", "write", "pool")}

        def bounded_client_factory():  # type: ignore[no-untyped-def]
            client = _http.default_client_factory()
            client.timeout = type(client.timeout)(seconds)
            client.event_hooks["request"] = [bound_timeouts, *client.event_hooks["request"]]
            return client

        bounded_client_factory.finetune_sdk_timeout = seconds  # type: ignore[attr-defined]
    from huggingface_hub import set_client_factory

    set_client_factory(bounded_client_factory)  # also closes the current client, so the next call uses this one
    return seconds

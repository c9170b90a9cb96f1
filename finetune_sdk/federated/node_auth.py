"""SuperNode authentication, Flower's own: the server admits only clients whose public key was registered.

Flower 1.42 (``flower-superlink --enable-supernode-auth``) accepts a SuperNode only when the public key of the
private key it was started with (``flower-supernode --auth-supernode-private-key``) was registered on the
SuperLink beforehand (``flwr supernode register``); a SuperNode with any other key is refused and exits (Flower
exit code 305). Both need TLS: Flower refuses authentication over an insecure channel. Keys are elliptic-curve
keys on a NIST curve (P-256, P-384...) in OpenSSH format, e.g. ``ssh-keygen -t ecdsa -b 384 -N "" -f client``.

``finetune federated server --supernode-public-key client.pub`` (repeatable) starts the SuperLink with
authentication and registers each key with ``flwr supernode register`` before the run starts; ``finetune
federated client --auth-key client`` passes the private key to the SuperNode. The keys are checked here first so
that a wrong file is a one-line error before any process starts.
"""

from __future__ import annotations

from pathlib import Path

from finetune_sdk.errors import ConfigError

KEYGEN_HINT = 'make one with: ssh-keygen -t ecdsa -b 384 -N "" -f client'


def check_server_auth(supernode_auth: bool, supernode_keys: list[str] | tuple[str, ...], insecure: bool,
                      tls: dict[str, str | None] | None) -> bool:
    """Check the server's authentication settings before anything starts; returns whether authentication is on
    (``supernode_keys`` imply it). Raises a one-line :class:`ConfigError` without TLS or for a bad key file."""
    enabled = supernode_auth or bool(supernode_keys)
    if enabled and (insecure or not tls or not all(tls.values())):
        raise ConfigError("SuperNode authentication needs TLS (--ssl-certfile, --ssl-keyfile, --ssl-ca-certfile): "
                          "Flower refuses it over an insecure connection")
    for key in supernode_keys:
        check_public_key(key)
    return enabled


def check_public_key(path: str | Path) -> None:
    """Raise a one-line :class:`ConfigError` unless ``path`` holds an OpenSSH EC public key on a NIST curve."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_ssh_public_key(Path(path).read_bytes())
    except (OSError, ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{path}: not an OpenSSH public key ({exc}); {KEYGEN_HINT}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not key.curve.name.startswith("secp"):
        raise ConfigError(f"{path}: Flower's SuperNode authentication needs an elliptic-curve key on a NIST curve "
                          f"(P-256, P-384, P-521); {KEYGEN_HINT}")


def check_private_key(path: str | Path) -> None:
    """Raise a one-line :class:`ConfigError` unless ``path`` holds an unencrypted OpenSSH EC private key."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_ssh_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{path}: not an unencrypted OpenSSH private key ({exc}); {KEYGEN_HINT}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path}: Flower's SuperNode authentication needs an elliptic-curve key; {KEYGEN_HINT}")

"""An optional record of the files each federated process opens, to check that data stays with its owner.

With ``FINETUNE_SDK_FEDERATED_AUDIT_DIR`` set, the server and client apps append every path they open (Python's
``open`` audit event, PEP 578) to ``<dir>/<role>-<pid>.log``. Tests use it to show that the server never opens
a client's rows and no client opens another's; operators can use it the same way.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

AUDIT_ENV = "FINETUNE_SDK_FEDERATED_AUDIT_DIR"
_installed: set[str] = set()


def install_open_audit(role: str) -> Path | None:
    """Start recording opened paths for this process (once per role); returns the log file or ``None``."""
    folder = os.environ.get(AUDIT_ENV)
    if not folder or role in _installed:
        return None
    _installed.add(role)
    log = Path(folder) / f"{role}-{os.getpid()}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    handle = open(log, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - lives as long as the process

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.fsdecode(args[0])
            if path != str(log):
                handle.write(os.path.abspath(path) + "\n")

    sys.addaudithook(hook)
    return log


def opened_paths(folder: str | os.PathLike[str], role: str) -> dict[int, set[str]]:
    """The paths each process of ``role`` opened, by process id."""
    found: dict[int, set[str]] = {}
    for log in Path(folder).glob(f"{role}-*.log"):
        pid = log.stem.rsplit("-", 1)[1]
        if log.stem == f"{role}-{pid}" and pid.isdigit():
            found[int(pid)] = set(log.read_text(encoding="utf-8").splitlines())
    return found

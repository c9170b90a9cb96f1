"""Flower's deployment runtime as local processes: a SuperLink and SuperNodes on loopback, and the run submitted.

``Trainer.fit_federated`` runs its simulation this way (one SuperNode per client, so each client's rows are read
only by its own processes); ``finetune federated server`` starts the SuperLink and submits the run; ``finetune
federated client`` starts one SuperNode. Flower's Ray-based simulation engine is not used: Ray is a large
dependency that runs clients in shared worker processes, and on a few CPU cores its start-up outweighs the runs.

The apps are the SDK's :mod:`~finetune_sdk.federated.server_app` and :mod:`~finetune_sdk.federated.client_app`,
submitted as a Flower app whose ``pyproject.toml`` carries the job in ``[tool.flwr.app.config]`` (``flwr run``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from finetune_sdk.errors import FinetuneError
from finetune_sdk.federated.job import NODE_DATA, NODE_EVAL_DATA, NODE_NAME, NODE_RANK, FederatedJob
from finetune_sdk.federated.server_state import read_status

logger = logging.getLogger("finetune_sdk")
LOOPBACK = "127.0.0.1"
APP_NAME = "finetune-sdk-federated"
#: Flower settings passed through as they are (TLS and authentication).
TLS_FLAGS = ("ssl_certfile", "ssl_keyfile", "ssl_ca_certfile")


def free_port() -> int:
    """An unused TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment of Flower processes: this Python's scripts first on PATH, a private FLWR_HOME."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["FLWR_HOME"] = str(flwr_home)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def node_config(name: str, data: str, eval_data: str | None, rank: int | None = None) -> str:
    """``--node-config`` for a client SuperNode (TOML values, so paths with spaces or quotes survive); ``rank``:
    this client's LoRA rank when lower than the global one (:mod:`finetune_sdk.federated.ranks`)."""
    items: dict[str, Any] = {NODE_NAME: name, NODE_DATA: str(Path(data).resolve())}
    if eval_data:
        items[NODE_EVAL_DATA] = str(Path(eval_data).resolve())
    if rank:
        items[NODE_RANK] = int(rank)
    return " ".join(f"{key}={json.dumps(value)}" for key, value in items.items())


def write_app(folder: Path, job: FederatedJob) -> Path:
    """A Flower app folder whose components are the SDK's apps and whose run config is the job."""
    folder.mkdir(parents=True, exist_ok=True)
    config = "\n".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in job.to_run_config().items())
    (folder / "pyproject.toml").write_text(f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{APP_NAME}"
version = "1.0.0"
description = "finetune-sdk federated fine-tuning"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "finetune-sdk"

[tool.flwr.app.components]
serverapp = "finetune_sdk.federated.server_app:app"
clientapp = "finetune_sdk.federated.client_app:app"

[tool.flwr.app.config]
{config}
""", encoding="utf-8")
    return folder


class FlowerProcesses:
    """Flower processes this SDK started; :meth:`stop` ends exactly those (and waits for them)."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.flwr_home = work_dir / "flwr-home"
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.env = flower_env(self.flwr_home)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        #: a warm client's ClientApp executor command line by client name (to start it again, :meth:`wait_supernode`)
        self.executors: dict[str, tuple[list[str], bool]] = {}

    def start(self, name: str, args: list[str], *, log_to_console: bool = False) -> subprocess.Popen[bytes]:
        if log_to_console:
            process = subprocess.Popen(args, env=self.env, cwd=self.work_dir, start_new_session=True)
        else:
            log = open(self.work_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child writes to it
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.work_dir,
                                       start_new_session=True)
            log.close()
        self.processes[name] = process
        return process

    def superlink(self, port: int, *, insecure: bool = True, tls: dict[str, str | None] | None = None,
                  host: str = LOOPBACK, supernode_auth: bool = False,
                  database: Path | None = None) -> subprocess.Popen[bytes]:
        """Start the SuperLink; with ``database`` its state (the connected SuperNodes, their keys) is kept in that
        SQLite file, so that a SuperLink restarted after a crash still knows the clients, which reconnect."""
        args = [_script("flower-superlink"), "--host", host, "--port", str(port),
                "--disable-runtime-dependency-installation"]
        if database is not None:
            args += ["--database", str(database)]
        args += ["--insecure"] if insecure else _flags(tls or {})
        if supernode_auth:
            args.append("--enable-supernode-auth")
        return self.start("superlink", args)

    def supernode(self, name: str, superlink: str, config: str, *, insecure: bool = True,
                  root_certificates: str | None = None, auth_key: str | None = None,
                  log_to_console: bool = False, warm: bool = False) -> subprocess.Popen[bytes]:
        """Start a client's SuperNode; ``warm``: with ``--isolation process`` and the SDK's long-lived ClientApp
        executor beside it (:mod:`finetune_sdk.federated.warm_client`, process ``clientapp-<name>``), which keeps
        the base model loaded across rounds instead of Flower's new ``flwr-clientapp`` process per message."""
        runtime_port = free_port()
        args = [_script("flower-supernode"), "--superlink", superlink, "--port", str(runtime_port),
                "--node-config", config, "--max-wait-time", "600"]
        args += ["--insecure"] if insecure else (["--root-certificates", root_certificates] if root_certificates
                                                 else [])
        if auth_key:
            args += ["--auth-supernode-private-key", auth_key]
        if warm:
            from finetune_sdk.federated.warm_client import stale_task_seconds

            stale_task_seconds()  # a bad FINETUNE_SDK_STALE_TASK_SECONDS is one line here, before any process starts
            args += ["--isolation", "process"]
        supernode = self.start(f"supernode-{name}", args, log_to_console=log_to_console)
        if warm:
            executor = [sys.executable, "-m", "finetune_sdk.federated.warm_client", "--runtime-api-address",
                        f"{LOOPBACK}:{runtime_port}", "--parent-pid", str(supernode.pid)]
            self.executors[name] = (executor, log_to_console)
            self.start(f"clientapp-{name}", executor, log_to_console=log_to_console)
        return supernode

    def wait_supernode(self, name: str, poll: float = 1.0) -> int:
        """Wait until the SuperNode ``name`` ends and return its exit status; a warm client's ClientApp executor
        that ended while its SuperNode still runs (killed, out of memory) is started again, so that the SuperNode
        keeps serving tasks (the new executor loads the base model again at its first task)."""
        while True:
            code = self.processes[f"supernode-{name}"].poll()
            if code is not None:
                return code
            if name in self.executors and not self.alive(f"clientapp-{name}"):
                args, log_to_console = self.executors[name]
                logger.warning("the ClientApp executor of client %s ended (exit status %s); starting it again",
                               name, self.processes[f"clientapp-{name}"].returncode)
                self.start(f"clientapp-{name}", args, log_to_console=log_to_console)
            time.sleep(poll)

    def connect(self, superlink: str, *, insecure: bool = True, root_certificates: str | None = None) -> None:
        """Point the ``flwr`` CLI of these processes at the SuperLink (connection ``finetune`` in config.toml)."""
        connection = {"address": superlink, "insecure": insecure}
        if root_certificates:
            connection["root-certificates"] = str(Path(root_certificates).resolve())
        lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in connection.items())
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "finetune"\n\n[superlink.finetune]\n{lines}\n', encoding="utf-8")

    def register_supernode(self, public_key: str) -> str:
        """``flwr supernode register`` a client's public key on the SuperLink (after :meth:`connect`); returns the
        node id Flower gives it."""
        answer = self._flwr(["supernode", "register", str(Path(public_key).resolve()), "finetune"], "registration",
                            already="already in use")  # kept in the SuperLink's database from before a crash
        return str(answer.get("node-id", "registered before"))

    def submit(self, app_dir: Path) -> str:
        """``flwr run`` the app on the SuperLink (after :meth:`connect`); returns the run id."""
        return str(self._flwr(["run", str(app_dir), "finetune"], "run")["run-id"])

    def _flwr(self, args: list[str], what: str, already: str | None = None) -> dict[str, Any]:
        """Run a ``flwr`` command with JSON output, retrying for 2 minutes while the SuperLink starts; an answer
        containing ``already`` counts as done (``{}``)."""
        deadline = time.time() + 120
        while True:
            done = subprocess.run([_script("flwr"), *args, "--format", "json"], capture_output=True, text=True,
                                  env=self.env, cwd=self.work_dir, timeout=300)
            answer = _json_tail(done.stdout)
            if done.returncode == 0 and answer.get("success"):
                return answer
            if already and already in done.stdout + done.stderr:
                return {}
            if time.time() > deadline:
                raise FinetuneError(f"Flower refused the {what}: {(done.stdout + done.stderr).strip()[-500:]}")
            time.sleep(1)

    def alive(self, name: str) -> bool:
        process = self.processes.get(name)
        return process is not None and process.poll() is None

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to one process this object started and to everything it started in turn.

        Flower's SuperLink starts its ServerApp through a detached process in a session of its own, so signalling
        the SuperLink's process group alone would leave that ServerApp running after the SuperLink is gone.
        """
        process = self.processes[name]
        if process.poll() is None:
            _signal_tree(process.pid, sig)

    def stop(self) -> None:
        """End every process this object started and their descendants: SIGTERM, then SIGKILL after 15 s."""
        trees = {name: _descendants(process.pid) for name, process in self.processes.items()
                 if process.poll() is None}
        for name in trees:
            _signal_tree(self.processes[name].pid, signal.SIGTERM)
        deadline = time.time() + 15
        for name, process in self.processes.items():
            try:
                process.wait(timeout=max(deadline - time.time(), 0.1))
            except subprocess.TimeoutExpired:
                _signal_tree(process.pid, signal.SIGKILL)
                process.wait()
        for leftover in (pid for pids in trees.values() for pid in pids):  # reparented to init by now
            _signal(leftover, signal.SIGKILL)

    def log_tail(self, name: str, chars: int = 2000) -> str:
        path = self.work_dir / f"{name}.log"
        return path.read_text(encoding="utf-8", errors="replace")[-chars:] if path.is_file() else ""


def _descendants(pid: int) -> list[int]:
    """Process ids of every living descendant of ``pid`` (children first found, then theirs)."""
    import psutil

    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _signal(pid: int, sig: int) -> None:
    """Signal ``pid``'s process group when it leads one of its own (never ours), else the process alone."""
    try:
        group = os.getpgid(pid)
        if group == pid and group != os.getpgrp():
            os.killpg(group, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_tree(pid: int, sig: int) -> None:
    """Signal ``pid`` and all its descendants, found before the first signal so none is missed."""
    descendants = _descendants(pid)
    for target in [pid, *descendants]:
        _signal(target, sig)


def wait_for_run(job: FederatedJob, processes: FlowerProcesses, timeout: float) -> dict[str, Any]:
    """Wait until the ServerApp writes a final status for this run; a failure is raised with its message."""
    deadline = time.time() + timeout
    reported = 0
    while time.time() < deadline:
        status = read_status(job.state_dir)
        if status and status.get("token") == job.run_token and status.get("round", 0) > reported:
            reported = status["round"]
            logger.info("%s", status.get("summary", f"round {reported} done"))
        if status and status.get("token") == job.run_token and status["state"] in ("completed", "failed"):
            if status["state"] == "failed":
                raise FinetuneError(f"federated run failed: {status.get('error')}")
            return status
        if not processes.alive("superlink"):
            raise FinetuneError("the Flower SuperLink stopped before the run finished:\n"
                                + processes.log_tail("superlink"))
        time.sleep(0.5)
    raise FinetuneError(f"the federated run did not finish within {timeout:.0f} s; see the logs in "
                        f"{processes.work_dir}")


def new_work_dir(prefix: str = "finetune-federated-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


def _script(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _flags(values: dict[str, str | None]) -> list[str]:
    args = []
    for key in TLS_FLAGS:
        if values.get(key):
            args += ["--" + key.replace("_", "-"), str(values[key])]
    return args


def _json_tail(text: str) -> dict[str, Any]:
    start = text.find("{")
    try:
        return json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        return {}

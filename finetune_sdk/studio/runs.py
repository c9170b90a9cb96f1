"""The runs of a runs folder: found from their event logs, started as detached processes, stopped and resumed.

A run is ``<runs>/<name>``: its event log ``<runs>/<name>.run/events.jsonl`` (:mod:`finetune_sdk.training.run_events`), and
once finished its result folder ``<runs>/<name>``. Runs started by ``finetune train`` or ``Trainer.fit`` into the
runs folder appear like those started by the studio. A run the studio starts is ``python -m finetune_sdk train ...``
in a new session (``start_new_session=True``): it is not the web server's child in any way that matters, keeps
training when the page or the server closes, and writes ``<name>.run/launch.json`` (its command line and process
id) and ``<name>.run/output.log`` (what it prints).

Example:
    >>> runs = RunsFolder(Path("finetune-runs"))  # doctest: +SKIP
    >>> [run["name"] for run in runs.list()]  # doctest: +SKIP
    ['support-v1', 'support-v2']
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from finetune_sdk.errors import ConfigError
from finetune_sdk.training.run_events import EVENTS_NAME, RUN_AREA_SUFFIX, read_events, run_area

LAUNCH = "launch.json"
OUTPUT = "output.log"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
FINAL = {"end": "finished", "stopped": "stopped", "failed": "failed"}


def check_name(name: str) -> str:
    """A run name: letters, digits, ``.``, ``_``, ``-``; no leading dot, no ``/`` (it never leaves the folder)."""
    if not NAME.match(name or "") or name.endswith(RUN_AREA_SUFFIX) or name.endswith(".checkpoints"):
        raise ConfigError(f"run name {name!r} is not allowed: use letters, digits, '.', '_' and '-' (up to 100, "
                          "not starting with '.')")
    return name


def _started_at(pid: int) -> float | None:
    """When process ``pid`` started (Unix seconds), from ``/proc``; ``None`` when it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    if stat[0] == "Z":
        return None
    return boot + int(stat[19]) / os.sysconf("SC_CLK_TCK")


def _alive(pid: int | None, since: float | None = None) -> bool:
    """True when ``pid`` runs and is the process that wrote at ``since`` (it started no later: a reused id of a
    newer process is not the run). A run started by a Python script is found the same way as one of the CLI."""
    if not pid:
        return False
    if not Path("/proc/self/stat").exists():  # no /proc: the id alone
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    started = _started_at(pid)
    return started is not None and (since is None or started <= since + 2.0)


class RunsFolder:
    """The runs under ``folder``: list them, read their events, start, stop and resume them."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder).resolve()
        self.children: dict[str, subprocess.Popen] = {}  # runs this server started, reaped when they end

    def path(self, name: str) -> Path:
        return self.folder / check_name(name)

    def names(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        found = {p.name[:-len(RUN_AREA_SUFFIX)] for p in self.folder.iterdir()
                 if p.is_dir() and p.name.endswith(RUN_AREA_SUFFIX) and
                 ((p / EVENTS_NAME).is_file() or (p / LAUNCH).is_file())}
        return sorted(n for n in found if NAME.match(n))

    def launch_record(self, name: str) -> dict[str, Any]:
        try:
            return json.loads((run_area(self.path(name)) / LAUNCH).read_text())
        except (OSError, ValueError):
            return {}

    def events(self, name: str) -> list[dict[str, Any]]:
        return read_events(run_area(self.path(name)) / EVENTS_NAME)

    def summary(self, name: str) -> dict[str, Any]:
        """Name, status (starting, running, finished, stopped, failed, interrupted), step, max_steps, last loss,
        device, precision, memory estimate and peak, and whether the page may stop or resume it."""
        for child_name, child in list(self.children.items()):
            if child.poll() is not None:  # reap: a finished child must not linger as a zombie
                del self.children[child_name]
        events = self.events(name)
        launch = self.launch_record(name)
        starts = [e for e in events if e.get("event") == "start"]
        last = events[-1] if events else {}
        if launch.get("started", 0) > last.get("time", 0) and _alive(launch.get("pid"), launch.get("started")):
            status, running = "starting", True  # launched (or resumed) here; loading before its start event
        elif last.get("event") in FINAL:
            status, running = FINAL[last["event"]], False
        elif starts and _alive(starts[-1].get("pid"), starts[-1].get("time")):
            status, running = "running", True
        else:  # killed, or a launch that died before training (its Error: line is in output.log)
            status, running = ("interrupted" if starts else "failed" if launch else "interrupted"), False
        logs = [e for e in events if e.get("event") == "log"]
        start = starts[-1] if starts else {}
        end = last if last.get("event") == "end" else {}
        error = last.get("error") if last.get("event") == "failed" else None
        if status == "failed" and not error:
            error = self.last_error(name)
        return {"name": name, "status": status, "step": (logs[-1]["step"] if logs else 0),
                "max_steps": start.get("max_steps"), "loss": logs[-1].get("loss") if logs else None,
                "model": start.get("model") or launch.get("model"), "technique": start.get("technique"),
                "objective": start.get("objective"), "device": start.get("device"),
                "precision": start.get("precision"), "estimated_memory": start.get("estimated_memory"),
                "peak_memory": end.get("peak_memory"), "started": start.get("time") or launch.get("started"),
                "can_stop": running, "can_resume": status in ("stopped", "interrupted") and bool(launch) and not launch.get("job"),
                "from_studio": bool(launch), "error": error}

    def last_error(self, name: str) -> str | None:
        """The ``Error: ...`` line a failed studio run printed (the CLI's one-line message), if any."""
        try:
            text = (run_area(self.path(name)) / OUTPUT).read_text(errors="replace")
        except OSError:
            return None
        lines = [line for line in text.splitlines() if line.startswith("Error:")]
        return lines[-1] if lines else None

    def list(self) -> list[dict[str, Any]]:
        return [self.summary(n) for n in self.names()]

    def start(self, name: str, args: list[str], cwd: Path, resume: bool = False) -> dict[str, Any]:
        """Start ``finetune train <args> -o <runs>/<name>`` as a detached process; ``ConfigError`` when the name is
        taken by a run that isn't stopped (``resume=False``) or is running."""
        out = self.path(name)
        area = run_area(out)
        if not resume and (area.exists() or out.exists()):
            raise ConfigError(f"a run named {name!r} exists in {self.folder}: pick another name")
        if resume and self.summary(name)["status"] == "running":
            raise ConfigError(f"run {name!r} is running: stop it before resuming")
        area.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "finetune_sdk", "train", *args, "--output-dir", str(out)]
        argv += ["--resume"] if resume else []
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(area / OUTPUT, "ab") as output:
            child = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=output,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.children[name] = child
        record = {"pid": child.pid, "args": args, "started": time.time(), "resumes": resume,
                  "model": args[args.index("--model") + 1] if "--model" in args else None}
        from finetune_sdk.fsutil import atomic_path

        with atomic_path(area / LAUNCH) as tmp:
            Path(tmp).write_text(json.dumps(record, indent=1))
        return self.summary(name)

    def stop(self, name: str) -> dict[str, Any]:
        """SIGTERM to the run's process: it finishes its step, writes a checkpoint and exits (resumable)."""
        summary = self.summary(name)
        if not summary["can_stop"]:
            raise ConfigError(f"run {name!r} is {summary['status']}, not running: nothing to stop")
        starts = [e for e in self.events(name) if e.get("event") == "start"]
        launch = self.launch_record(name)
        candidates = [(starts[-1].get("pid"), starts[-1].get("time")) if starts else (None, None),
                      (launch.get("pid"), launch.get("started"))]
        alive = [int(pid) for pid, since in candidates if _alive(pid, since)]
        if not alive:  # it ended between the summary and now
            raise ConfigError(f"run {name!r} is no longer running: nothing to stop")
        try:
            os.kill(alive[0], signal.SIGTERM)
        except ProcessLookupError:
            raise ConfigError(f"run {name!r} is no longer running: nothing to stop") from None
        return {**summary, "status": "stopping"}

    def resume(self, name: str, cwd: Path) -> dict[str, Any]:
        """Start a stopped or interrupted studio run again with ``--resume`` (its newest checkpoint)."""
        summary = self.summary(name)
        if not summary["can_resume"]:
            raise ConfigError(f"run {name!r} is {summary['status']}: only a stopped or interrupted run started "
                              "here can be resumed (others: finetune train ... --resume)")
        return self.start(name, self.launch_record(name)["args"], cwd, resume=True)

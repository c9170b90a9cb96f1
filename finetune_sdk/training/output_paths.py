"""Where results may be written: never over anything this SDK did not create.

The rule, applied before any model loads (and again at the final rename):

* a path that does not exist is fine, as long as its nearest existing folder is writable;
* an existing path is replaced only when it is a complete earlier result of this SDK (its
  ``finetune_manifest.json`` reads as one), the folder of an earlier sequential run (``stage-<i>`` results only),
  or an empty folder; the replacement is logged;
* anything else there (a user's folder, a file, a model folder) is refused with a one-line error;
* the output can never be, contain or sit inside an input: the base model's folder, a data file, the result being
  merged.

Failed runs leave nothing behind: work and staging folders beside the output carry the process id
(``.<name>.work-<pid>-*``), and a later run removes those of processes that are gone (after a SIGKILL).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from finetune_sdk.errors import ConfigError, FinetuneError
from finetune_sdk.training.manifest import MANIFEST_NAME

#: The checkpoints of an interrupted stage of a sequential run (``output_dir/stage-<i>.checkpoints``).
STAGE_CHECKPOINTS = re.compile(r"stage-\d+\.(checkpoints|run)")  # .run: its event log (finetune_sdk.training.run_events)

logger = logging.getLogger("finetune_sdk")
#: The kinds of scratch folders the SDK creates beside an output path (see :func:`scratch_dir`).
SCRATCH_KINDS = ("work", "staging", "old")
#: OS errors that are the user's to fix (disk full, permissions, read-only disk), shown as one line.
USER_OS_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR,
                            errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG})
#: A full disk or used-up quota: the message names the free space.
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
#: How writers outside Python (safetensors, in Rust) report an OS error in their message: ``(os error 28)``.
OS_ERROR_TEXT = re.compile(r"\(os error (\d+)\)")
#: numpy's ``ndarray.tofile`` (the GGUF writer's) reports a short write, in practice a full disk, without an errno.
SHORT_WRITE_TEXT = re.compile(r"^\d+ requested and \d+ written$")


def is_sdk_result(path: Path) -> bool:
    """True when ``path`` is a folder holding a complete result of this SDK (a readable manifest)."""
    from finetune_sdk.training.manifest import read_manifest

    if not path.is_dir() or path.is_symlink() or not (path / MANIFEST_NAME).is_file():
        return False
    try:
        manifest = read_manifest(path)
    except (FinetuneError, OSError, UnicodeDecodeError):
        return False
    return isinstance(manifest, dict) and "technique" in manifest


def is_sdk_output(path: Path) -> bool:
    """A result, or the folder of a sequential run (only ``stage-<i>`` results, and scratch folders, inside)."""
    if is_sdk_result(path):
        return True
    if not path.is_dir() or path.is_symlink():
        return False
    entries = [p for p in path.iterdir() if not p.name.startswith(".stage-")]
    return bool(entries) and all((p.name.startswith("stage-") and is_sdk_result(p))
                                 or STAGE_CHECKPOINTS.fullmatch(p.name) for p in entries)  # + interrupted stages


def check_output_path(output: str | os.PathLike[str], *,
                      inputs: Iterable[tuple[str, str | os.PathLike[str] | None]] = (), flag: str = "output_dir",
                      probe: bool = True) -> bool:
    """Refuse an output path that would destroy something; return True when it replaces an earlier result.

    Args:
        output: the folder a result will be written to.
        inputs: what the run reads, as (description, path) pairs (``("base model", path)``, ``("data file",
            path)``); the output may not be, contain or sit inside any of them.
        flag: the option's name for messages (``output_dir``, ``--out``).
        probe: check that a new output's nearest existing folder is writable (creates and removes an empty folder).

    Raises:
        ConfigError: one line naming the path and what to do; nothing is written.

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> (folder / "important.txt").write_text("keep me")
        7
        >>> check_output_path(folder)
        Traceback (most recent call last):
        finetune_sdk.errors.ConfigError: output_dir ... is an existing folder that is not a finetune-sdk result ...
        >>> check_output_path(folder / "new-run")
        False
    """
    out = Path(output).expanduser()
    resolved = out.resolve()
    if resolved == Path.cwd().resolve() or Path.cwd().resolve().is_relative_to(resolved):
        raise ConfigError(f"{flag} {out} is the current folder (or holds it); pick a new folder for the result")
    for what, given in inputs:
        if given is None or not isinstance(given, (str, os.PathLike)):
            continue
        other = Path(given).expanduser().resolve()
        if resolved == other or other.is_relative_to(resolved) or resolved.is_relative_to(other):
            relation = "is" if resolved == other else "contains" if other.is_relative_to(resolved) else "is inside"
            raise ConfigError(f"{flag} {out} {relation} the {what} {given}; writing the result there would destroy "
                              "it: pick another folder")
    if out.exists() or out.is_symlink():
        if out.is_symlink():
            raise ConfigError(f"{flag} {out} is a symbolic link; replacing it could reach anything: pick a folder "
                              "path that does not exist yet")
        if not out.is_dir():
            raise ConfigError(f"{flag} {out} is an existing file; pick a folder path that does not exist yet")
        if is_sdk_output(out):
            return True
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise ConfigError(f"{flag} {out} is an existing folder that is not a finetune-sdk result (it holds "
                              f"{shown}); nothing was written: pick a new folder")
        return False
    if probe:
        _check_writable_parent(out, flag)
    return False


#: The files of a comparison report (:func:`finetune_sdk.evaluation.report.write_report`) and how each shows it is ours.
REPORT_FILES = {"comparison.json": '"tuned"', "comparison.html": "Generated by finetune-sdk."}


def check_report_dir(directory: str | os.PathLike[str], flag: str = "report_dir") -> Path:
    """Refuse a report folder whose writing would destroy something; return it as a ``Path``.

    A report adds ``comparison.json`` and ``comparison.html`` to a folder (often the result folder itself): the
    folder may be new, or an existing folder where those two names are free or hold an earlier report of this SDK.
    A file or symbolic link at the folder's path, or a ``comparison.*`` the SDK did not write, is refused.

    Raises:
        ConfigError: one line naming the path and what to do; nothing is written.

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> (folder / "notes.txt").write_text("mine")
        4
        >>> check_report_dir(folder / "notes.txt")
        Traceback (most recent call last):
        finetune_sdk.errors.ConfigError: report_dir .../notes.txt is an existing file; pick a folder for the report
        >>> check_report_dir(folder) == folder
        True
    """
    out = Path(directory).expanduser()
    if out.is_symlink():
        raise ConfigError(f"{flag} {out} is a symbolic link; pick a folder path for the report")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out} is an existing file; pick a folder for the report")
    if not out.exists():
        _check_writable_parent(out, flag)
        return out
    for name, mark in REPORT_FILES.items():
        existing = out / name
        if not (existing.exists() or existing.is_symlink()):
            continue
        try:
            ours = existing.is_file() and not existing.is_symlink() and mark in existing.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            ours = False
        if not ours:
            raise ConfigError(f"{flag} {out} holds a {name} that finetune-sdk did not write; nothing was written: "
                              "pick another folder for the report")
    _check_writable_parent(out / "comparison.json", flag)
    return out


def check_stages_folder(output_dir: Path, count: int) -> None:
    """The folder of a sequential run holds only ``stage-<i>`` results: anything else there is refused."""
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise ConfigError(f"output_dir {output_dir} is an existing file; a sequential run writes stage-1..stage-"
                          f"{count} into a folder: pick a new one")
    foreign = sorted(p.name for p in output_dir.iterdir()
                     if not (p.name.startswith("stage-") and is_sdk_result(p)) and not p.name.startswith(".stage-")
                     and not STAGE_CHECKPOINTS.fullmatch(p.name))  # an interrupted stage's checkpoints
    if foreign:
        raise ConfigError(f"output_dir {output_dir} holds {', '.join(foreign[:3])}, which a sequential run did not "
                          "write; pick a new folder")


def _check_writable_parent(out: Path, flag: str) -> None:
    """The nearest existing ancestor of ``out`` must be a folder this process can create entries in."""
    ancestor = out.absolute().parent
    while not ancestor.exists() and not ancestor.is_symlink() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{flag} {out}: {ancestor} is a file, not a folder; pick a path under a folder")
    try:  # a real probe: os.access says yes to root on read-only or special file systems
        os.rmdir(tempfile.mkdtemp(prefix=".finetune-probe-", dir=ancestor))
    except OSError as exc:
        raise ConfigError(f"{flag} {out}: can't create folders in {ancestor} ({exc.strerror or exc}); pick a "
                          "writable location") from None


def log_replacement(output: Path) -> None:
    """Say which earlier result is being replaced (called just before the rename)."""
    from finetune_sdk.training.manifest import read_manifest

    if not is_sdk_result(output):
        logger.info("replacing the earlier sequential run in %s", output)
        return
    manifest = read_manifest(output)
    logger.info("replacing the earlier %s result in %s (created %s)", manifest.get("technique"), output,
                manifest.get("created", "at an unknown time"))


def scratch_dir(output: Path, kind: str) -> Path:
    """Create ``.<name>.<kind>-<pid>-*`` beside ``output`` (after removing stale ones of dead processes)."""
    output = Path(output)
    remove_stale_scratch(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{output.name}.{kind}-{os.getpid()}-", dir=output.parent))
    except OSError as exc:
        raise user_os_error(exc, output) from None


def remove_stale_scratch(output: Path) -> list[Path]:
    """Remove scratch folders beside ``output`` left by processes that no longer run; return what was removed.

    A stale ``old`` folder holds the previous result moved aside just before a crash: it is put back when the
    output is missing, else removed.
    """
    parent = Path(output).parent
    if not parent.is_dir():
        return []
    removed = []
    for kind in SCRATCH_KINDS:
        for path in parent.glob(f".{Path(output).name}.{kind}-*-*"):
            pid = path.name[len(f".{Path(output).name}.{kind}-"):].split("-", 1)[0]
            if not pid.isdigit() or process_alive(int(pid)):
                continue
            moved_aside = path / Path(output).name
            if kind == "old" and moved_aside.is_dir() and not Path(output).exists():
                os.rename(moved_aside, output)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        logger.info("removed %d folder(s) left by an interrupted run beside %s", len(removed), output)
    return removed


def process_alive(pid: int) -> bool:
    """True when a process with this id runs (or this is our own id)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WriteError(FinetuneError):
    """A save that failed for a reason the user can fix (disk full, permissions), as one line; keeps the OS error
    so that an enclosing save (a result folder around one of its files) can name its own folder instead."""

    def __init__(self, message: str, os_error: OSError) -> None:
        super().__init__(message)
        self.os_error = os_error


def os_error_of(exc: BaseException) -> OSError | None:
    """The operating-system error behind ``exc``: ``exc`` itself, one it was raised ``from``, or the one a writer in
    another language reports as text (safetensors' ``SafetensorError: ... No space left on device (os error 28)``;
    numpy's ``N requested and M written``, a short write without an errno, counts as a full disk).
    A :class:`FinetuneError` is already the user's message: None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, WriteError):  # a file's error, named again for the folder being saved
            return current.os_error
        if isinstance(current, FinetuneError):
            return None
        seen.add(id(current))
        if isinstance(current, OSError):
            if current.errno is None and SHORT_WRITE_TEXT.match(str(current)):
                return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return current
        match = OS_ERROR_TEXT.search(str(current))
        if match:
            code = int(match.group(1))
            return OSError(code, os.strerror(code))
        current = current.__cause__
    return None


def user_os_error(exc: BaseException, target: Path, written: int | None = None) -> BaseException:
    """An OS error the user can fix (disk full, permission...) as a one-line :class:`WriteError` (a
    :class:`FinetuneError`); other errors are returned unchanged. ``exc`` may also be a writer's error wrapping one
    (see :func:`os_error_of`), or the :class:`WriteError` of a file inside ``target``, then named for ``target``.

    A full disk (``ENOSPC``, ``EDQUOT``) names the folder, the space free there and, when ``written`` bytes are
    given, how much the save had written when it failed (the least it needs).

    Example:
        >>> import errno
        >>> print(user_os_error(OSError(errno.EACCES, "Permission denied"), Path("runs/x")))
        can't write runs/x: Permission denied (runs/x); nothing was saved: free space or pick a writable location
    """
    os_exc = os_error_of(exc)
    if os_exc is None or os_exc.errno not in USER_OS_ERRORS:
        return exc
    if os_exc.errno in DISK_FULL:
        from finetune_sdk.advice.machine import format_bytes

        folder = _existing_folder(Path(target).absolute())
        try:
            free = f"the disk holding {folder} has {format_bytes(shutil.disk_usage(folder).free)} free"
        except OSError:
            free = f"free space on the disk holding {folder} unknown"
        size = f"{written} bytes" if written and written < 1024 else format_bytes(written or 0)
        needed = f"; the save had written {size} and needed more" if written else ""
        return WriteError(f"can't write {target}: {os.strerror(os_exc.errno)} ({free}{needed}); nothing was saved: "
                          "free space or pick another location", os_exc)
    where = os_exc.filename or target
    return WriteError(f"can't write {target}: {os_exc.strerror or type(os_exc).__name__} ({where}); nothing was "
                      "saved: free space or pick a writable location", os_exc)


def folder_bytes(folder: Path) -> int:
    """The bytes of the files under ``folder`` (0 when it is gone)."""
    total = 0
    for path in Path(folder).rglob("*"):
        try:
            total += path.stat().st_size if path.is_file() else 0
        except OSError:
            continue
    return total


def _existing_folder(path: Path) -> Path:
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path

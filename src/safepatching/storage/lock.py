"""One command at a time per run, bench, tune or continual directory.

Two commands writing the same stages would overwrite each other's patches and results. The lock is
an ``flock`` on ``DIR/.safepatching.lock``, which the kernel releases when its process ends, however
it ends; the file names the holder (PID, command, start time) for the refusal message. A lock left
by a process that is gone is taken over with a warning. The same process may take a directory it
already holds (a bench running its tuning studies in its own work directory).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safepatching.errors import SafePatchingError

log = logging.getLogger(__name__)
LOCK_NAME = ".safepatching.lock"
_held: dict[Path, int] = {}  # directories this process holds, with how many nested holders


class DirectoryInUseError(SafePatchingError):
    """Another live process holds the directory."""


def holder(lock_file: Path) -> dict:
    """What the lock file says of the process that wrote it ({} when unreadable)."""
    try:
        return json.loads(lock_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def take(lock_file: Path):
    """The open lock file, flocked by this process; a file its holder unlinked while this process
    waited to open it is opened again, so two processes never hold two files of one name."""
    while True:
        handle = open(lock_file, "a+", encoding="utf-8")  # noqa: SIM115 - held open while the lock is
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            other = holder(lock_file)
            raise DirectoryInUseError(
                f"{lock_file.parent} is in use by PID {other.get('pid', '?')} "
                f"({other.get('command', 'unknown command')}, since {other.get('started', '?')})",
                "wait for it to finish, or give this command another directory",
            ) from None
        try:
            if os.stat(lock_file).st_ino == os.fstat(handle.fileno()).st_ino:
                return handle
        except FileNotFoundError:
            pass
        handle.close()


@contextmanager
def directory_lock(directory: Path, command: str | None = None) -> Iterator[None]:
    """Hold ``directory`` for this process while the block runs (see the module doc); a second
    process gets a one-line DirectoryInUseError and the directory is left as it was."""
    directory = Path(directory).resolve()
    if directory in _held:
        _held[directory] += 1
        try:
            yield
        finally:
            _held[directory] -= 1
        return
    lock_file = directory / LOCK_NAME
    directory.mkdir(parents=True, exist_ok=True)
    handle = take(lock_file)
    try:
        previous = holder(lock_file)
        if previous.get("pid") not in (None, os.getpid()):
            log.warning(
                "%s: taking over the lock of PID %s (%s), which is gone", directory, previous["pid"],
                previous.get("command", "unknown command"),
            )  # fmt: skip
        handle.seek(0)
        handle.truncate()
        record = {"pid": os.getpid(), "command": command or " ".join(["safepatching", *sys.argv[1:]]),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
        handle.write(json.dumps(record))
        handle.flush()
        _held[directory] = 1
        try:
            yield
        finally:
            del _held[directory]
            lock_file.unlink(missing_ok=True)
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()

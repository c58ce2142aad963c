"""Advisory file locks: the project lock (one pipeline or stage at a time) and the
promotion gate's lock (read champion, compare, set alias as one step).

Both are ``fcntl.flock`` locks on a small file, so the operating system releases them when
the holding process ends, however it ends (a ``kill -9`` leaves no stale lock). The project
lock file also records who holds it (pid, host, start time, command) so that a refused run
can say which run is in the way. Locks are re-entrant within a process: the Prefect flow
takes the project lock that its command line already holds.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from polydet.core.errors import PolydetError

PROJECT_LOCK = Path(".polydet.lock")  # in the project directory (the working directory)

_held: dict[str, tuple[int, int]] = {}  # resolved path -> (fd, depth), this process
_guard = threading.RLock()


class LockedError(PolydetError):
    """Another run holds the lock this one needs."""


def describe_holder(path: Path) -> str:
    """``pid 123 on host, started 2026-..., command: polydet train`` from a lock file."""
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process (it has not written its details yet)"
    return (
        f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}, "
        f"command: {info.get('command')}"
    )


def _command() -> str:
    argv = [Path(sys.argv[0]).name if sys.argv else "python", *sys.argv[1:]]
    return shlex.join(argv)


@contextmanager
def file_lock(
    path: str | Path, *, wait: bool, what: str = "this project", record: bool = True
) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` for the ``with`` body.

    ``wait=False`` raises :class:`LockedError` naming the holder when the lock is taken;
    ``wait=True`` blocks until it is free. ``record`` writes this process's details into the
    file for others to read.
    """
    path = Path(path)
    key = str(path.resolve())
    with _guard:
        if key in _held:  # re-entrant within this process
            fd, depth = _held[key]
            _held[key] = (fd, depth + 1)
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _guard:
                fd, depth = _held[key]
                _held[key] = (fd, depth - 1)
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise LockedError(f"{path}: cannot create the lock file for {what}: {e.strerror}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = describe_holder(path)
            for _ in range(10):  # the holder writes its details just after locking
                if "not written" not in holder:
                    break
                time.sleep(0.05)
                holder = describe_holder(path)
            raise LockedError(
                f"{what} is in use by {holder} (lock {path}); wait for it to finish or stop it"
            ) from None
        if record:
            details = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": datetime.now(UTC).isoformat(timespec="seconds"),
                "command": _command(),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(details) + "\n").encode(), 0)
        with _guard:
            _held[key] = (fd, 1)
        try:
            yield
        finally:
            with _guard:
                _held.pop(key, None)
            if record:
                os.ftruncate(fd, 0)  # no details left behind once released
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def project_lock(root: str | Path = ".") -> Iterator[None]:
    """The project's outputs lock: one pipeline (or ``polydet`` stage) at a time.

    A second run refuses at once with a :class:`LockedError` naming the holder. Under
    ``torchrun`` only rank 0 takes it (the other ranks are part of the same run).
    """
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    with file_lock(Path(root) / PROJECT_LOCK, wait=False, what=f"project {Path(root).resolve()}"):
        yield

"""Writing output files safely: atomically (temp file + rename, so the previous good file
stays when a write fails or the process is killed), with one-line errors naming the path and
the cause (disk full, read-only file system, permissions), and no temp files left behind.

Temp files are named ``.<name>.<pid>.<random>.tmp`` beside their target: a write that fails
removes its own; one left by a killed process is removed by :func:`remove_stale_temps` when
its process is no longer alive.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from polydet.core.errors import PolydetError


class WriteError(PolydetError, OSError):
    """An output file or directory could not be written (the message names it and why)."""


_HINTS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "the file is larger than allowed",
}


def describe_os_error(
    e: OSError, path: str | Path | None = None, verb: str = "cannot write"
) -> str:
    """``"cannot write PATH: the disk is full (No space left on device)"``."""
    where = path if path is not None else (e.filename or "?")
    cause = e.strerror or str(e)
    hint = _HINTS.get(e.errno or 0)
    head = f"{verb} {where}" if verb else str(where)
    return f"{head}: {hint} ({cause})" if hint else f"{head}: {cause}"


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a temp file beside ``path``, fsync, rename it to ``path``.

    On any failure (or a ``KeyboardInterrupt``) the temp file is removed and ``path`` keeps
    its previous content; an ``OSError`` becomes a :class:`WriteError` naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise WriteError(describe_os_error(e, e.filename or path.parent)) from e
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise WriteError(describe_os_error(e, path)) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """:func:`atomic_write` of a text file."""
    data = text.encode(encoding)
    return atomic_write(path, lambda f: f.write(data))


def torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` atomically. The bytes are serialized in memory first, so that a full
    disk surfaces as an ``OSError`` with its cause, not as torch's "iostream error"."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this host)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


_TEMP = re.compile(r"^\.(?P<name>.+?)\.(?P<rest>[^/]+)\.tmp$")
LEGACY_STALE_S = 600.0  # a temp file without a pid (older polydet) is stale after this


def _stale(p: Path, rest: str) -> bool:
    pids = [int(part) for part in rest.split(".") if part.isdigit()]
    if pids:
        return not process_alive(pids[0])
    try:
        return time.time() - p.stat().st_mtime > LEGACY_STALE_S
    except OSError:
        return False


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Remove the temp files of :func:`atomic_write` left in ``directory`` by processes that
    are gone (a killed checkpoint write leaves tens of MB); returns what was removed."""
    directory = Path(directory)
    removed: list[Path] = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TEMP.match(p.name)
        if m and p.is_file() and _stale(p, m["rest"]):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def torch_load_problem(path: str | Path, e: BaseException) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in words that never suggest
    ``weights_only=False`` (which would run whatever code a pickle holds)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as err:
        return f"cannot read it ({err.strerror or err})"
    if size == 0:
        return "the file is empty (0 bytes)"
    if head != b"PK\x03\x04":  # torch.save writes a zip archive
        return f"not a file written by torch.save ({size} bytes of something else)"
    text = str(e)
    if "Weights only load failed" in text or "Unsupported global" in text:
        return "it holds objects other than tensors and plain data; refused, since loading them could run code"
    return f"damaged or truncated ({type(e).__name__})"

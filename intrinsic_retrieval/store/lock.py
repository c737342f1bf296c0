"""The single-writer lock: an advisory `flock` on ``<store>/.lock``.

One process writes a store at a time; any number of processes read it. The lock is taken by the
first write of a handle (not at open, so several processes can open and search the same index) and
held until the handle closes. It is per process: all handles of one process on the same directory
share it, and those are kept apart by the manifest's commit id instead (see `EncodedChunkStore`).
The kernel drops a flock when its process dies, so a crash never leaves a stale lock behind.
Where `fcntl` is missing (Windows) locking is a no-op and single-writer use is the caller's duty.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from ..errors import ConcurrentWriteError, StoreError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"

_mutex = threading.Lock()
_held: dict[str, list[int]] = {}  # realpath -> [fd, number of holders in this process]


def _key(root: Path) -> str:
    return os.path.realpath(root)


def acquire(root: Path) -> str:
    """Take (or share, within this process) the writer lock of `root`; returns the key to release.

    Raises `ConcurrentWriteError` when another process holds it.
    """
    key = _key(root)
    with _mutex:
        if key in _held:
            _held[key][1] += 1
            return key
        _held[key] = [_flock(root, key), 1]
        return key


def try_exclusive(root: Path) -> str | None:
    """The lock only if nobody (this process included) holds it: for crash recovery at open,
    which deletes files that an in-flight write may be about to commit."""
    key = _key(root)
    with _mutex:
        if key in _held:
            return None
        try:
            _held[key] = [_flock(root, key), 1]
        except StoreError:
            return None
        return key


def _flock(root: Path, key: str) -> int:
    try:
        fd = os.open(os.path.join(key, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StoreError(f"cannot write store {root}: lock file not creatable ({exc})") from exc
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise ConcurrentWriteError(
                f"store {root} is being written by another process (lock {key}/{LOCK_FILE}); "
                "a store has one writer at a time"
            ) from exc
    return fd


def release(key: str) -> None:
    with _mutex:
        entry = _held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del _held[key]
            os.close(entry[0])  # closing the descriptor drops the flock

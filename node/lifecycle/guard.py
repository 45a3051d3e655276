"""Coordination of a purge with the rest of the node: a per-study guard shared with the receiver (in
the node process), and the node's lock file (``<storage_dir>/node.lock``) that tells the CLI the node
runs."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from models.errors import DicomNodeError

LOCK_FILE = "node.lock"


class NodeRunningError(DicomNodeError):
    """A real purge from the CLI while the node runs (its receiver may be writing the same study)."""


class StudyGuard:
    """Readers-writer exclusion per Study Instance UID: any number of receiving threads store
    instances of a study at once (:meth:`receiving`), a purge of it (:meth:`purging`) waits for them
    and holds new ones back until its rows are deleted and its files unlinked. So an instance that
    arrives during a purge is stored after it, in a study of its own, and never lost."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._purging: set[str] = set()
        self._active: Counter[str] = Counter()

    @contextlib.contextmanager
    def receiving(self, study_uid: str) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: study_uid not in self._purging)
            self._active[study_uid] += 1
        try:
            yield
        finally:
            with self._cond:
                self._active[study_uid] -= 1
                if not self._active[study_uid]:
                    del self._active[study_uid]
                self._cond.notify_all()

    @contextlib.contextmanager
    def purging(self, study_uid: str) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: study_uid not in self._purging)
            self._purging.add(study_uid)  # new receivers wait from here on
            self._cond.wait_for(lambda: not self._active[study_uid])
        try:
            yield
        finally:
            with self._cond:
                self._purging.discard(study_uid)
                self._cond.notify_all()


class NodeLock:
    """The exclusive ``flock`` the running node holds on ``<storage_dir>/node.lock``."""

    def __init__(self, storage_dir: Path) -> None:
        self.path = storage_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock; False when another process holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def node_running(storage_dir: Path) -> bool:
    """Whether a node process holds ``<storage_dir>/node.lock`` (runs on this storage directory)."""
    try:
        fd = os.open(storage_dir / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def require_node_stopped(storage_dir: Path) -> None:
    """Raise :class:`NodeRunningError` when the node runs on ``storage_dir``: a purge from outside
    it could race its receiver; the node purges by itself (``storage.check_seconds``) and on
    ``POST /api/v1/storage/purge``."""
    if node_running(storage_dir):
        raise NodeRunningError(
            f"the node is running on {storage_dir}: it purges by itself every storage.check_seconds; "
            "to purge now, use POST /api/v1/storage/purge?dry_run=false (admin token), or stop the node first")

"""The spool: durable, deduplicated files on one local filesystem.

A file is written to ``tmp/`` in the same filesystem, fsynced, renamed into place and the directory
fsynced, so a crash at any moment leaves either the whole file or nothing (plus a temp file that
:meth:`Spool.clean_temp` removes at start-up). UIDs become path components only after validation.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from models.errors import StorageError

UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
"""A valid DICOM UID (digits and dots, no leading zeros in components)."""


def is_valid_uid(uid: object) -> bool:
    return isinstance(uid, str) and 0 < len(uid) <= 64 and UID_RE.match(uid) is not None


@dataclass(frozen=True)
class Stored:
    path: Path
    relative: str
    size: int
    new: bool
    """False when the file already existed (duplicate): the existing copy is kept untouched."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Files under ``root``: ``instances/<study>/<series>/<sop>.dcm``, ``results/...``, ``tmp/``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        for d in (self.tmp, root / "instances", root / "results"):
            d.mkdir(parents=True, exist_ok=True)

    def instance_relpath(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        for uid in (study_uid, series_uid, sop_uid):
            if not is_valid_uid(uid):
                raise StorageError("invalid UID used as a path component")
        return f"instances/{study_uid}/{series_uid}/{sop_uid}.dcm"

    def result_relpath(self, study_uid: str, sop_uid: str) -> str:
        for uid in (study_uid, sop_uid):
            if not is_valid_uid(uid):
                raise StorageError("invalid UID used as a path component")
        return f"results/{study_uid}/{sop_uid}.dcm"

    def path(self, relative: str) -> Path:
        return self.root / relative

    def new_temp(self) -> Path:
        """A fresh name in ``tmp/`` for a file to :meth:`place` later (removed by :meth:`clean_temp` after a crash)."""
        return self.tmp / f"{secrets.token_hex(8)}.part"

    def write(self, relative: str, data: bytes | memoryview, *, replace: bool = False) -> Stored:
        """Durably store ``data`` at ``relative``. Without ``replace`` an existing file wins (dedup)."""
        final = self.root / relative
        if not replace and final.exists():
            return Stored(final, relative, final.stat().st_size, new=False)
        tmp = self.new_temp()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise StorageError(f"cannot store file: {exc.strerror or exc}") from exc
        return self._install(tmp, relative, replace=replace)

    def place(self, tmp: Path, relative: str) -> Stored:
        """Durably store an already written temp file of ``tmp/`` at ``relative``: fsync it, link it
        into place (an existing file wins, as in :meth:`write`), fsync the directory. ``tmp`` is
        always consumed: moved into place or removed."""
        if tmp.parent != self.tmp or tmp.suffix != ".part":
            raise StorageError("not a temp file of this spool")
        final = self.root / relative
        try:
            if final.exists():
                tmp.unlink()
                return Stored(final, relative, final.stat().st_size, new=False)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise StorageError(f"cannot store file: {exc.strerror or exc}") from exc
        return self._install(tmp, relative, replace=False)

    def _install(self, tmp: Path, relative: str, *, replace: bool) -> Stored:
        """Move the fsynced ``tmp`` to ``relative`` and fsync the directory (``tmp`` is consumed)."""
        final = self.root / relative
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            if replace:
                os.replace(tmp, final)
                new = True
            else:
                try:
                    os.link(tmp, final)  # atomic, and fails if a concurrent writer got there first
                    new = True
                except FileExistsError:
                    new = False
                os.unlink(tmp)
            _fsync_dir(final.parent)  # the new name is durable; tmp/ entries need no fsync
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise StorageError(f"cannot store file: {exc.strerror or exc}") from exc
        return Stored(final, relative, final.stat().st_size, new=new)

    def clean_temp(self) -> int:
        """Remove temp files left by a crash; returns how many were removed."""
        n = 0
        for p in self.tmp.glob("*.part"):
            p.unlink(missing_ok=True)
            n += 1
        return n

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

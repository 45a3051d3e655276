import os
import threading
from pathlib import Path

import pytest

from node.spool import Spool, StorageError, is_valid_uid


def test_write_is_atomic_and_deduplicated(tmp_path: Path) -> None:
    sp = Spool(tmp_path)
    rel = sp.instance_relpath("1.2.3", "1.2.3.4", "1.2.3.4.5")
    first = sp.write(rel, b"first")
    second = sp.write(rel, b"second")
    assert first.new and not second.new
    assert sp.path(rel).read_bytes() == b"first"
    assert list(sp.tmp.iterdir()) == []


def test_replace_overwrites(tmp_path: Path) -> None:
    sp = Spool(tmp_path)
    rel = sp.result_relpath("1.2", "1.2.9")
    sp.write(rel, b"a")
    sp.write(rel, b"bb", replace=True)
    assert sp.path(rel).read_bytes() == b"bb"


def test_concurrent_writers_store_once(tmp_path: Path) -> None:
    sp = Spool(tmp_path)
    rel = sp.instance_relpath("1.2", "1.2.3", "1.2.3.4")
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(sp.write(rel, bytes([i]) * 1000)))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.new for r in results) == 1
    assert len(sp.path(rel).read_bytes()) == 1000
    assert list(sp.tmp.iterdir()) == []


@pytest.mark.parametrize("uid", ["../etc", "1.2.03", "", "1..2", "1.2/3", "a.b", "1" * 65])
def test_invalid_uids_never_become_paths(tmp_path: Path, uid: str) -> None:
    assert not is_valid_uid(uid)
    with pytest.raises(StorageError):
        Spool(tmp_path).instance_relpath("1.2", "1.2.3", uid)


def test_clean_temp_removes_partial_files(tmp_path: Path) -> None:
    sp = Spool(tmp_path)
    (sp.tmp / "abc.part").write_bytes(b"half")
    assert sp.clean_temp() == 1
    assert list(sp.tmp.iterdir()) == []


def test_place_links_a_written_temp_file_with_write_semantics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sp = Spool(tmp_path)
    rel = sp.instance_relpath("1.2.3", "1.2.3.4", "1.2.3.4.5")
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    tmp = sp.new_temp()
    tmp.write_bytes(b"first")
    first = sp.place(tmp, rel)
    assert first.new and first.size == 5 and sp.path(rel).read_bytes() == b"first"
    assert len(synced) == 2  # the file, then its directory
    again = sp.new_temp()
    again.write_bytes(b"second")
    second = sp.place(again, rel)  # an existing file wins (dedup), the temp file is removed
    assert not second.new and sp.path(rel).read_bytes() == b"first"
    assert list(sp.tmp.iterdir()) == []


def test_place_takes_only_its_own_temp_files(tmp_path: Path) -> None:
    sp = Spool(tmp_path)
    outside = tmp_path / "x.part"
    outside.write_bytes(b"x")
    with pytest.raises(StorageError):
        sp.place(outside, sp.instance_relpath("1.2", "1.2.3", "1.2.3.4"))
    assert outside.exists()
    missing = sp.new_temp()
    with pytest.raises(StorageError):
        sp.place(missing, sp.instance_relpath("1.2", "1.2.3", "1.2.3.4"))
    assert sp.new_temp().suffix == ".part" and sp.new_temp() != sp.new_temp()

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

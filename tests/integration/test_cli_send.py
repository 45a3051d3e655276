"""``dicom-node send`` and ``push`` over real sockets on loopback: into dcmtk's storescp (C-STORE), into the
node's own STOW-RS (a dicomweb destination) and into the node's own receiver (push), with the CLI's exit
codes, summary and progress bar (under a pseudo-terminal)."""

from __future__ import annotations

import os
import pty
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml

from node.catalog import Catalog
from node.cli import main
from node.config import Settings
from node.receive.scp import Receiver
from node.roles import Role
from node.spool import Spool
from testkit.harness import VENV_BIN, free_port, peer_entries, port_open, stop_process, tool_env, wait_for
from tests.dsfactory import ct_slice, encode
from tests.httpkit import serve

STUDY = "1.2.826.0.1.3680043.99.7"
N = 12


@pytest.fixture
def series(tmp_path: Path) -> Path:
    """A folder of N CT slices in two sub-folders, plus files that are not instances."""
    root = tmp_path / "study"
    for i in range(N):
        folder = root / ("a" if i < N // 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        ds = ct_slice(STUDY, f"{STUDY}.1", f"{STUDY}.1.{i + 1}", z=float(i))
        ds.PatientName, ds.PatientID = "Send^Test", "CLI-SEND-1"
        (folder / f"{i:03d}.dcm").write_bytes(encode(ds))
    (root / "README.txt").write_text("not DICOM")
    return root


def _config(tmp_path: Path, **sections: Any) -> Path:
    cfg = tmp_path / "node.yaml"
    data = {"node": {"storage_dir": str(tmp_path / "s"), "min_free_mb": 0}, **sections}
    cfg.write_text(yaml.safe_dump(data))
    return cfg


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path, subprocess.Popen[bytes]]]:
    port, out = free_port(), tmp_path / "storescp"
    out.mkdir()
    with open(tmp_path / "storescp.log", "wb") as log:
        proc = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(out), str(port)], stdout=log,
                                stderr=subprocess.STDOUT, env=tool_env())
    try:
        wait_for(lambda: port_open(port), 20, what="storescp")
        yield port, out, proc
    finally:
        stop_process(proc)


def _uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def test_send_to_storescp_then_to_a_stopped_one(tmp_path: Path, series: Path, storescp: Any,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    port, out, proc = storescp
    cfg = _config(tmp_path, destinations=[
        {"name": "pacs", "type": "dimse", "ae_title": "STORESCP", "host": "127.0.0.1", "port": port}])
    assert main(["send", str(series), "--to", "pacs", "--batch", "5", "-c", str(cfg)]) == 0
    text = capsys.readouterr().out
    assert f"sent {N} of {N} instance(s)" in text and "to pacs (STORESCP at 127.0.0.1" in text
    assert "skipped 1 file(s)" in text and "README.txt" in text
    assert _uids(sorted(out.iterdir())) == _uids(sorted(series.rglob("*.dcm")))
    assert "Send^Test" not in text and "CLI-SEND-1" not in text

    stop_process(proc)
    assert main(["send", str(series / "a"), str(series / "b" / "006.dcm"), "--to", "pacs", "-c", str(cfg)]) == 1
    text = capsys.readouterr().out
    assert "sent 0 of 7 instance(s)" in text and "no association with pacs" in text

    assert main(["send", str(series), "--to", "nowhere", "-c", str(cfg)]) == 2
    assert "--to 'nowhere': no such destination; configured: pacs" in capsys.readouterr().err


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    settings = Settings.model_validate({
        "node": {"ae_title": "AI-NODE", "host": "127.0.0.1", "port": free_port(), "min_free_mb": 0,
                 "storage_dir": str(tmp_path / "node"),
                 "peers": [{"ae_title": "ECHO-ONLY", "host": "127.0.0.1", "allow": ["echo"]},
                           *peer_entries("SCANNER")]},
    })
    r = Receiver(settings, Catalog.for_storage(settings.node.storage_dir), Spool(settings.node.storage_dir),
                 clock=lambda: 0.0)
    r.start()
    yield r
    r.stop()


def test_push_into_the_node_as_its_first_peer_allowed_to_store(tmp_path: Path, series: Path, receiver: Receiver,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    node = receiver.settings.node.model_dump(mode="json")
    cfg = _config(tmp_path, node={**node, "host": "0.0.0.0"})  # the CLI connects to 127.0.0.1
    assert main(["push", str(series), "-c", str(cfg)]) == 0
    text = capsys.readouterr().out
    assert "calling AE SCANNER" in text and f"sent {N} of {N}" in text
    assert receiver.catalog.counts()["instances"]["total"] == N

    assert main(["push", str(series / "a"), "--calling-ae", "ECHO-ONLY", "-c", str(cfg)]) == 1  # refused 0x0124
    text = capsys.readouterr().out
    assert "sent 0 of 6" in text and "status 0x0124" in text

    cfg = _config(tmp_path, node={**node, "peers": []})
    assert main(["push", str(series), "-c", str(cfg)]) == 2
    assert "no entry of node.peers may store from 127.0.0.1" in capsys.readouterr().err


def test_send_by_stow_rs_to_the_nodes_own_dicomweb(tmp_path: Path, series: Path, receiver: Receiver,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with serve(receiver, role=Role.SENDER) as server:
        token = tmp_path / "token"
        token.write_text(server.token)
        token.chmod(0o600)
        cfg = _config(tmp_path, destinations=[{"name": "web", "type": "dicomweb", "url": f"{server.url}/dicom-web",
                                               "token_file": str(token)}])
        assert main(["send", str(series), "--to", "web", "--batch", "4", "-c", str(cfg)]) == 0
    text = capsys.readouterr().out
    assert f"sent {N} of {N} instance(s)" in text and "web (STOW-RS http://127.0.0.1:" in text
    assert receiver.catalog.counts()["instances"]["total"] == N


def test_progress_bar_on_a_terminal(tmp_path: Path, series: Path, storescp: Any) -> None:
    """The installed command under a pseudo-terminal: the bar shows instances, bytes, MB/s and ETA."""
    port, out, _ = storescp
    cfg = _config(tmp_path, destinations=[
        {"name": "pacs", "type": "dimse", "ae_title": "STORESCP", "host": "127.0.0.1", "port": port}])
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.Popen([str(VENV_BIN / "dicom-node"), "send", str(series), "--to", "pacs", "--batch", "3",
                                 "-c", str(cfg)], stdin=subprocess.DEVNULL, stdout=secondary, stderr=secondary,
                                env={**tool_env(), "COLUMNS": "160", "TERM": "xterm"})
        os.close(secondary)
        chunks = []
        while True:
            try:
                data = os.read(primary, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        assert proc.wait(timeout=60) == 0
    finally:
        os.close(primary)
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))
    assert f"{N}/{N} instances" in screen and "ETA" in screen, screen
    assert re.search(r"\d+(\.\d+)? [kM]B/s", screen), screen
    assert len(list(out.iterdir())) == N

"""``dicom-node worker --gpus 0,1``: one real worker process per GPU, each seeing only its own GPU
(``CUDA_VISIBLE_DEVICES``), concurrency 1 on the gpu queue. Needs no GPU: the test reads what each
child process was given from /proc, then stops the command with SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from node.cli import main
from node.cli.run import gpu_workers
from testkit.harness import REPO, wait_for

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().partition("=")[::2] for item in raw if item)


def test_gpu_worker_commands(tmp_path: Path) -> None:
    cfg = tmp_path / "node.yaml"
    specs = gpu_workers(cfg, "0, GPU-8f3a", environ={"PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "0,1,2"})
    assert [env for _, env in specs] == [{"PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "0"},
                                        {"PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "GPU-8f3a"}]
    cmd = specs[0][0]
    assert cmd[1:3] == ["-m", "workers"] and cmd[cmd.index("--concurrency") + 1] == "1"
    assert cmd[cmd.index("--queues") + 1] == "gpu"
    assert gpu_workers(cfg, "1", "gpu,gpu-large")[0][0][-1] == "gpu,gpu-large"
    cfg.write_text(yaml.safe_dump({"node": {"storage_dir": str(tmp_path / "s")}}))
    for bad in ("0,0", "0,,1", "0;rm"):
        assert main(["worker", "-c", str(cfg), "--gpus", bad]) == 2


def test_worker_gpus_starts_one_process_per_gpu_with_its_device(tmp_path: Path) -> None:
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({"node": {"storage_dir": str(tmp_path / "storage")},
                                   "queue": {"poll_seconds": 0.1}}))
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    with open(tmp_path / "cli.log", "wb") as log:
        cli = subprocess.Popen([sys.executable, "-m", "node.cli", "worker", "-c", str(cfg), "--gpus", "0,1"],
                               cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        children = wait_for(lambda: len(c := _children(cli.pid)) == 2 and c, 60, what="two worker processes")
        seen = {}
        for pid in children:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            assert b"workers" in cmdline and b"--concurrency" in cmdline and b"gpu" in cmdline
            seen[_environ(pid).get("CUDA_VISIBLE_DEVICES")] = pid
        assert sorted(seen, key=str) == ["0", "1"]
    finally:
        cli.send_signal(signal.SIGTERM)
        rc = cli.wait(timeout=60)
    assert rc == 0, (tmp_path / "cli.log").read_text()[-2000:]
    assert not _children(cli.pid)

"""Ingest by STOW-RS: the node's streaming STOW-RS route against C-STORE and Orthanc's STOW-RS.

Run by hand from the repository root:
    TCP_NODELAY=1 .venv/bin/python -m bench.stow_ingest [--count 300] [--big 2000] [--profile DIR]
(:func:`rows` gives the figures to ``bench.all``'s table, without the large request.)

Writes a phantom CT series (``--count`` slices of 512x512) and pushes it, each time to a fresh
``dicom-node run`` (no rules, no workers) or a fresh private Orthanc on loopback:

* to the node by STOW-RS in one request, and in requests of 50 instances (one connection);
* to the node by C-STORE (``storescu``, one association): the reference of the ratios;
* to Orthanc by its own STOW-RS (``POST /dicom-web/studies``, one request).

Every STOW-RS body is streamed from the files on disk by a generator (Content-Length known), so
the client holds no request in memory. Prints instances/s, MB/s and ratios from the same run.
Then it sends one large request (``--big`` instances, about 1 GB by default: copies of the series
with new UIDs, written to a temp dir) to a fresh node and prints the node's peak RSS above idle
(VmRSS sampled every 20 ms, and VmHWM). The target: under 150 MB above idle for 1 GB. With
``--profile DIR`` the node is sampled by py-spy in each run (:func:`spied`).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import signal
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import UID

from bench.report import Row
from testkit.dicom import write_ct_series
from testkit.harness import (
    VENV_BIN,
    Orthanc,
    bearer,
    create_token,
    free_port,
    node_config,
    port_open,
    start_node_process,
    stop_process,
    storescu,
    wait_for,
)
from testkit.phantom import make_ct_phantom

MB = 1e6
RSS_TARGET_MB = 150


def stow_files(url: str, files: list[Path], timeout: float = 1800,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """POST ``files`` as one multipart/related request to ``url``, streamed from disk; ``headers``:
    added to the request (the node's ``Authorization``)."""
    boundary = uuid.uuid4().hex
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    tail = f"--{boundary}--\r\n".encode()
    length = sum(len(head) + f.stat().st_size + 2 for f in files) + len(tail)

    def body() -> Iterator[bytes]:
        for f in files:
            yield head
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    yield chunk
            yield b"\r\n"
        yield tail

    target = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(target.hostname or "127.0.0.1", target.port, timeout=timeout)
    try:
        conn.request("POST", target.path, body=body(), headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Content-Length": str(length), "Accept": "application/dicom+json", **(headers or {})})
        response = conn.getresponse()
        payload = response.read()
    finally:
        conn.close()
    try:
        parsed = json.loads(payload) if payload else {}
    except ValueError:
        parsed = {}
    return response.status, parsed if isinstance(parsed, dict) else {}


class Node:
    """A fresh ``dicom-node run`` (its own storage), receiving only: no rules, no workers."""

    def __init__(self, work: Path, orthanc: Orthanc) -> None:
        work.mkdir(parents=True)
        self.work = work
        self.dicom_port, self.http_port = free_port(), free_port()
        config = node_config(work, node_port=self.dicom_port, orthanc=orthanc, quiet_seconds=3600,
                             embedded_workers=False, http_port=self.http_port,
                             overrides={"rules": [], "http": {"max_request_mb": 4096}})
        self.auth = bearer(create_token(config, "sender"))  # STOW-RS needs a sender's token
        self.proc = start_node_process(config, "run", "node.log", port=self.dicom_port)
        wait_for(lambda: port_open(self.http_port), 30, what="the node's HTTP service")

    @property
    def dicomweb(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web/studies"

    def stored(self) -> int:
        return sum(1 for _ in (self.work / "node-storage" / "instances").rglob("*.dcm"))

    def rss_kb(self, field: str = "VmRSS") -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"no {field} for pid {self.proc.pid}")

    def stop(self) -> None:
        stop_process(self.proc)


@contextlib.contextmanager
def spied(pid: int, out: Path | None) -> Iterator[None]:
    """Sample process ``pid`` with py-spy while the block runs: collapsed stacks with thread names to
    ``out`` and a flame graph next to it (``.svg``); only the thread holding the GIL, so CPU spent in
    Python, not waits. ``out`` None: no profile. py-spy takes CPU from the process: time runs without it."""
    if out is None:
        yield
        return
    spies = [subprocess.Popen([str(VENV_BIN / "py-spy"), "record", "--pid", str(pid), "--threads", "--gil",
                               "--rate", "100", "--nonblocking", "--format", fmt, "-o", str(path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
             for fmt, path in (("raw", out), ("flamegraph", out.with_suffix(".svg")))]
    try:
        time.sleep(1)  # attached
        yield
        for spy in spies:
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            spy.wait(timeout=60)
    finally:
        for spy in spies:
            if spy.poll() is None:
                spy.kill()


def timed(send: Callable[[], None]) -> float:
    t0 = time.monotonic()
    send()
    return time.monotonic() - t0


def stow_ok(url: str, files: list[Path], headers: dict[str, str] | None = None) -> None:
    status, module = stow_files(url, files, headers=headers)
    assert status == 200, (status, str(module)[:500])


def copies(files: list[Path], n: int, out: Path) -> list[Path]:
    """``n`` instances: the series again and again, each round a new series (new UIDs)."""
    out.mkdir(parents=True)
    written = []
    for i in range(n):
        ds = pydicom.dcmread(files[i % len(files)])
        round_ = i // len(files)
        ds.SeriesInstanceUID = f"{ds.SeriesInstanceUID}.{round_ + 1}"[:64]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(f"2.25.{uuid.uuid4().int}")
        ds.SeriesNumber = round_ + 1
        path = out / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


def peak_rss(node: Node, files: list[Path]) -> tuple[float, float, float, float]:
    """(idle MB, peak VmRSS above idle, VmHWM above idle, seconds) for one request of ``files``."""
    time.sleep(2)
    idle = node.rss_kb()
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(node.rss_kb())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        took = timed(lambda: stow_ok(node.dicomweb, files, node.auth))
    finally:
        done.set()
        sampler.join()
    return idle / 1024, (max(samples) - idle) / 1024, (node.rss_kb("VmHWM") - idle) / 1024, took


CSTORE = "node C-STORE (storescu, 1 association)"
STOW_ONE = "node STOW-RS, 1 request"
ORTHANC_STOW = "Orthanc STOW-RS, 1 request"


def stow_batches(batch: int) -> str:
    return f"node STOW-RS, requests of {batch}"


def measure(work: Path, files: list[Path], orthanc: Orthanc, batch: int = 50,
            profile: Path | None = None) -> dict[str, float]:
    """Seconds of each run (:data:`CSTORE`, :data:`STOW_ONE`, :func:`stow_batches`, :data:`ORTHANC_STOW`),
    each into a fresh node or Orthanc; ``orthanc``: the nodes' configured PACS (unused); ``profile``: a
    directory for py-spy's profiles of the node in each run (:func:`spied`)."""
    n = len(files)
    series = files[0].parent
    took: dict[str, float] = {}

    def into_node(name: str, push: Callable[[Node], None]) -> None:
        node = Node(work / f"node-{len(took)}", orthanc)
        try:
            with spied(node.proc.pid, None if profile is None else profile / f"node-{len(took)}.txt"):
                took[name] = timed(lambda: push(node))
            assert node.stored() == n, f"{name}: {node.stored()} of {n} stored"
        finally:
            node.stop()

    def cstore(node: Node) -> None:
        out = storescu(node.dicom_port, series)
        assert out.returncode == 0, out.stderr[-2000:]

    def batches(node: Node) -> None:
        for i in range(0, n, batch):
            stow_ok(node.dicomweb, files[i:i + batch], node.auth)

    into_node(CSTORE, cstore)
    into_node(STOW_ONE, lambda node: stow_ok(node.dicomweb, files, node.auth))
    into_node(stow_batches(batch), batches)
    ref = Orthanc(work / "orthanc-stow", node_port=free_port()).start()
    try:
        took[ORTHANC_STOW] = timed(lambda: stow_ok(ref.url("/dicom-web/studies"), files))
        assert int(ref.get("/statistics")["CountInstances"]) == n
    finally:
        ref.stop()
    return took


def rows(count: int = 300, size: int = 512, batch: int = 50) -> list[Row]:
    """STOW-RS ingest, in one request and in requests of ``batch``, against the node's own C-STORE of the
    same files in the same run (>= 0.8x); and the one request against Orthanc's STOW-RS (no target)."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        phantom = make_ct_phantom(n_slices=count, rows=size, cols=size, seed=7)
        files = write_ct_series(phantom, work / "series", uid_seed="stow-ingest-bench")
        del phantom
        orthanc = Orthanc(work / "orthanc", node_port=free_port()).start()
        try:
            took = measure(work, files, orthanc, batch)
        finally:
            orthanc.stop()
            subprocess.run(["sync"], check=False)
    rate = {name: count / s for name, s in took.items()}
    return [
        Row(f"STOW-RS ingest, 1 request, N={count}", rate[STOW_ONE], "inst/s", "node C-STORE, 1 assoc",
            rate[CSTORE], 0.8, note="STOW-RS ingest: one HTTP connection, body streamed from disk by the client; "
                                    "reference: storescu to the same node build, same files, same run"),
        Row(f"STOW-RS ingest, requests of {batch}, N={count}", rate[stow_batches(batch)], "inst/s",
            "node C-STORE, 1 assoc", rate[CSTORE], 0.8),
        Row(f"STOW-RS ingest, 1 request, N={count}", rate[STOW_ONE], "inst/s", "Orthanc STOW-RS, 1 req",
            rate[ORTHANC_STOW]),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300, help="slices of the series (512x512)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=50, help="instances per request in the batched run")
    parser.add_argument("--big", type=int, default=2000, help="instances in the one large request (0: skip)")
    parser.add_argument("--profile", type=Path, default=None,
                        help="sample the node with py-spy during its runs (node-0: C-STORE, node-1: one "
                             "request, node-2: batches); collapsed stacks and flame graphs go to this dir")
    args = parser.parse_args()
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        phantom = make_ct_phantom(n_slices=args.count, rows=args.size, cols=args.size, seed=7)
        files = write_ct_series(phantom, work / "series", uid_seed="stow-ingest-bench")
        del phantom
        mb = sum(f.stat().st_size for f in files) / MB
        n = len(files)
        print(f"{n} instances of {args.size}x{args.size}, {mb:.1f} MB; each run into a fresh node or Orthanc")
        orthanc = Orthanc(work / "orthanc", node_port=free_port()).start()  # the node's configured PACS (unused)
        try:
            took = measure(work, files, orthanc, args.batch, args.profile)
            cstore_s, orthanc_s = took[CSTORE], took[ORTHANC_STOW]
            print(f"{'run':<40} {'seconds':>8} {'inst/s':>8} {'MB/s':>8} {'x C-STORE':>10} {'x Orthanc':>10}")
            for name, s in took.items():
                print(f"{name:<40} {s:8.2f} {n / s:8.1f} {mb / s:8.1f} {cstore_s / s:10.2f} {orthanc_s / s:10.2f}")
            print("(x C-STORE, x Orthanc: throughput relative to that run; above 1 is faster)")

            if args.big:
                big = copies(files, args.big, work / "big")
                big_mb = sum(f.stat().st_size for f in big) / MB
                node = Node(work / "node-big", orthanc)
                try:
                    idle, above, hwm_above, big_s = peak_rss(node, big)
                    assert node.stored() == len(big), f"{node.stored()} of {len(big)} stored"
                finally:
                    node.stop()
                verdict = "meets" if max(above, hwm_above) < RSS_TARGET_MB else "misses"
                print(f"one STOW-RS request of {len(big)} instances, {big_mb:.0f} MB, in {big_s:.1f} s "
                      f"({len(big) / big_s:.0f} inst/s, {big_mb / big_s:.0f} MB/s): node RSS idle {idle:.0f} MB, "
                      f"peak VmRSS {above:+.0f} MB, VmHWM {hwm_above:+.0f} MB above idle "
                      f"({verdict} the {RSS_TARGET_MB} MB target)")
        finally:
            orthanc.stop()
            subprocess.run(["sync"], check=False)


if __name__ == "__main__":
    main()

"""C-STORE ingest: the node's Storage SCP against dcmtk ``storescp`` and Orthanc (issue 15).

Run by hand from the repository root:
    TCP_NODELAY=1 .venv/bin/python -m bench.ingest [--counts 300,3000] [--profile build/profiles]

For each count N, N CT slices of 512x512 (about 0.5 MB each; the phantom series, then copies with new
UIDs) are written once and pushed by dcmtk ``storescu``, each time into a fresh target:

* one association (one storescu process) to dcmtk ``storescp`` (plain, writing to an output dir; it
  never fsyncs), to a fresh Orthanc and to a fresh ``dicom-node run`` (no rules, no workers; fsync of
  the file and its directory and a durable catalog row before each Success);
* four concurrent associations (four storescu processes, a quarter of the files each) to Orthanc
  and to the node.

Prints one table (instances/s, MB/s, ratios to storescp and Orthanc measured in the same run, the
issue's target ratio and whether it is met) and the node's peak RSS (VmHWM) per N. With
``--profile DIR`` the node's process is sampled by py-spy during its runs (collapsed stacks with
thread names, ``DIR/node-<N>-<k>assoc.txt``, and a flame graph ``.svg``; only the thread holding the GIL,
so CPU spent in Python, not waits) and summarised by function group. py-spy takes CPU from the node:
time the runs without ``--profile``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.stow_ingest import MB, Node, copies
from testkit.dicom import write_ct_series
from testkit.harness import (
    NODE_AE,
    ORTHANC_AE,
    SCANNER_AE,
    VENV_BIN,
    Orthanc,
    free_port,
    port_open,
    stop_process,
    tool_env,
    wait_for,
)
from testkit.phantom import make_ct_phantom

DURABILITY = ("durability before Success: storescp none (dcmtk has no fsync option; strace shows no fsync); "
              "Orthanc 1.10.1 one fdatasync per instance, of the file (strace; no directory fsync, its SQLite "
              "index is not synced); "
              "the node fsyncs the file and its directory and commits the catalog row (SQLite WAL, FULL)")
SERIES_SLICES = 300
"""Slices of the phantom series; larger counts are copies of it with new series and SOP UIDs."""
STORESCP_AE = "STORESCP"
CONCURRENT = 4


def dcmtk(tool: str) -> str:
    """The dcmtk binary ``tool`` on PATH, skipping the venv (pynetdicom installs its own ``storescu``)."""
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and Path(p).resolve() != VENV_BIN.resolve())
    found = shutil.which(tool, path=path)
    if found is None:
        raise SystemExit(f"dcmtk's {tool} not found on PATH")
    return found


def push(port: int, aec: str, files: list[Path], associations: int = 1) -> float:
    """Seconds for ``associations`` concurrent storescu processes to send ``files`` (split evenly)."""
    chunks = [files[i::associations] for i in range(associations)]
    t0 = time.monotonic()
    procs = [subprocess.Popen([dcmtk("storescu"), "-aet", SCANNER_AE, "-aec", aec, "127.0.0.1", str(port),
                               *map(str, chunk)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env=tool_env()) for chunk in chunks]
    errors = [p.communicate(timeout=1800)[1] for p in procs]
    took = time.monotonic() - t0
    for p, err in zip(procs, errors, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed ({p.returncode}): {err.decode(errors='replace')[-2000:]}")
    return took


def count_files(root: Path, pattern: str = "*") -> int:
    return sum(1 for p in root.rglob(pattern) if p.is_file())


def into_storescp(work: Path, files: list[Path]) -> float:
    out = work / "storescp"
    out.mkdir(parents=True)
    port = free_port()
    proc = subprocess.Popen([dcmtk("storescp"), "-aet", STORESCP_AE, "-od", str(out), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=tool_env())
    try:
        wait_for(lambda: port_open(port), 30, what="storescp")
        took = push(port, STORESCP_AE, files)
        assert count_files(out) == len(files), f"storescp: {count_files(out)} of {len(files)} stored"
    finally:
        stop_process(proc)
        shutil.rmtree(out, ignore_errors=True)
    return took


def into_orthanc(work: Path, files: list[Path], associations: int) -> float:
    orthanc = Orthanc(work, node_port=free_port())
    work.mkdir(parents=True)
    orthanc.start()
    try:
        took = push(orthanc.dicom_port, ORTHANC_AE, files, associations)
        stored = int(orthanc.get("/statistics")["CountInstances"])
        assert stored == len(files), f"Orthanc: {stored} of {len(files)} stored"
    finally:
        orthanc.stop()
        shutil.rmtree(work, ignore_errors=True)
    return took


def into_node(work: Path, files: list[Path], associations: int, pacs: Orthanc,
              profile: Path | None) -> tuple[float, int]:
    """(seconds, VmHWM in kB) of a fresh node receiving ``files``; ``profile``: py-spy's collapsed stacks
    (and a flame graph next to it, ``.svg``)."""
    node = Node(work, pacs)
    spies: list[subprocess.Popen[bytes]] = []
    try:
        if profile is not None:  # --gil: only the thread holding the GIL (CPU in Python, not waits)
            spies = [subprocess.Popen([str(VENV_BIN / "py-spy"), "record", "--pid", str(node.proc.pid), "--threads",
                                       "--gil", "--rate", "100", "--nonblocking", "--format", fmt, "-o", str(out)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
                     for fmt, out in (("raw", profile), ("flamegraph", profile.with_suffix(".svg")))]
            time.sleep(1)  # attached
        took = push(node.dicom_port, NODE_AE, files, associations)
        for spy in spies:
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            spy.wait(timeout=60)
        assert node.stored() == len(files), f"node: {node.stored()} of {len(files)} stored"
        hwm = node.rss_kb("VmHWM")
    finally:
        for spy in spies:
            if spy.poll() is None:
                spy.kill()
        node.stop()
        shutil.rmtree(work, ignore_errors=True)
    return took, hwm


GROUPS: list[tuple[str, re.Pattern[str]]] = [
    ("spool write + fsync (node/spool.py)", re.compile(r"node/spool\.py")),
    ("catalog insert + commit (record_instance)", re.compile(r"\brecord_instance \(")),
    ("dataset decode (pydicom dcmread)", re.compile(r"\bdcmread \(")),
    ("validation + attributes", re.compile(r"\b(pixel_data_problem|series_attributes|patient_key|"
                                           r"indexed_attributes|has_room) \(")),
    ("other store handler work", re.compile(r"\b_handle_store \(")),
    ("pynetdicom PDU receive/decode, DIMSE, FSM", re.compile(r"pynetdicom/")),
]


def summarise_profile(raw: Path) -> list[tuple[str, float]]:
    """Share of py-spy's samples (collapsed stacks: ``frame;frame;... count``) per function group; the
    first group (in :data:`GROUPS` order) one of a stack's frames matches; otherwise other threads."""
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        group = next((name for name, pattern in GROUPS if pattern.search(stack)),
                     "other (node loops, HTTP, logging, ...)")
        counts[group] += int(n)
    total = sum(counts.values()) or 1
    return [(name, 100 * n / total) for name, n in counts.most_common()]


@dataclass(frozen=True)
class Row:
    target: str
    seconds: float
    n: int
    mb: float
    goal: str = ""
    """The issue's target as text (``>= 1.5x Orthanc``)."""
    check: Callable[[float, float], bool] | None = None
    """(ratio to storescp, ratio to the Orthanc run of the same concurrency) -> met."""
    orthanc_key: int = 1


def print_table(rows: list[Row], storescp_s: float, orthanc_s: dict[int, float]) -> None:
    print(f"{'target':<34} {'N':>5} {'inst/s':>8} {'MB/s':>7} {'x storescp':>10} {'x Orthanc':>9} "
          f"{'target ratio':>28} {'met?':>5}")
    for r in rows:
        x_scp = storescp_s / r.seconds
        x_orthanc = orthanc_s[r.orthanc_key] / r.seconds
        met = "" if r.check is None else ("yes" if r.check(x_scp, x_orthanc) else "NO")
        print(f"{r.target:<34} {r.n:>5} {r.n / r.seconds:8.1f} {r.mb / r.seconds:7.1f} {x_scp:10.2f} "
              f"{x_orthanc:9.2f} {r.goal:>28} {met:>5}")


def series_of(work: Path, count: int, base: list[Path]) -> list[Path]:
    """``count`` instances: the first of the phantom series, or copies of it with new UIDs."""
    return base[:count] if count <= len(base) else copies(base, count, work / f"copies-{count}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--counts", default="300,3000", help="instances per run, comma separated")
    parser.add_argument("--size", type=int, default=512, help="rows and columns of each slice")
    parser.add_argument("--profile", type=Path, default=None,
                        help="sample the node with py-spy during its runs; collapsed stacks go to this dir")
    parser.add_argument("--only-node", action="store_true", help="skip storescp and Orthanc (profiling)")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",") if c.strip()]
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        phantom = make_ct_phantom(n_slices=min(SERIES_SLICES, max(counts)), rows=args.size, cols=args.size, seed=7)
        base = write_ct_series(phantom, work / "series", uid_seed="ingest-bench")
        del phantom
        pacs = Orthanc(work / "pacs", node_port=free_port())  # the node's configured PACS (unused)
        (work / "pacs").mkdir()
        pacs.start()
        hwm: dict[tuple[int, int], int] = {}
        profiles: list[Path] = []
        try:
            for count in counts:
                files = series_of(work, count, base)
                mb = sum(f.stat().st_size for f in files) / MB
                print(f"N={count}: {mb:.0f} MB ({mb / count:.2f} MB per instance)", flush=True)
                scp_s = 0.0 if args.only_node else into_storescp(work / f"scp-{count}", files)
                orthanc_s = {} if args.only_node else {
                    k: into_orthanc(work / f"orthanc-{count}-{k}", files, k) for k in (1, CONCURRENT)}
                node_s: dict[int, float] = {}
                for k in (1, CONCURRENT):
                    prof = None if args.profile is None else args.profile / f"node-{count}-{k}assoc.txt"
                    node_s[k], hwm[(count, k)] = into_node(work / f"node-{count}-{k}", files, k, pacs, prof)
                    if prof is not None and prof.exists():
                        profiles.append(prof)
                if args.only_node:
                    for k, s in node_s.items():
                        print(f"node, {k} association(s), N={count}: {s:.2f} s, {count / s:.1f} inst/s, "
                              f"{mb / s:.1f} MB/s", flush=True)
                    continue
                batch = [
                    Row("storescp (dcmtk, no fsync), 1 assoc", scp_s, count, mb),
                    Row("Orthanc, 1 assoc", orthanc_s[1], count, mb),
                    Row("node, 1 assoc", node_s[1], count, mb, ">= 1.5x Orthanc, >= 0.8x scp",
                        lambda scp, orth: orth >= 1.5 and scp >= 0.8),
                    Row(f"Orthanc, {CONCURRENT} assoc", orthanc_s[CONCURRENT], count, mb, orthanc_key=CONCURRENT),
                    Row(f"node, {CONCURRENT} assoc", node_s[CONCURRENT], count, mb, ">= 2x Orthanc (4 assoc)",
                        lambda scp, orth: orth >= 2.0, orthanc_key=CONCURRENT),
                ]
                print(f"({DURABILITY}; x Orthanc: against the Orthanc run with the same number of associations)")
                print_table(batch, scp_s, orthanc_s)
                if count != counts[-1]:
                    shutil.rmtree(work / f"copies-{count}", ignore_errors=True)
        finally:
            pacs.stop()
            subprocess.run(["sync"], check=False)
        print("node peak RSS (VmHWM of the node process, whole run):")
        for (count, k), kb in sorted(hwm.items()):
            print(f"  N={count:>5}, {k} association(s): {kb / 1024:.0f} MB")
        for prof in profiles:
            print(f"py-spy profile {prof} (share of GIL-holding samples, all threads):")
            for name, pct in summarise_profile(prof):
                print(f"  {pct:5.1f} %  {name}")
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()

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
time the runs without ``--profile``. :func:`rows` gives the same figures to ``bench.all``'s table.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.report import Row
from bench.stow_ingest import MB, Node, copies, spied
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
    try:
        with spied(node.proc.pid, profile):
            took = push(node.dicom_port, NODE_AE, files, associations)
        assert node.stored() == len(files), f"node: {node.stored()} of {len(files)} stored"
        hwm = node.rss_kb("VmHWM")
    finally:
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


@dataclass
class Measured:
    """The runs of one count N: seconds per target (0 / empty when skipped) and the node's VmHWM."""

    count: int
    mb: float
    storescp_s: float = 0.0
    orthanc_s: dict[int, float] = field(default_factory=dict)
    """Associations -> seconds."""
    node_s: dict[int, float] = field(default_factory=dict)
    hwm_kb: dict[int, int] = field(default_factory=dict)
    """Associations -> the node's VmHWM (kB) over that run (a fresh node each run)."""

    def rate(self, seconds: float) -> float:
        return self.count / seconds


@dataclass(frozen=True)
class Line:
    """One line of the printed table of a count."""

    target: str
    seconds: float
    goal: str = ""
    """The issue's target as text (``>= 1.5x Orthanc``)."""
    check: Callable[[float, float], bool] | None = None
    """(ratio to storescp, ratio to the Orthanc run of the same concurrency) -> met."""
    orthanc_key: int = 1


def print_table(m: Measured) -> None:
    lines = [
        Line("storescp (dcmtk, no fsync), 1 assoc", m.storescp_s),
        Line("Orthanc, 1 assoc", m.orthanc_s[1]),
        Line("node, 1 assoc", m.node_s[1], ">= 1.5x Orthanc, >= 0.8x scp",
             lambda scp, orth: orth >= 1.5 and scp >= 0.8),
        Line(f"Orthanc, {CONCURRENT} assoc", m.orthanc_s[CONCURRENT], orthanc_key=CONCURRENT),
        Line(f"node, {CONCURRENT} assoc", m.node_s[CONCURRENT], ">= 2x Orthanc (4 assoc)",
             lambda scp, orth: orth >= 2.0, orthanc_key=CONCURRENT),
    ]
    print(f"({DURABILITY}; x Orthanc: against the Orthanc run with the same number of associations)")
    print(f"{'target':<34} {'N':>5} {'inst/s':>8} {'MB/s':>7} {'x storescp':>10} {'x Orthanc':>9} "
          f"{'target ratio':>28} {'met?':>5}")
    for r in lines:
        x_scp = m.storescp_s / r.seconds
        x_orthanc = m.orthanc_s[r.orthanc_key] / r.seconds
        met = "" if r.check is None else ("yes" if r.check(x_scp, x_orthanc) else "NO")
        print(f"{r.target:<34} {m.count:>5} {m.count / r.seconds:8.1f} {m.mb / r.seconds:7.1f} {x_scp:10.2f} "
              f"{x_orthanc:9.2f} {r.goal:>28} {met:>5}")


def series_of(work: Path, count: int, base: list[Path]) -> list[Path]:
    """``count`` instances: the first of the phantom series, or copies of it with new UIDs."""
    return base[:count] if count <= len(base) else copies(base, count, work / f"copies-{count}")


def measure(counts: list[int], size: int = 512, profile: Path | None = None, only_node: bool = False,
            on_count: Callable[[Measured], None] | None = None) -> tuple[list[Measured], list[Path]]:
    """Every run of every count (``on_count`` gets each count's figures as soon as they are in), and
    the py-spy profiles written (``profile``: their directory, None for none)."""
    measured: list[Measured] = []
    profiles: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        phantom = make_ct_phantom(n_slices=min(SERIES_SLICES, max(counts)), rows=size, cols=size, seed=7)
        base = write_ct_series(phantom, work / "series", uid_seed="ingest-bench")
        del phantom
        pacs = Orthanc(work / "pacs", node_port=free_port())  # the node's configured PACS (unused)
        (work / "pacs").mkdir()
        pacs.start()
        try:
            for count in counts:
                files = series_of(work, count, base)
                m = Measured(count, sum(f.stat().st_size for f in files) / MB)
                print(f"N={count}: {m.mb:.0f} MB ({m.mb / count:.2f} MB per instance)", flush=True)
                if not only_node:
                    m.storescp_s = into_storescp(work / f"scp-{count}", files)
                    m.orthanc_s = {k: into_orthanc(work / f"orthanc-{count}-{k}", files, k) for k in (1, CONCURRENT)}
                for k in (1, CONCURRENT):
                    prof = None if profile is None else profile / f"node-{count}-{k}assoc.txt"
                    m.node_s[k], m.hwm_kb[k] = into_node(work / f"node-{count}-{k}", files, k, pacs, prof)
                    if prof is not None and prof.exists():
                        profiles.append(prof)
                measured.append(m)
                if on_count is not None:
                    on_count(m)
                shutil.rmtree(work / f"copies-{count}", ignore_errors=True)
        finally:
            pacs.stop()
            subprocess.run(["sync"], check=False)
    return measured, profiles


def rows(counts: tuple[int, ...] = (300, 3000)) -> list[Row]:
    """The issue's C-STORE ingest rows per N: the node on one association against storescp (>= 0.8x) and
    Orthanc (>= 1.5x), on four against Orthanc on four (>= 2x); and its peak RSS against the smallest N's
    (<= 1.2x: independent of study size)."""
    measured, _ = measure(sorted(counts))
    out: list[Row] = []
    first = True
    for m in measured:
        note = DURABILITY if first else ""
        out += [
            Row(f"C-STORE ingest, 1 assoc, N={m.count}", m.rate(m.node_s[1]), "inst/s", "storescp, 1 assoc",
                   m.rate(m.storescp_s), 0.8, note=note),
            Row(f"C-STORE ingest, 1 assoc, N={m.count}", m.rate(m.node_s[1]), "inst/s", "Orthanc, 1 assoc",
                   m.rate(m.orthanc_s[1]), 1.5),
            Row(f"C-STORE ingest, {CONCURRENT} assoc, N={m.count}", m.rate(m.node_s[CONCURRENT]), "inst/s",
                   f"Orthanc, {CONCURRENT} assoc", m.rate(m.orthanc_s[CONCURRENT]), 2.0),
        ]
        first = False
    smallest = measured[0]
    for m in measured:
        out.append(Row(f"C-STORE ingest, node peak RSS, N={m.count}", max(m.hwm_kb.values()) / 1024, "MB",
                          f"peak RSS at N={smallest.count}", max(smallest.hwm_kb.values()) / 1024, 1.2,
                          higher_is_better=False,
                          note="" if m is not smallest else
                          "peak RSS: VmHWM of a fresh node process over one run, the larger of the 1- and "
                          f"{CONCURRENT}-association runs; ratio to the smallest N (study-size independence)"))
    return out


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

    def report(m: Measured) -> None:
        if not args.only_node:
            print_table(m)
            return
        for k, s in m.node_s.items():
            print(f"node, {k} association(s), N={m.count}: {s:.2f} s, {m.count / s:.1f} inst/s, "
                  f"{m.mb / s:.1f} MB/s", flush=True)

    measured, profiles = measure(counts, args.size, args.profile, args.only_node, report)
    print("node peak RSS (VmHWM of the node process, whole run):")
    for m in measured:
        for k, kb in sorted(m.hwm_kb.items()):
            print(f"  N={m.count:>5}, {k} association(s): {kb / 1024:.0f} MB")
    for prof in profiles:
        print(f"py-spy profile {prof} (share of GIL-holding samples, all threads):")
        for name, pct in summarise_profile(prof):
            print(f"  {pct:5.1f} %  {name}")
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()

"""Early study completion: end of a push -> study ready, against the quiet period it no longer waits for.

Run by hand from the repository root:  .venv/bin/python -m bench.early_completion [--slices 300] [--quiet 60]

Starts ``dicom-node run`` (no rules, no workers; ``assembly.study_quiet_seconds`` = ``--quiet``, default
``assembly.early_settle_seconds``) and pushes two CT series with dcmtk ``storescu``, one association
each, each its own study (:mod:`node.completion`):

* a series whose slices announce its size (Images in Acquisition), from an ordinary sender;
* a series without it, from a peer configured ``whole_study_per_association``.

For each it prints the seconds from the end of the push (storescu's exit) to the study's ``ready_at``
(REST API), beside the quiet period: without early completion the study would be ready that long
after its last instance.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pydicom

from bench.report import Row
from node.config import AssemblySettings
from testkit.dicom import write_ct_series
from testkit.harness import (
    SCANNER_AE,
    Orthanc,
    bearer,
    create_token,
    free_port,
    node_config,
    peer_entries,
    start_node_process,
    stop_process,
    storescu,
    wait_for,
)
from testkit.phantom import make_ct_phantom

ROUTER_AE = "ROUTER"
"""A peer that sends whole studies per association."""
QUIET = 60.0
SETTLE = AssemblySettings().early_settle_seconds


def series(out: Path, slices: int, size: int, seed: int, announce: bool) -> str:
    """A CT series of its own study in ``out`` (Images in Acquisition on every slice when ``announce``);
    returns its Study Instance UID."""
    phantom = make_ct_phantom(n_slices=slices, rows=size, cols=size, seed=seed, nodules=0)
    files = write_ct_series(phantom, out, uid_seed=f"early-bench-{seed}", patient_id=f"EARLY-BENCH-{seed}")
    if announce:
        for f in files:
            ds = pydicom.dcmread(f)
            ds.ImagesInAcquisition = len(files)
            ds.save_as(f)
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def measure(slices: int = 300, size: int = 512, quiet: float = QUIET) -> dict[str, float]:
    """{case: seconds from the end of its push to the study ready}; the node's settle time is
    ``assembly.early_settle_seconds``' default (:data:`SETTLE`)."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cases = {"announced size": (work / "announced", SCANNER_AE, True),
                 "whole-study peer": (work / "router", ROUTER_AE, False)}
        uids = {name: series(out, slices, size, 41 + i, announce)
                for i, (name, (out, _, announce)) in enumerate(cases.items())}
        node_port, http_port = free_port(), free_port()
        pacs = Orthanc(work / "pacs", node_port=node_port)  # the configured destination (unused: no rules)
        (work / "pacs").mkdir()
        pacs.start()
        peers = [*peer_entries(), {"ae_title": ROUTER_AE, "host": "127.0.0.1", "allow": ["echo", "store"],
                                   "whole_study_per_association": True}]
        config = node_config(work, node_port=node_port, orthanc=pacs, quiet_seconds=quiet, http_port=http_port,
                             embedded_workers=False, overrides={"node": {"peers": peers}, "rules": []})
        proc = start_node_process(config, "run", "node.log", port=node_port)
        api = httpx.Client(base_url=f"http://127.0.0.1:{http_port}/api/v1",
                           headers=bearer(create_token(config, "viewer")), timeout=10)
        took: dict[str, float] = {}
        try:
            for name, (folder, aet, _) in cases.items():
                out = storescu(node_port, folder, aet=aet)
                pushed = time.time()
                assert out.returncode == 0, out.stderr[-2000:]

                def ready(uid: str = uids[name]) -> dict[str, Any] | None:
                    r = api.get("/studies", params={"limit": 100})
                    r.raise_for_status()
                    study = next((s for s in r.json()["items"] if s["study_uid"] == uid), None)
                    return study if study is not None and study["times"]["ready_at"] else None

                study = wait_for(ready, quiet + 30, interval=0.2, what=f"study ready ({name})")
                took[name] = float(study["times"]["ready_at"]) - pushed
        finally:
            api.close()
            stop_process(proc)
            pacs.stop()
        return took


def rows(slices: int = 300, size: int = 512, quiet: float = QUIET) -> list[Row]:
    """End of push -> study ready, per mechanism, against the quiet period (lower is better)."""
    took = measure(slices, size, quiet)
    return [Row(f"Early completion, {name}, {slices} inst", s, "s", "quiet period", quiet,
                higher_is_better=False,
                note="" if i else f"Early completion: end of the storescu push -> ready_at (REST API), settle time "
                                  f"{SETTLE:g} s; without it the study is ready a quiet period after its last instance")
            for i, (name, s) in enumerate(took.items())]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--quiet", type=float, default=QUIET, help="assembly.study_quiet_seconds")
    args = parser.parse_args()
    for name, s in measure(args.slices, args.size, args.quiet).items():
        print(f"{name}: end of push -> study ready {s:.2f} s (quiet period {args.quiet:g} s, "
              f"settle time {SETTLE:g} s)")


if __name__ == "__main__":
    main()

"""Early study completion (issue 15) with real processes: dcmtk storescu (or STOW-RS) -> ``dicom-node run``
(quiet period 30 s) -> model -> Orthanc. A series announcing its size (Images in Acquisition), and a study
from a peer configured ``whole_study_per_association``, are ready a settle time after the association is
released (a STOW-RS request's end counts as one), and their results reach Orthanc long before the quiet
period would have ended; a study from an ordinary sender without the attribute, or one whose association
was aborted, is still receiving meanwhile."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pynetdicom import AE

from node.receive.stow import stow_request
from testkit.dicom import write_ct_series
from testkit.harness import (
    FAULT_SCU_AE,
    NODE_AE,
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

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

QUIET = 30.0
SETTLE = 2.0
ROUTER_AE = "ROUTER"
"""A peer that sends whole studies per association."""


@dataclass
class Stack:
    workdir: Path
    config: Path
    node_port: int
    api: str
    auth: dict[str, str]
    orthanc: Orthanc

    def study(self, study_uid: str) -> dict[str, Any] | None:
        r = httpx.get(f"{self.api}/api/v1/studies", headers=self.auth, params={"limit": 100}, timeout=10)
        r.raise_for_status()
        return next((s for s in r.json()["items"] if s["study_uid"] == study_uid), None)

    def log(self) -> str:
        return (self.workdir / "node.log").read_text(errors="replace")[-6000:]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("early")
    node_port, http_port = free_port(), free_port()
    orthanc = Orthanc(workdir, node_port=node_port).start()
    proc = None
    try:
        peers = [*peer_entries(), {"ae_title": ROUTER_AE, "host": "127.0.0.1", "allow": ["echo", "store"],
                                   "whole_study_per_association": True}]
        cfg = node_config(workdir, node_port=node_port, orthanc=orthanc, quiet_seconds=QUIET, http_port=http_port,
                          overrides={"node": {"peers": peers}, "assembly": {"early_settle_seconds": SETTLE}})
        proc = start_node_process(cfg, "run", "node.log", port=node_port)
        token = create_token(cfg, "viewer")
        yield Stack(workdir, cfg, node_port, f"http://127.0.0.1:{http_port}", bearer(token), orthanc)
    finally:
        if proc is not None:
            stop_process(proc)
        orthanc.stop()


def _series(out: Path, seed: int, *, images_in_acquisition: bool) -> tuple[Path, str]:
    """A small CT series (its own patient and study); with Images in Acquisition on every slice or none."""
    phantom = make_ct_phantom(n_slices=12, rows=64, cols=64, pixel_mm=5.0, slice_mm=5.0, seed=seed, nodules=0)
    files = write_ct_series(phantom, out, uid_seed=f"early-{seed}", patient_id=f"EARLY-{seed}")
    for f in files:
        ds = pydicom.dcmread(f)
        if images_in_acquisition:
            ds.ImagesInAcquisition = len(files)
        else:
            assert "ImagesInAcquisition" not in ds
        ds.save_as(f)
    return out, str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _push(stack: Stack, series_dir: Path, aet: str) -> float:
    """storescu (one association, released at its end); returns when it ended (epoch seconds)."""
    out = storescu(stack.node_port, series_dir, aet=aet)
    assert out.returncode == 0, out.stderr
    return time.time()


def _ready_early(stack: Stack, study_uid: str, pushed: float) -> dict[str, Any]:
    """Wait for the study to leave ``receiving``; check it did so a settle time after the push, not the quiet period."""
    try:
        study = wait_for(lambda: (s := stack.study(study_uid)) is not None and s["times"]["ready_at"] and s,
                         QUIET - 10, interval=0.2, what="the study ready")
    except TimeoutError:
        print(stack.log())
        raise
    times = study["times"]
    waited = times["ready_at"] - times["last_received_at"]
    print(f"last instance -> ready: {waited:.2f} s; push's end -> ready: {times['ready_at'] - pushed:.2f} s")
    assert SETTLE - 0.05 <= waited < SETTLE + 4  # the settle time, not the 30 s quiet period
    assert times["ready_at"] - pushed < SETTLE + 4
    return dict(study)


def _results(stack: Stack, study_uid: str, pushed: float) -> float:
    """Wait for SEG and SR in Orthanc; returns the seconds from the push's end."""
    try:
        wait_for(lambda: {"SEG", "SR"} <= set(stack.orthanc.modalities_of_study(study_uid)), 90, interval=0.25,
                 what="SEG and SR in Orthanc")
    except TimeoutError:
        print(stack.log())
        raise
    latency = time.time() - pushed
    print(f"push's end -> SEG + SR in Orthanc: {latency:.2f} s (quiet period {QUIET:.0f} s)")
    return latency


def test_a_series_announcing_its_size_is_ready_without_the_quiet_period(stack: Stack, tmp_path: Path) -> None:
    series_dir, study_uid = _series(tmp_path / "iia", 31, images_in_acquisition=True)
    pushed = _push(stack, series_dir, "SCANNER")
    study = _ready_early(stack, study_uid, pushed)
    assert study["counts"]["instances"] == 12 and study["generation"] == 1
    assert "ready early (announced size)" in stack.log()
    assert _results(stack, study_uid, pushed) < QUIET


def test_a_whole_study_peer_is_ready_at_release_an_ordinary_sender_waits(stack: Stack, tmp_path: Path) -> None:
    plain_dir, plain_uid = _series(tmp_path / "plain", 32, images_in_acquisition=False)
    router_dir, router_uid = _series(tmp_path / "router", 33, images_in_acquisition=False)
    plain_pushed = _push(stack, plain_dir, "SCANNER")
    pushed = _push(stack, router_dir, ROUTER_AE)
    _ready_early(stack, router_uid, pushed)
    assert "ready early (whole study per association)" in stack.log()
    assert _results(stack, router_uid, pushed) < QUIET
    time.sleep(max(0.0, plain_pushed + SETTLE + 3 - time.time()))  # time to be ready early, were it wrongly so
    plain = stack.study(plain_uid)
    assert plain is not None and plain["state"] == "receiving"  # no size, no such peer: the quiet period
    assert plain["times"]["ready_at"] is None and time.time() - plain_pushed < QUIET


def test_an_aborted_association_waits_for_the_quiet_period(stack: Stack, tmp_path: Path) -> None:
    series_dir, study_uid = _series(tmp_path / "aborted", 34, images_in_acquisition=True)
    files = sorted(series_dir.iterdir())
    ae = AE(ae_title=FAULT_SCU_AE)
    ae.add_requested_context(pydicom.dcmread(files[0], stop_before_pixels=True).SOPClassUID)
    assoc = ae.associate("127.0.0.1", stack.node_port, ae_title=NODE_AE)
    assert assoc.is_established
    statuses = [int(assoc.send_c_store(f).Status) for f in files]  # every image, as announced
    assoc.abort()
    aborted = time.time()
    assert statuses == [0] * len(files)
    time.sleep(SETTLE + 3)
    study = stack.study(study_uid)
    assert study is not None and study["counts"]["instances"] == len(files)
    assert study["state"] == "receiving" and time.time() - aborted < QUIET  # an abort never completes early


def test_a_stow_rs_request_ends_like_a_released_association(stack: Stack, tmp_path: Path) -> None:
    series_dir, study_uid = _series(tmp_path / "stow", 35, images_in_acquisition=True)
    token = create_token(stack.config, "sender")
    status, _ = stow_request(f"{stack.api}/dicom-web", [f.read_bytes() for f in sorted(series_dir.iterdir())],
                             token=token)
    assert status == 200
    pushed = time.time()
    _ready_early(stack, study_uid, pushed)
    assert _results(stack, study_uid, pushed) < QUIET

"""workers.load.SeriesCache: the jobs of one study on one series load it once, a changed series is
loaded again (direct path and remote worker), and the shared input stays as it was (read-only voxels;
the models and encoders leave the sources alone)."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from models.base import Volume
from node.catalog import Catalog, JobSpec
from node.config import parse_settings
from node.receive.scp import STATUS_SUCCESS, Receiver
from node.schema import JobState
from node.spool import Spool
from testkit.dicom import write_ct_series
from testkit.phantom import make_ct_phantom
from workers.load import Loaded, SeriesCache, load_series
from workers.pipeline import WorkerContext, run_job
from workers.remote import RemoteSource
from workers.source import ClaimedJob

MODELS = ("ct-hu-segmentation", "ct-lung-nodules", "ct-emphysema")


class Counting:
    """``load_series`` that remembers what it read."""

    def __init__(self) -> None:
        self.loads: list[int] = []
        self.last: Loaded | None = None

    def __call__(self, paths: Sequence[Path]) -> Loaded:
        self.loads.append(len(paths))
        self.last = load_series(paths)
        return self.last


def _store(receiver: Receiver, files: Sequence[Path]) -> None:
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        assert receiver.store(f.read_bytes(), str(ds.SOPClassUID), str(ds.SOPInstanceUID), "CT1") == STATUS_SUCCESS


def test_the_jobs_of_a_series_load_it_once_and_a_changed_series_again(tmp_path: Path) -> None:
    settings = parse_settings({"node": {"storage_dir": str(tmp_path / "node"), "min_free_mb": 0},
                               "destinations": [{"name": "pacs", "type": "dimse", "ae_title": "P",
                                                 "host": "127.0.0.1", "port": 1}]})
    catalog, spool = Catalog.for_storage(settings.node.storage_dir), Spool(settings.node.storage_dir)
    receiver = Receiver(settings, catalog, spool, lambda: 0.0)
    phantom = make_ct_phantom(49, 128, 128, pixel_mm=2.5, slice_mm=2.5, nodules=3, seed=3, emphysema=0.1)
    files = write_ct_series(phantom, tmp_path / "ct")
    _store(receiver, files[:-1])
    [study_id] = catalog.mark_quiet_studies_ready(1.0, now=2.0)
    [series] = catalog.series_of_study(study_id)
    job_ids = catalog.create_jobs(study_id, 1, [JobSpec(series.id, m, "r", ("pacs",)) for m in MODELS], 3.0)
    counting = Counting()
    ctx = WorkerContext(settings, catalog, spool, clock=lambda: 10.0, series=SeriesCache(loader=counting))

    assert run_job(ctx, job_ids[0]) == JobState.DONE
    assert counting.loads == [48]
    assert counting.last is not None
    volume, sources = counting.last
    before = [copy.deepcopy(ds) for ds in sources]
    assert not volume.voxels.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        volume.voxels[0, 0, 0] = 0.0
    for job_id in job_ids[1:]:  # the nodules and emphysema models on the cached series
        assert run_job(ctx, job_id) == JobState.DONE
    assert counting.loads == [48]
    assert sources == before  # no model or encoder changed the shared source datasets
    for job in catalog.jobs_of_study(study_id):
        assert job.load_seconds is not None and job.infer_seconds is not None

    _store(receiver, files[-1:])  # a late instance re-opens the study: a new generation of the series
    assert catalog.mark_quiet_studies_ready(1.0, now=20.0) == [study_id]
    study = catalog.get_study(study_id)
    assert study is not None and study.generation == 2
    rerun = catalog.create_jobs(study_id, 2, [JobSpec(series.id, m, "r", ("pacs",)) for m in MODELS[:2]], 21.0)
    assert run_job(ctx, rerun[0]) == JobState.DONE
    assert counting.loads == [48, 49]
    assert run_job(ctx, rerun[1]) == JobState.DONE
    assert counting.loads == [48, 49]


def _volume_of(n: int) -> Loaded:
    volume = Volume(np.zeros((n, 2, 2), np.float32), np.eye(4), "CT", tuple(f"1.{k}" for k in range(n)), "1.9")
    return volume, [Dataset() for _ in range(n)]


def test_the_cache_keeps_the_last_series_and_never_a_keyless_one() -> None:
    loads: list[int] = []

    def loader(paths: Sequence[Path]) -> Loaded:
        loads.append(len(paths))
        return _volume_of(len(paths))

    cache = SeriesCache(size=2, loader=loader)
    a, b, c = ([Path(f"{x}{k}") for k in range(n)] for x, n in (("a", 1), ("b", 2), ("c", 3)))
    va, sa = cache.load("a", lambda: a)
    assert cache.load("a", lambda: a)[0] is va and loads == [1]
    assert cache.load("a", lambda: a)[1] is not sa  # a new list each time (the datasets are shared)
    cache.load("b", lambda: b)
    cache.load("c", lambda: c)  # the least recently used, a, goes
    assert loads == [1, 2, 3]
    cache.load("b", lambda: b)
    cache.load("a", lambda: a)
    assert loads == [1, 2, 3, 1]
    volume, _ = cache.load(None, lambda: b)
    cache.load(None, lambda: b)
    assert loads == [1, 2, 3, 1, 2, 2]
    assert not volume.voxels.flags.writeable and not volume.affine.flags.writeable  # cached or not

    loads.clear()
    small = SeriesCache(size=2, max_bytes=3 * 16, loader=loader)  # 16 bytes of voxels a slice
    small.load("a", lambda: a)
    small.load("b", lambda: b)  # 16 + 32 bytes: both kept
    small.load("a", lambda: a)
    assert loads == [1, 2]
    small.load("c", lambda: c)  # 48 bytes: kept alone, over the bound with any other
    small.load("c", lambda: c)
    small.load("a", lambda: a)
    assert loads == [1, 2, 3, 1]


class _FakeNode:
    """The worker API's side of :class:`workers.remote.RemoteSource`: claims giving ``inputs``, downloads counted."""

    name = "w"
    http = SimpleNamespace(base_url="http://node.test/api/v1/worker")

    def __init__(self, files: Sequence[Path]) -> None:
        self.files = {str(k): f for k, f in enumerate(files)}
        self.inputs: list[str] = []
        self.downloads = 0

    def claim(self, job_id: int, worker: str) -> dict[str, Any]:
        return {"study_id": 1, "model": "m", "attempt": 1, "inputs": list(self.inputs)}

    def download(self, job: ClaimedJob, kind: str, object_id: str, dest: Path) -> None:
        self.downloads += 1
        shutil.copyfile(self.files[object_id], dest)


def test_a_remote_worker_downloads_a_series_once_for_the_jobs_on_it(tmp_path: Path) -> None:
    files = write_ct_series(make_ct_phantom(6, 16, 16, pixel_mm=10.0, seed=2), tmp_path / "ct")
    node = _FakeNode(files)
    settings = parse_settings({"node": {"storage_dir": str(tmp_path / "worker")}})
    source = RemoteSource(settings, node)  # type: ignore[arg-type]
    cache = SeriesCache()

    def run(job_id: int) -> int:
        job = source.claim(job_id)
        assert job is not None
        try:
            volume, _ = cache.load(source.series_key(job), lambda: source.inputs(job))
        finally:
            source.release(job)  # the downloaded files go; the cached series stays in memory
        return volume.voxels.shape[0]

    node.inputs = ["0", "1", "2", "3", "4"]
    assert (run(1), run(2), node.downloads) == (5, 5, 5)
    node.inputs.append("5")  # a late instance: the node gives one more input
    assert (run(3), node.downloads) == (6, 11)

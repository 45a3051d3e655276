"""Retrospective batches (node.batch) with a fake PACS and a real SQLite catalog, receiver, assembler and
router: validation, the study list, the throttle, one offpeak job of the batch's model per study, resume
after a crash, following the jobs, cancel."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage, generate_uid

from models.errors import RetrieveError
from node.assemble import Assembler
from node.batch import BatchRunner
from node.batch_store import BatchError, BatchStore, make_spec, rule_name
from node.catalog import Catalog
from node.config import ConfigError, Settings, parse_settings
from node.dispatch import OffpeakWindow
from node.receive.scp import Receiver
from node.retrieve import Retrieved
from node.route import Router
from node.schema import BatchState, JobState, StudyState
from node.spool import Spool
from tests.dsfactory import ct_slice, encode

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "config.example.yaml"


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def _settings(tmp_path: Path, catalog_url: str | None = None) -> Settings:
    return parse_settings({
        "node": {"storage_dir": str(tmp_path / "s"), "min_free_mb": 0},
        "catalog": {"url": catalog_url},
        "assembly": {"study_quiet_seconds": 5},
        "destinations": [
            {"name": "pacs", "type": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
            {"name": "archive", "type": "dimse", "ae_title": "ARCH", "host": "127.0.0.1", "port": 105},
            {"name": "web", "type": "dicomweb", "url": "http://127.0.0.1:1/dicom-web"},
        ],
        # the site's rules would run two models on CT, and send to the archive: a batch's studies get neither
        "rules": [{"name": "ct", "match": {"Modality": "CT"}, "models": ["ct-hu-segmentation", "ct-emphysema"],
                   "send_to": ["archive"]}],
    })


def _study(modality: str = "CT", n: int = 3) -> tuple[str, list[bytes]]:
    study_uid, series_uid = generate_uid(), generate_uid()
    out = []
    for k in range(n):
        ds = ct_slice(study_uid, series_uid, z=float(k))
        if modality == "MR":
            ds.Modality = "MR"
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        out.append(encode(ds))
    return study_uid, out


class FakePacs:
    """Studies as encoded instances; C-FIND answers by ModalitiesInStudy; retrieve() stores through the receiver."""

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver
        self.studies: dict[str, tuple[str, list[bytes]]] = {}
        self.finds: list[Dataset] = []
        self.retrieved: list[str] = []
        self.fail: str | None = None

    def add(self, modality: str = "CT") -> str:
        uid, files = _study(modality)
        self.studies[uid] = (modality, files)
        return uid

    def find_datasets(self, ident: Dataset, timeout: float) -> list[Dataset]:
        self.finds.append(ident)
        if self.fail == "find":
            raise RetrieveError("no association with pacs (127.0.0.1:104)")
        out = []
        for uid, (modality, _) in self.studies.items():
            if ident.ModalitiesInStudy in ("", modality):
                ds = Dataset()
                ds.StudyInstanceUID = uid
                out.append(ds)
        return out

    def find_series(self, study_uid: str, modality: str, timeout: float) -> list[str]:
        return ["1.2.3"] if self.studies[study_uid][0] == modality else []

    def retrieve(self, study_uid: str, series_uids: list[str], timeout: float) -> Retrieved:
        self.retrieved.append(study_uid)
        if self.fail == "retrieve":
            raise RetrieveError("C-MOVE: timed out after 1 s")
        files = self.studies[study_uid][1]
        if self.fail == "crash":  # one instance arrives, then the node dies
            self.receiver.receive(files[0], "PACS")
            raise KeyboardInterrupt
        return Retrieved(sum(self.receiver.receive(f, "PACS").status == 0 for f in files))


class Node:
    def __init__(self, tmp_path: Path, catalog_url: str | None = None) -> None:
        self.settings = s = _settings(tmp_path, catalog_url)
        self.clock = Clock()
        self.catalog = Catalog.for_settings(s)
        self.receiver = Receiver(s, self.catalog, Spool(s.node.storage_dir), self.clock)
        self.pacs = FakePacs(self.receiver)
        self.restart()

    def restart(self) -> None:
        self.runner = BatchRunner(self.settings, self.catalog, lambda name: self.pacs, self.clock)
        self.router = Router(self.catalog, self.settings.rules, self.clock, fixed_plan=self.runner.plan_for)
        self.assembler = Assembler(self.catalog, 5, self.clock)

    def create(self, **kw: Any) -> int:
        args: dict[str, Any] = {"query": "Modality=CT StudyDate=20260101-20260131", "source": "pacs",
                                "model": "ct-hu-segmentation", "anytime": True, **kw}
        return BatchStore(self.catalog).create(make_spec(self.settings, **args), self.clock())

    def tick(self, seconds: float = 10) -> None:
        self.clock.t += seconds
        self.runner.tick()
        self.assembler.tick()
        self.router.route_ready()

    def states(self, batch_id: int) -> dict[str, int]:
        return BatchStore(self.catalog).counts([batch_id])[batch_id]


@pytest.fixture
def new_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """Makes the test's :class:`Node` (on ``catalog_url``, default SQLite) and closes its catalog afterwards."""
    made: list[Node] = []

    def make(catalog_url: str | None = None) -> Node:
        made.append(Node(tmp_path, catalog_url))
        return made[-1]

    yield make
    for n in made:
        n.catalog.close()


def test_a_batch_is_validated_against_the_configuration(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    spec = make_spec(s, query="Modality=CT", source="pacs", model="ct-hu-segmentation")
    assert spec.destinations == ("pacs",) and spec.rate_per_hour == s.batch.rate_per_hour == 30
    assert make_spec(s, query="Modality=CT", source="pacs", model="ct-hu-segmentation", send_to=["archive", "web"],
                     rate_per_hour=5).destinations == ("archive", "web")
    for kw, message in (({"source": "nowhere"}, "source: unknown destination 'nowhere'"),
                        ({"source": "web"}, "must be a dimse destination"),
                        ({"model": "ct-nothing"}, "model: unknown model 'ct-nothing'"),
                        ({"send_to": ["pacs", "lost"]}, "send-to: unknown destinations ['lost']"),
                        ({"query": "Modalty=CT"}, "query: unknown DICOM keyword"),
                        ({"rate_per_hour": 0}, "rate")):
        args: dict[str, Any] = {"query": "Modality=CT", "source": "pacs", "model": "ct-hu-segmentation", **kw}
        with pytest.raises(BatchError, match=re.escape(message)):
            make_spec(s, **args)


def test_a_batch_retrieves_its_studies_and_runs_only_its_model_offpeak(new_node: Callable[..., Node],
                                                                       catalog_url: str | None) -> None:
    node = new_node(catalog_url)  # SQLite and PostgreSQL
    cts = [node.pacs.add("CT") for _ in range(3)]
    node.pacs.add("MR")
    batch_id = node.create(rate_per_hour=3600)
    node.tick()  # the C-FIND, then the first retrieval
    assert len(node.pacs.finds) == 1 and node.pacs.finds[0].ModalitiesInStudy == "CT"
    assert node.pacs.finds[0].StudyDate == "20260101-20260131"
    assert node.pacs.retrieved == cts[:1]
    assert node.states(batch_id) == {"retrieved": 1, "pending": 2}
    for _ in range(3):
        node.tick()
    assert node.pacs.retrieved == cts and len(node.pacs.finds) == 1  # the C-FIND ran once
    jobs = node.catalog.jobs_in_state(JobState.QUEUED)
    assert sorted((j.model, j.priority, j.rule, tuple(j.destinations)) for j in jobs) == \
        [("ct-hu-segmentation", "offpeak", rule_name(batch_id), ("pacs",))] * 3
    assert len({j.study_id for j in jobs}) == 3
    node.tick()
    assert node.states(batch_id) == {"queued": 3}
    for j in jobs[:2]:
        node.catalog.finish_job(j.id, JobState.DONE, node.clock())
    node.catalog.finish_job(jobs[2].id, JobState.FAILED, node.clock(), error="boom")
    node.tick()
    assert node.states(batch_id) == {"done": 2, "failed": 1}
    batch = BatchStore(node.catalog).get(batch_id)
    assert batch is not None and batch.state == BatchState.DONE and batch.finished_at == node.clock()


def test_a_study_pushed_normally_still_follows_the_rules(new_node: Callable[..., Node]) -> None:
    node = new_node()
    uid, files = _study()
    for f in files:
        node.receiver.receive(f, "SCANNER")
    node.tick()
    jobs = node.catalog.jobs_in_state(JobState.QUEUED)
    assert sorted(j.model for j in jobs) == ["ct-emphysema", "ct-hu-segmentation"]
    # a batch finding it later skips it: it is in the catalog already
    node.pacs.studies[uid] = ("CT", files)
    batch_id = node.create()
    node.tick()
    assert node.pacs.retrieved == [] and node.states(batch_id) == {"skipped": 1}


def test_the_rate_spreads_retrievals_and_survives_a_restart(new_node: Callable[..., Node]) -> None:
    node = new_node()
    for _ in range(3):
        node.pacs.add()
    node.create(rate_per_hour=30)  # one every 120 s
    node.tick()
    assert len(node.pacs.retrieved) == 1
    node.tick(60)
    assert len(node.pacs.retrieved) == 1
    node.restart()  # the throttle's clock is in the catalog
    node.tick(59)
    assert len(node.pacs.retrieved) == 1
    node.tick(1)
    assert len(node.pacs.retrieved) == 2
    node.tick(3600)  # an hour later: one retrieval, no burst
    assert len(node.pacs.retrieved) == 3


def test_outside_the_off_peak_window_nothing_is_retrieved(new_node: Callable[..., Node]) -> None:
    node = new_node()
    node.pacs.add()
    lt = time.localtime(node.clock())
    start = (lt.tm_hour * 60 + lt.tm_min + 720) % 1440  # a one-minute window twelve hours away
    node.runner.window = OffpeakWindow(start, (start + 1) % 1440)
    batch_id = node.create(anytime=False)
    node.tick(200)
    assert node.states(batch_id) == {"pending": 1} and node.pacs.retrieved == []
    node.runner.window = OffpeakWindow(0, 0)  # the whole day
    node.tick(200)
    assert node.states(batch_id) == {"retrieved": 1}


def test_a_crash_mid_retrieval_retrieves_that_study_again_and_no_other_twice(new_node: Callable[..., Node],
                                                                             catalog_url: str | None) -> None:
    node = new_node(catalog_url)
    first, second = node.pacs.add(), node.pacs.add()
    batch_id = node.create(rate_per_hour=3600)
    node.tick()
    assert node.pacs.retrieved == [first]
    node.pacs.fail = "crash"
    with pytest.raises(KeyboardInterrupt):
        node.tick()
    assert node.states(batch_id) == {"retrieved": 1, "retrieving": 1}
    node.pacs.fail = None
    node.restart()
    node.clock.t += 10  # the pipeline loop may come first: the half-retrieved study is held, not routed
    node.assembler.tick()
    assert len(node.router.route_ready()) == 1  # the first study's job
    assert len(node.catalog.studies_in_state(StudyState.READY)) == 1
    for _ in range(3):
        node.tick()
    assert node.pacs.retrieved == [first, second, second]
    jobs = node.catalog.jobs_in_state(JobState.QUEUED)
    assert len(jobs) == 2 and {j.model for j in jobs} == {"ct-hu-segmentation"}
    assert {s.instance_count for s in node.catalog.studies_in_state(StudyState.ROUTED)} == {3}


def test_failures_are_retried_then_failed_and_a_failed_find_is_asked_again(new_node: Callable[..., Node]) -> None:
    node = new_node()
    node.pacs.add()
    node.pacs.fail = "find"
    batch_id = node.create(rate_per_hour=3600)
    node.tick()
    batch = BatchStore(node.catalog).get(batch_id)
    assert batch is not None and batch.state == BatchState.PENDING and "no association" in (batch.note or "")
    node.pacs.fail = "retrieve"
    node.tick(node.settings.batch.find_retry_seconds)
    assert node.states(batch_id) == {"pending": 1}  # one attempt failed: tried again at a later slot
    node.tick()
    node.tick()
    assert len(node.pacs.retrieved) == node.settings.batch.max_attempts == 3
    assert node.states(batch_id) == {"failed": 1}
    node.tick()
    batch = BatchStore(node.catalog).get(batch_id)
    assert batch is not None and batch.state == BatchState.DONE


def test_cancel_skips_what_is_left(new_node: Callable[..., Node]) -> None:
    node = new_node()
    for _ in range(3):
        node.pacs.add()
    batch_id = node.create(rate_per_hour=1)
    node.tick()
    store = BatchStore(node.catalog)
    [progress] = store.progress([store.get(batch_id)], node.clock(), node.runner.window)  # type: ignore[list-item]
    assert progress.total == 3 and progress.estimated_finish == node.clock() + 2 * 3600  # 1 an hour, 2 left
    assert store.cancel(batch_id, node.clock()) is not None
    node.tick(7200)
    assert len(node.pacs.retrieved) == 1 and node.states(batch_id) == {"retrieved": 1, "skipped": 2}
    with pytest.raises(BatchError, match="only pending or running"):
        store.cancel(batch_id, node.clock())
    assert store.cancel(999, node.clock()) is None


def test_batch_settings_and_the_commented_example(tmp_path: Path) -> None:
    s = _settings(tmp_path).batch
    assert (s.rate_per_hour, s.method, s.max_attempts) == (30, "move", 3)
    with pytest.raises(ConfigError, match=r"batch\.method"):
        parse_settings({"node": {"storage_dir": str(tmp_path)}, "batch": {"method": "push"}})
    text = EXAMPLE.read_text()
    lines = text.splitlines()
    start = lines.index(next(x for x in lines if x.startswith("# batch:")))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("#"))
    example = yaml.safe_load("\n".join(x[2:] for x in lines[start:end] if x.startswith(("#   ", "# batch:"))))
    assert parse_settings({**yaml.safe_load(text), **example}).batch.rate_per_hour == example["batch"]["rate_per_hour"]


def test_a_source_that_left_the_configuration_cancels_its_batch(new_node: Callable[..., Node]) -> None:
    node = new_node()
    node.pacs.add()
    batch_id = node.create()
    node.runner = BatchRunner.from_settings(node.settings.model_copy(update={"destinations": []}), node.catalog,
                                            node.receiver.store, node.clock)
    node.tick()
    batch = BatchStore(node.catalog).get(batch_id)
    assert batch is not None and batch.state == BatchState.CANCELLED and "no longer" in (batch.note or "")

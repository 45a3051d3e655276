"""Prior retrieval (node.retrieve) with a fake PACS: choice of the prior, jobs awaiting it, failures, config."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom.uid import generate_uid

from node.assemble import Assembler
from node.catalog import Catalog
from node.config import ConfigError, Settings, parse_settings
from node.receive.scp import STATUS_SUCCESS, Receiver
from node.retrieve import (
    Candidate,
    PriorQuery,
    PriorRetriever,
    Retrieved,
    RetrieveError,
    choose_prior,
    find_identifier,
)
from node.route import Router
from node.schema import JobState
from node.spool import Spool
from tests.dsfactory import ct_slice, encode

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "config.example.yaml"
PATIENT = "PRIOR-PAT-7"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _query(**kw: Any) -> PriorQuery:
    base: dict[str, Any] = {"patient_id": "P1", "issuer": "", "modality": "CT", "study_uid": "1.2.9",
                            "study_date": "20240315", "study_time": "101500"}
    return PriorQuery(**{**base, **kw})


def test_choose_prior_takes_the_newest_earlier_study_of_the_same_patient() -> None:
    q = _query()
    cands = [
        Candidate("1.2.9", "P1", "20240315", "101500"),  # the current study itself
        Candidate("1.2.1", "P1", "20200101"),
        Candidate("1.2.2", "P1", "20230601", "120000"),
        Candidate("1.2.3", "P1", "20240316"),  # later than the current study
        Candidate("1.2.4", "P10", "20240101"),  # a PACS matching loosely: another patient
        Candidate("1.2.5", "P1", "20240314", issuer="OTHER"),  # same ID, another issuer... but ours is empty
        Candidate("1.2.6", "P1", "2024"),  # malformed date
        Candidate("1.2.7", "P1", "20240315", "090000"),  # same day, earlier: eligible, but known below
    ]
    assert choose_prior(q, cands, known={"1.2.7"}).study_uid == "1.2.5"  # type: ignore[union-attr]
    assert choose_prior(_query(issuer="HOSP"), cands, known={"1.2.7"}).study_uid == "1.2.2"  # type: ignore[union-attr]
    assert choose_prior(q, cands, known=set()).study_uid == "1.2.7"  # type: ignore[union-attr]
    assert choose_prior(_query(max_age_days=30), cands[:3], known=set()) is None
    assert choose_prior(q, [], known=set()) is None


def test_find_identifier_date_range() -> None:
    ds = find_identifier(_query())
    assert ds.QueryRetrieveLevel == "STUDY" and ds.PatientID == "P1" and ds.ModalitiesInStudy == "CT"
    assert ds.StudyDate == "-20240315" and ds.StudyInstanceUID == ""
    assert find_identifier(_query(max_age_days=365)).StudyDate == "20230316-20240315"


def _settings(tmp_path: Path, priors: dict[str, Any] | None = None, models: tuple[str, ...] = ("ct-registration",),
              ) -> Settings:
    data: dict[str, Any] = {
        "node": {"storage_dir": str(tmp_path / "s"), "min_free_mb": 0},
        "destinations": [{"name": "pacs", "type": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
        "rules": [{"name": "ct", "match": {"Modality": "CT"}, "models": list(models), "send_to": ["pacs"]}],
    }
    if priors is not None:
        data["priors"] = priors
    return parse_settings(data)


def test_priors_config(tmp_path: Path) -> None:
    assert _settings(tmp_path).priors is None
    p = _settings(tmp_path, {"source": "pacs"}).priors
    assert p is not None and p.method == "move" and p.max_age_days is None and p.timeout_seconds > 0
    assert _settings(tmp_path, {"source": "pacs", "method": "get", "max_age_days": 90}).priors.method == "get"  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match=r"priors\.source: unknown destination"):
        _settings(tmp_path, {"source": "nowhere"})
    with pytest.raises(ConfigError, match=r"priors\.method"):
        _settings(tmp_path, {"source": "pacs", "method": "push"})
    with pytest.raises(ConfigError, match=r"priors\.retries"):
        _settings(tmp_path, {"source": "pacs", "retries": 3})
    # the commented example in deploy/config.example.yaml is valid once uncommented
    lines = EXAMPLE.read_text().splitlines()
    start = lines.index(next(x for x in lines if x.startswith("# priors:")))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("#")), len(lines))
    block = [x[2:] for x in lines[start:end] if x.startswith("#   ") or x.startswith("# priors:")]
    example = yaml.safe_load("\n".join(block))
    assert parse_settings({**yaml.safe_load(EXAMPLE.read_text()), **example}).priors is not None


class FakePacs:
    """A PACS holding studies as encoded instances; retrieve() stores them through the receiver."""

    def __init__(self, store: Callable[[bytes, str, str, str], int]) -> None:
        self.store = store
        self.studies: dict[str, tuple[Candidate, list[bytes]]] = {}
        self.finds: list[PriorQuery] = []
        self.retrieved: list[str] = []
        self.fail: str | None = None

    def find(self, query: PriorQuery, timeout: float) -> list[Candidate]:
        self.finds.append(query)
        if self.fail == "find":
            raise RetrieveError("no association with pacs (127.0.0.1:104)")
        return [c for c, _ in self.studies.values() if c.patient_id == query.patient_id]

    def find_series(self, study_uid: str, modality: str, timeout: float) -> list[str]:
        return ["1.2.3.4"] if self.studies[study_uid][1] else []

    def retrieve(self, study_uid: str, series_uids: list[str], timeout: float) -> Retrieved:
        self.retrieved.append(study_uid)
        if self.fail == "retrieve":
            raise RetrieveError("C-MOVE: timed out after 1 s")
        if self.fail == "cut-short":  # one instance arrives, then the retrieval times out
            self.store(self.studies[study_uid][1][0], "", "", "PACS")
            raise RetrieveError("C-MOVE: timed out after 1 s")
        statuses = [self.store(data, "", "", "PACS") for data in self.studies[study_uid][1]]
        return Retrieved(sum(s == STATUS_SUCCESS for s in statuses))


def _series(study_uid: str, date: str, n: int = 3, patient: str = PATIENT) -> list[bytes]:
    series_uid = generate_uid()
    out = []
    for k in range(n):
        ds = ct_slice(study_uid, series_uid, z=float(k))
        ds.PatientID, ds.StudyDate, ds.StudyTime = patient, date, "100000"
        out.append(encode(ds))
    return out


class Node:
    """Catalog, spool, receiver, assembler, retriever and router, driven by hand."""

    def __init__(self, tmp_path: Path, settings: Settings, *, defer: bool = False) -> None:
        self.clock = Clock()
        self.catalog = Catalog.for_storage(settings.node.storage_dir)
        self.spool = Spool(settings.node.storage_dir)
        self.receiver = Receiver(settings, self.catalog, self.spool, self.clock)
        self.pacs = FakePacs(self.store)
        self.tasks: list[Callable[[], object]] = []
        submit = self.tasks.append if defer else (lambda task: task())
        self.retriever = PriorRetriever(settings, self.catalog, self.spool, self.pacs, self.clock, submit=submit)
        self.assembler = Assembler(self.catalog, 5, self.clock)
        self.router = Router(self.catalog, settings.rules, self.clock,
                             priors_from_pacs=settings.priors is not None)

    def store(self, data: bytes, sop_class: str, sop_uid: str, calling: str) -> int:
        # a C-STORE sub-operation: the request names the instance's own UIDs
        import io

        import pydicom

        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        return self.receiver.store(data, str(ds.SOPClassUID), str(ds.SOPInstanceUID), calling)

    def push(self, files: list[bytes]) -> None:
        for data in files:
            assert self.store(data, "", "", "SCANNER") == STATUS_SUCCESS

    def tick(self) -> list[int]:
        """One pipeline pass after the quiet period; returns the new job ids."""
        self.clock.t += 10
        self.assembler.tick()
        jobs = self.router.route_ready()
        self.retriever.tick()  # acts on the jobs routing created awaiting their prior
        return jobs

    def states(self) -> dict[str, str]:
        with self.catalog.session() as s:
            from sqlalchemy import select

            from node.catalog import Study

            return {uid: state for uid, state in s.execute(select(Study.study_uid, Study.state))}


def test_prior_is_fetched_before_routing_and_never_routed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="node")
    node = Node(tmp_path, _settings(tmp_path, {"source": "pacs"}))
    prior_uid, older_uid, current_uid = generate_uid(), generate_uid(), generate_uid()
    node.pacs.studies[prior_uid] = (Candidate(prior_uid, PATIENT, "20230101", "100000"),
                                    _series(prior_uid, "20230101"))
    node.pacs.studies[older_uid] = (Candidate(older_uid, PATIENT, "20200101"), _series(older_uid, "20200101"))
    node.push(_series(current_uid, "20240101"))
    jobs = node.tick()
    assert node.pacs.retrieved == [prior_uid]  # the newest earlier study only
    assert [q.study_uid for q in node.pacs.finds] == [current_uid] and node.pacs.finds[0].patient_id == PATIENT
    assert len(jobs) == 1  # routed once the prior was in
    job = node.catalog.get_job(jobs[0])
    assert job is not None and node.catalog.prior_series(job) is not None
    fetch = node.catalog.prior_fetch(job.study_id, 1)
    assert fetch is not None and fetch.state == "retrieved" and fetch.prior_study_uid == prior_uid
    assert node.tick() == []  # the prior's quiet period ends: it becomes "prior", never routed
    assert node.states() == {current_uid: "routed", prior_uid: "prior"}
    assert node.catalog.counts()["jobs"] == {"queued": 1}
    assert len(node.pacs.finds) == 1
    assert PATIENT not in caplog.text and "20230101" not in caplog.text


def test_job_waits_while_its_prior_is_fetched(tmp_path: Path) -> None:
    node = Node(tmp_path, _settings(tmp_path, {"source": "pacs"},
                                    models=("ct-registration", "ct-hu-segmentation")), defer=True)
    prior_uid, current_uid = generate_uid(), generate_uid()
    node.pacs.studies[prior_uid] = (Candidate(prior_uid, PATIENT, "20230101"), _series(prior_uid, "20230101"))
    node.push(_series(current_uid, "20240101"))
    jobs = node.tick()
    assert len(jobs) == 2 and node.states() == {current_uid: "routed"}
    by_model = {j.model: j for j in (node.catalog.get_job(i) for i in jobs) if j is not None}
    assert by_model["ct-registration"].state == JobState.AWAITING_PRIOR  # routing recorded it
    assert by_model["ct-hu-segmentation"].state == JobState.QUEUED  # the other model does not wait
    assert [m for _, m in node.catalog.jobs_to_enqueue(node.clock())] == ["ct-hu-segmentation"]
    assert node.tick() == [] and len(node.tasks) == 1  # handed over once
    node.tasks.pop()()
    registration = node.catalog.get_job(by_model["ct-registration"].id)
    assert registration is not None and registration.state == JobState.QUEUED
    assert node.catalog.prior_series(registration) is not None
    assert node.tick() == [] and not node.tasks


def test_late_instance_while_waiting_reopens_the_study(tmp_path: Path) -> None:
    node = Node(tmp_path, _settings(tmp_path, {"source": "pacs"}), defer=True)
    prior_uid, current_uid = generate_uid(), generate_uid()
    node.pacs.studies[prior_uid] = (Candidate(prior_uid, PATIENT, "20230101"), _series(prior_uid, "20230101"))
    files = _series(current_uid, "20240101", n=4)
    node.push(files[:3])
    node.tick()
    [first] = node.catalog.jobs_in_state(JobState.AWAITING_PRIOR)
    node.push(files[3:])  # re-opens the study (generation 2)
    node.tasks.pop()()  # the fetch ends: the job of generation 1 is not released (the study changed)
    assert node.states()[current_uid] == "receiving"
    assert node.catalog.jobs_to_enqueue(node.clock()) == []
    jobs = node.tick()  # generation 2: the prior is in the catalog now, no second fetch
    assert len(jobs) == 1 and len(node.pacs.finds) == 1 and not node.tasks
    old = node.catalog.get_job(first.id)
    assert old is not None and old.state == JobState.SUPERSEDED
    assert [j for j, _ in node.catalog.jobs_to_enqueue(node.clock())] == jobs


@pytest.mark.parametrize("fail", ["find", "retrieve", "nothing", "no-series"])
def test_failure_routes_the_study_anyway_once(tmp_path: Path, fail: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="node")
    node = Node(tmp_path, _settings(tmp_path, {"source": "pacs"}))
    prior_uid, current_uid = generate_uid(), generate_uid()
    if fail != "nothing":
        files = [] if fail == "no-series" else _series(prior_uid, "20230101")
        node.pacs.studies[prior_uid] = (Candidate(prior_uid, PATIENT, "20230101"), files)
        node.pacs.fail = fail
    node.push(_series(current_uid, "20240101"))
    assert len(node.tick()) == 1
    assert node.tick() == [] and len(node.pacs.finds) == 1  # one attempt per study generation
    fetch = node.catalog.prior_fetch(node.catalog.studies_in_state("routed")[0].id, 1)
    expected = {"find": "failed", "retrieve": "failed", "nothing": "not-found", "no-series": "not-found"}[fail]
    assert fetch is not None and fetch.state == expected
    assert "routed without it" in caplog.text and PATIENT not in caplog.text


def test_nothing_fetched_when_not_needed(tmp_path: Path) -> None:
    # a prior already in the catalog
    node = Node(tmp_path / "a", _settings(tmp_path / "a", {"source": "pacs"}))
    node.push(_series(generate_uid(), "20230101"))
    node.tick()
    assert len(node.pacs.finds) == 1  # the first study asked the (empty) PACS
    node.push(_series(generate_uid(), "20240101"))
    assert len(node.tick()) == 1 and len(node.pacs.finds) == 1
    # no registration model in the rules
    node = Node(tmp_path / "b", _settings(tmp_path / "b", {"source": "pacs"}, models=("ct-hu-segmentation",)))
    node.push(_series(generate_uid(), "20240101"))
    assert len(node.tick()) == 1 and node.pacs.finds == []
    # no Patient ID to query with
    node = Node(tmp_path / "c", _settings(tmp_path / "c", {"source": "pacs"}))
    node.push(_series(generate_uid(), "20240101", patient=""))
    assert len(node.tick()) == 1 and node.pacs.finds == []
    assert node.catalog.counts()["studies"] == {"routed": 1}


def test_a_restart_fetches_again_for_jobs_left_waiting(tmp_path: Path) -> None:
    node = Node(tmp_path, _settings(tmp_path, {"source": "pacs"}), defer=True)
    prior_uid, current_uid = generate_uid(), generate_uid()
    node.pacs.studies[prior_uid] = (Candidate(prior_uid, PATIENT, "20230101"), _series(prior_uid, "20230101"))
    node.push(_series(current_uid, "20240101"))
    [job_id] = node.tick()
    # a crash in the middle of the retrieval: the fetch row says "retrieving", part of the prior is in
    [job] = node.catalog.jobs_in_state(JobState.AWAITING_PRIOR)
    node.catalog.record_prior_fetch(job.study_id, 1, "CT", "retrieving", node.clock(), prior_study_uid=prior_uid)
    node.push(node.pacs.studies[prior_uid][1][:1])
    node.tasks.clear()  # the fetch in flight died with the process
    node.retriever = PriorRetriever(node.retriever.settings, node.catalog, node.spool, node.pacs, node.clock,
                                    submit=lambda task: task())
    assert node.tick() == []  # nothing new to route; the restarted retriever takes the waiting job up
    assert node.pacs.retrieved == [prior_uid]  # fetched again although part of it was already here
    assert node.catalog.counts()["instances"]["total"] == 6
    released = node.catalog.get_job(job_id)
    assert released is not None and released.state == JobState.QUEUED
    assert node.catalog.prior_series(released) is not None


def test_a_prior_cut_short_is_not_used_and_is_fetched_again(tmp_path: Path) -> None:
    node = Node(tmp_path, _settings(tmp_path, {"source": "pacs"}))
    prior_uid, current_uid = generate_uid(), generate_uid()
    node.pacs.studies[prior_uid] = (Candidate(prior_uid, PATIENT, "20230101"), _series(prior_uid, "20230101"))
    node.pacs.fail = "cut-short"
    files = _series(current_uid, "20240101", n=4)
    node.push(files[:3])
    [job_id] = node.tick()  # routed without a usable prior
    job = node.catalog.get_job(job_id)
    assert job is not None
    assert node.catalog.counts()["instances"]["total"] == 4  # one instance of the prior arrived
    assert node.catalog.incomplete_prior_uids() == {prior_uid}
    assert node.catalog.prior_series(job) is None  # the registration job skips instead of using it

    node.pacs.fail = None
    node.push(files[3:])  # a late instance: generation 2 asks the PACS again and takes the same study
    [job_id] = node.tick()
    assert node.pacs.retrieved == [prior_uid, prior_uid]
    assert node.catalog.incomplete_prior_uids() == set()
    job = node.catalog.get_job(job_id)
    assert job is not None
    prior = node.catalog.prior_series(job)
    assert prior is not None and prior.instance_count == 3

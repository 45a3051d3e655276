"""Prior studies from the PACS for registration models: C-FIND, then C-MOVE or C-GET.

A registration (pair) model needs the patient's earlier study of the same modality; the worker takes
it from the catalog (``Catalog.prior_series``). With ``priors:`` configured, routing
(:mod:`node.route`) creates the job of such a model ``awaiting-prior`` when the catalog holds no
earlier study; this module acts on that job state only (it never plans jobs itself):

    job awaiting-prior --(tick: handed to the retrieval thread)--> fetch --> job queued

The retrieval thread reads Patient ID (+ Issuer) and Study Date/Time from one spooled instance of
the series (never logged), C-FINDs studies at STUDY level (PatientID, ModalitiesInStudy, StudyDate up
to the current one, ``max_age_days`` back), and takes the newest earlier study the catalog does not
hold. Its UID is recorded in ``prior_fetches`` *before* the retrieval starts, so its instances become
a ``prior`` study (stored and cataloged, never routed, no results sent). Only its series of that
modality are fetched (SERIES-level C-FIND, then one SERIES-level C-MOVE or C-GET each: a prior's SR,
SEG or other series are neither needed nor accepted by the node), by C-MOVE to ``node.ae_title`` (the
instances come in through the Storage SCP) or by C-GET (each instance goes through ``Receiver.store``,
the same door: validated, fsynced, cataloged identically).

One attempt per study generation, bounded by ``priors.timeout_seconds`` (the association is aborted
then). Whatever happens (PACS down, nothing found, timeout) the jobs are queued; the registration job
then skips with "no earlier study", as without ``priors:``. Other jobs of the study never wait. A prior whose
retrieval failed part-way (timeout, failed sub-operations) stays stored but is not used by any job and
is not "known": the next study generation that needs it fetches it again. One thread
fetches, one study at a time: receive threads never wait, and other studies keep being routed. Jobs
left ``awaiting-prior`` by a crash are simply handed over again by the first tick after start-up.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar, cast

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE

from models.errors import RetrieveError
from node.catalog import Catalog
from node.config import DimseDestination, Settings
from node.conformance import (
    STORAGE_SOP_CLASSES,
    STUDY_ROOT_FIND,
    STUDY_ROOT_GET,
    STUDY_ROOT_MOVE,
    TRANSFER_SYNTAXES,
)
from node.logutil import ref
from node.nodelay import NODELAY_HANDLERS
from node.schema import PriorFetchState
from node.spool import Spool
from node.tls import client_context

log = logging.getLogger("node.retrieve")

PENDING = (0xFF00, 0xFF01)
WILDCARDS = re.compile(r"[*?\\]")

StoreFn = Callable[[bytes, str, str, str], int]
"""``Receiver.store(encoded, sop_class_uid, sop_instance_uid, calling_ae) -> status``."""


@dataclass(frozen=True)
class PriorQuery:
    """What identifies the current study's patient and date (PHI: never log it)."""

    patient_id: str
    issuer: str
    modality: str
    study_uid: str
    study_date: str
    """YYYYMMDD."""
    study_time: str
    max_age_days: int | None = None

    @property
    def datetime(self) -> str:
        return f"{self.study_date}{self.study_time}"

    def date_range(self) -> str:
        """The C-FIND StudyDate range: ``[current - max_age_days]-current``."""
        if self.max_age_days is None:
            return f"-{self.study_date}"
        first = dt.datetime.strptime(self.study_date, "%Y%m%d").date() - dt.timedelta(days=self.max_age_days)
        return f"{first:%Y%m%d}-{self.study_date}"


@dataclass(frozen=True)
class Candidate:
    """One C-FIND match."""

    study_uid: str
    patient_id: str
    study_date: str
    study_time: str = ""
    issuer: str = ""

    @property
    def datetime(self) -> str:
        return f"{self.study_date}{self.study_time}"


@dataclass(frozen=True)
class Retrieved:
    """Final C-MOVE/C-GET sub-operation counts."""

    completed: int
    failed: int = 0
    warning: int = 0


STUDY_FIND_KEYS = ("QueryRetrieveLevel", "PatientID", "IssuerOfPatientID", "StudyInstanceUID", "StudyDate",
                   "StudyTime", "ModalitiesInStudy")
"""The keys of :func:`find_identifier` (what the audit trail records of a C-FIND: names, never values)."""
SERIES_FIND_KEYS = ("QueryRetrieveLevel", "StudyInstanceUID", "SeriesInstanceUID", "Modality")


@dataclass(frozen=True)
class PriorExchange:
    """Passed to ``on_exchange`` after each C-FIND, C-MOVE or C-GET the node makes to the PACS for a
    prior (typed event; the audit trail subscribes). The PACS is named by its ``destinations`` entry;
    a C-FIND by its level and the names of its keys, never their values."""

    operation: Literal["find", "move", "get"]
    source: str
    """``priors.source`` (or a batch's source, :mod:`node.batch`)."""
    level: str = ""
    keys: tuple[str, ...] = ()
    study_uid: str | None = None
    """The study retrieved (C-MOVE/C-GET) or whose series were searched."""
    count: int = 0
    """Matches (C-FIND) or completed sub-operations (C-MOVE/C-GET)."""
    failed: int = 0
    """Failed sub-operations."""
    error: str | None = None
    """Why the operation failed (no association, timeout, failure status)."""


_T = TypeVar("_T")


class PriorSource(Protocol):
    """The transport seam: a PACS that answers C-FIND and C-MOVE/C-GET (tests plug in a fake)."""

    def find(self, query: PriorQuery, timeout: float) -> list[Candidate]:
        """Studies of the patient with the modality in the date range; raise RetrieveError."""

    def find_series(self, study_uid: str, modality: str, timeout: float) -> list[str]:
        """Series Instance UIDs of ``modality`` in the study; raise RetrieveError."""

    def retrieve(self, study_uid: str, series_uids: list[str], timeout: float) -> Retrieved:
        """Bring the series into the node (through ``Receiver.store``); raise RetrieveError."""


def find_identifier(query: PriorQuery) -> Dataset:
    """The STUDY-level C-FIND identifier (matching and return keys)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientID = query.patient_id
    ds.IssuerOfPatientID = ""
    ds.StudyInstanceUID = ""
    ds.StudyDate = query.date_range()
    ds.StudyTime = ""
    ds.ModalitiesInStudy = query.modality
    return ds


def choose_prior(query: PriorQuery, candidates: list[Candidate], known: set[str]) -> Candidate | None:
    """The newest match of the same patient dated no later than the current study, that is neither
    the current study nor one the catalog already holds (fetching more of a routed study would
    re-open it)."""
    lowest = query.date_range().split("-")[0]
    eligible = [
        c for c in candidates
        if c.study_uid != query.study_uid and c.study_uid not in known
        and c.patient_id == query.patient_id  # a PACS may match loosely: insist on the exact ID
        and (not c.issuer or not query.issuer or c.issuer == query.issuer)
        and re.fullmatch(r"\d{8}", c.study_date) is not None
        and lowest <= c.study_date and c.datetime <= query.datetime
    ]
    return max(eligible, key=lambda c: (c.datetime, c.study_uid)) if eligible else None


def _text(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


class DimsePriorSource:
    """C-FIND + C-MOVE (to our own AE title) or C-GET (storing through ``store``) against one PACS."""

    def __init__(self, destination: DimseDestination, calling_ae_title: str, method: Literal["move", "get"],
                 store: StoreFn, *, move_destination: str, acse_timeout: float = 30) -> None:
        self.destination = destination
        self.calling = destination.calling_ae_title or calling_ae_title
        self.method = method
        self.store = store
        self.move_destination = move_destination
        self.acse_timeout = acse_timeout

    @contextmanager
    def _association(self, ae: AE, timeout: float, **kwargs: Any) -> Iterator[tuple[Association, threading.Event]]:
        """An association that is aborted after ``timeout`` seconds (the event tells it was)."""
        ae.acse_timeout = min(self.acse_timeout, timeout)
        ae.dimse_timeout = ae.network_timeout = timeout
        d = self.destination
        kwargs["evt_handlers"] = [*NODELAY_HANDLERS, *kwargs.get("evt_handlers", [])]
        if d.tls is not None:  # DICOM TLS; a C-MOVE's pushes arrive wherever the PACS sends to (node.tls.port)
            kwargs["tls_args"] = (client_context(d.tls, f"destinations[{d.name}].tls"), d.host)
        assoc = ae.associate(d.host, d.port, ae_title=d.ae_title, **kwargs)
        if not assoc.is_established:
            raise RetrieveError(f"no association with {d.name} ({d.host}:{d.port})")
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            assoc.abort()

        timer = threading.Timer(timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            yield assoc, expired
        finally:
            timer.cancel()
            if assoc.is_established:
                assoc.release()

    def _final(self, what: str, responses: Iterator[tuple[Dataset, Dataset | None]], expired: threading.Event,
               timeout: float, on_match: Callable[[Dataset], None] | None = None) -> Dataset:
        """Consume the responses; return the final status dataset, or raise RetrieveError."""
        for status, identifier in responses:
            if "Status" not in status:
                if expired.is_set():
                    raise RetrieveError(f"{what}: timed out after {timeout:g} s")
                raise RetrieveError(f"{what}: no response (association lost)")
            code = int(status.Status)
            if code in PENDING:
                if on_match is not None and identifier is not None:
                    on_match(identifier)
                continue
            if code == 0x0000 or 0xB000 <= code <= 0xBFFF:
                return status
            raise RetrieveError(f"{what}: failure status 0x{code:04X}")
        raise RetrieveError(f"{what}: no final response")

    def find_datasets(self, ident: Dataset, timeout: float) -> list[Dataset]:
        """One Study Root C-FIND: the pending responses' identifiers; raise RetrieveError."""
        ae = AE(ae_title=self.calling)
        ae.add_requested_context(STUDY_ROOT_FIND)
        found: list[Dataset] = []
        with self._association(ae, timeout) as (assoc, expired):
            self._final("C-FIND", assoc.send_c_find(ident, STUDY_ROOT_FIND), expired, timeout, found.append)
        return found

    def find(self, query: PriorQuery, timeout: float) -> list[Candidate]:
        return [Candidate(_text(m, "StudyInstanceUID"), _text(m, "PatientID"), _text(m, "StudyDate"),
                          _text(m, "StudyTime"), _text(m, "IssuerOfPatientID"))
                for m in self.find_datasets(find_identifier(query), timeout) if _text(m, "StudyInstanceUID")]

    def find_series(self, study_uid: str, modality: str, timeout: float) -> list[str]:
        """Series Instance UIDs of ``modality`` (every series: "") in the study; raise RetrieveError."""
        ident = Dataset()
        ident.QueryRetrieveLevel = "SERIES"
        ident.StudyInstanceUID = study_uid
        ident.SeriesInstanceUID = ""
        ident.Modality = modality
        found = [m for m in self.find_datasets(ident, timeout)
                 if not modality or _text(m, "Modality") in ("", modality)]
        return list(dict.fromkeys(uid for m in found if (uid := _text(m, "SeriesInstanceUID"))))

    def retrieve(self, study_uid: str, series_uids: list[str], timeout: float) -> Retrieved:
        """One association; one C-MOVE (or C-GET) per series, at SERIES level."""
        ae = AE(ae_title=self.calling)
        kwargs: dict[str, Any] = {}
        if self.method == "move":
            ae.add_requested_context(STUDY_ROOT_MOVE)
        else:
            ae.add_requested_context(STUDY_ROOT_GET)
            for sop_class in STORAGE_SOP_CLASSES:  # uncompressed first: the PACS picks one per class
                ae.add_requested_context(sop_class, list(TRANSFER_SYNTAXES))
            kwargs["ext_neg"] = [build_role(c, scp_role=True) for c in STORAGE_SOP_CLASSES]
            kwargs["evt_handlers"] = [(evt.EVT_C_STORE, self._handle_store)]
        total = Retrieved(0)
        with self._association(ae, timeout, **kwargs) as (assoc, expired):
            for msg_id, series_uid in enumerate(series_uids, start=1):
                ident = Dataset()
                ident.QueryRetrieveLevel = "SERIES"
                ident.StudyInstanceUID = study_uid
                ident.SeriesInstanceUID = series_uid
                if self.method == "move":
                    responses = assoc.send_c_move(ident, self.move_destination, STUDY_ROOT_MOVE, msg_id=msg_id)
                else:
                    responses = assoc.send_c_get(ident, STUDY_ROOT_GET, msg_id=msg_id)
                final = self._final(f"C-{self.method.upper()}", responses, expired, timeout)
                total = Retrieved(total.completed + int(final.get("NumberOfCompletedSuboperations", 0) or 0),
                                  total.failed + int(final.get("NumberOfFailedSuboperations", 0) or 0),
                                  total.warning + int(final.get("NumberOfWarningSuboperations", 0) or 0))
        return total

    def _handle_store(self, event: evt.Event) -> int:
        request = cast(C_STORE, event.request)
        return self.store(event.encoded_dataset(include_meta=True), str(request.AffectedSOPClassUID),
                          str(request.AffectedSOPInstanceUID), self.destination.ae_title)


def reported(call: Callable[[], _T], on_exchange: Callable[[PriorExchange], None] | None,
             operation: Literal["find", "move", "get"], source: str, *, level: str = "", keys: tuple[str, ...] = (),
             study_uid: str | None = None) -> _T:
    """``call()`` (one C-FIND, or the C-MOVE/C-GETs of a study) at ``source``, reported to ``on_exchange``
    (the audit trail) whatever its outcome; a failing hook is logged, never raised."""
    def report(event: PriorExchange) -> None:
        if on_exchange is None:
            return
        try:
            on_exchange(event)
        except Exception:
            log.exception("on_exchange hook failed")

    try:
        result = call()
    except Exception as exc:
        error = str(exc) if isinstance(exc, RetrieveError) else type(exc).__name__
        report(PriorExchange(operation, source, level, keys, study_uid, error=error))
        raise
    if isinstance(result, Retrieved):
        report(PriorExchange(operation, source, level, keys, study_uid, result.completed, result.failed))
    else:
        report(PriorExchange(operation, source, level, keys, study_uid, len(result) if isinstance(result, list) else 0))
    return result


def dimse_source(settings: Settings, name: str, method: Literal["move", "get"], store: StoreFn) -> DimsePriorSource:
    """The ``destinations`` entry ``name`` as a C-FIND/C-MOVE/C-GET source for the node: C-MOVE to
    ``node.ae_title``, C-GET storing through ``store`` (``Receiver.store``). KeyError for an unknown name,
    ValueError for a destination that is not dimse."""
    pacs = settings.destination(name)  # KeyError: not configured
    if not isinstance(pacs, DimseDestination):
        raise ValueError(f"{name!r} is not a dimse destination")
    return DimsePriorSource(pacs, settings.node.ae_title, method, store, move_destination=settings.node.ae_title,
                            acse_timeout=settings.node.acse_timeout_seconds)


class PriorRetriever:
    """Holds back studies that need a prior from the PACS, and fetches it on its own thread."""

    def __init__(self, settings: Settings, catalog: Catalog, spool: Spool, source: PriorSource,
                 clock: Callable[[], float], submit: Callable[[Callable[[], object]], object] | None = None, *,
                 on_exchange: Callable[[PriorExchange], None] | None = None) -> None:
        """``on_exchange``: every C-FIND, C-MOVE and C-GET made to the PACS (:class:`PriorExchange`)."""
        assert settings.priors is not None
        self.settings = settings
        self.priors = settings.priors
        self.catalog = catalog
        self.spool = spool
        self.source = source
        self.clock = clock
        self._submit = submit or self._enqueue
        self.on_exchange = on_exchange
        self._handed: set[tuple[int, int]] = set()
        """(study id, generation) handed to the retrieval thread and not finished yet."""
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[Callable[[], object] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_settings(cls, settings: Settings, catalog: Catalog, spool: Spool, store: StoreFn,
                      clock: Callable[[], float], *,
                      on_exchange: Callable[[PriorExchange], None] | None = None) -> PriorRetriever | None:
        """None without a ``priors:`` section (priors come from the catalog only). ``store`` is the
        receiving door (``Receiver.store``) that C-GET sub-operations go through."""
        if settings.priors is None:
            return None
        source = dimse_source(settings, settings.priors.source, settings.priors.method, store)
        return cls(settings, catalog, spool, source, clock, on_exchange=on_exchange)

    def _enqueue(self, task: Callable[[], object]) -> None:
        """Run ``task`` on the retrieval thread (a daemon: a fetch in flight at exit is redone at start-up)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="priors", daemon=True)
            self._thread.start()
        self._queue.put(task)

    def _run(self) -> None:
        while (task := self._queue.get()) is not None:
            try:
                task()
            except Exception:  # fetch() handles its own errors; this keeps the thread alive regardless
                log.exception("prior fetch crashed")

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)

    def tick(self) -> list[int]:
        """Hand every study generation with jobs awaiting a prior to the retrieval thread (once);
        returns the study ids handed over."""
        handed: list[int] = []
        for study_id, generation, series in self.catalog.jobs_awaiting_prior():
            with self._lock:
                if (study_id, generation) in self._handed:
                    continue
                self._handed.add((study_id, generation))
            log.info("study #%d: no earlier %s study in the catalog; asking %s for the prior",
                     study_id, series.modality or "(no modality)", self.priors.source)
            self._submit(functools.partial(self.fetch, study_id, generation, series.id, series.modality))
            handed.append(study_id)
        return handed

    def query_for(self, series_id: int, modality: str) -> PriorQuery | None:
        """The C-FIND keys, from one spooled instance of the series; None if it lacks them."""
        instances = self.catalog.instances_of_series(series_id)
        if not instances:
            return None
        ds = pydicom.dcmread(self.spool.path(instances[0].path), stop_before_pixels=True,
                             specific_tags=["PatientID", "IssuerOfPatientID", "StudyInstanceUID", "StudyDate",
                                            "StudyTime"])
        pid, date = _text(ds, "PatientID"), _text(ds, "StudyDate")
        if not pid or WILDCARDS.search(pid) or re.fullmatch(r"\d{8}", date) is None:
            return None
        return PriorQuery(pid, _text(ds, "IssuerOfPatientID"), modality, _text(ds, "StudyInstanceUID"), date,
                          _text(ds, "StudyTime"), self.priors.max_age_days)

    def _exchange(self, call: Callable[[], _T], operation: Literal["find", "move", "get"], *, level: str = "",
                  keys: tuple[str, ...] = (), study_uid: str | None = None) -> _T:
        """``call()`` (one C-FIND, or the C-MOVE/C-GETs of a study), reported to ``on_exchange``."""
        return reported(call, self.on_exchange, operation, self.priors.source, level=level, keys=keys,
                        study_uid=study_uid)

    def fetch(self, study_id: int, generation: int, series_id: int, modality: str) -> PriorFetchState:
        """Find and retrieve the prior, then queue the jobs that awaited it; returns the fetch state."""
        t0 = time.monotonic()
        timeout = self.priors.timeout_seconds
        state, note, detail = PriorFetchState.FAILED, "", ""
        try:
            query = self.query_for(series_id, modality) if modality else None
            if query is None:
                state, note = PriorFetchState.NO_QUERY, "no usable Modality, Patient ID or Study Date in the instance"
            else:
                candidates = self._exchange(lambda: self.source.find(query, timeout), "find", level="STUDY",
                                            keys=STUDY_FIND_KEYS)
                known = self.catalog.known_study_uids([c.study_uid for c in candidates])
                earlier = self.catalog.prior_fetch(study_id, generation)
                if earlier is not None and earlier.prior_study_uid:  # cut short by a crash: fetch it again
                    known.discard(earlier.prior_study_uid)
                chosen = choose_prior(query, candidates, known)
                if chosen is None:
                    state = PriorFetchState.NOT_FOUND
                    note = f"{len(candidates)} match(es), none earlier and not yet here"
                else:
                    self.catalog.record_prior_fetch(study_id, generation, modality, PriorFetchState.RETRIEVING,
                                                    self.clock(), prior_study_uid=chosen.study_uid)
                    left = max(1.0, timeout - (time.monotonic() - t0))
                    series = self._exchange(lambda: self.source.find_series(chosen.study_uid, modality, left),
                                            "find", level="SERIES", keys=SERIES_FIND_KEYS,
                                            study_uid=chosen.study_uid)
                    if not series:
                        state, note = PriorFetchState.NOT_FOUND, f"no {modality} series in the chosen study"
                    else:
                        left = max(1.0, timeout - (time.monotonic() - t0))
                        got = self._exchange(lambda: self.source.retrieve(chosen.study_uid, series, left),
                                             self.priors.method, study_uid=chosen.study_uid)
                        state = PriorFetchState.RETRIEVED if got.failed == 0 else PriorFetchState.PARTIAL
                        detail = f"prior {ref(chosen.study_uid)}: {got.completed} instance(s) in {len(series)} series"
                        note = f"{got.failed} sub-operation(s) failed" if got.failed else ""
        except RetrieveError as exc:
            note = str(exc)
        except Exception as exc:  # a bug or an unreadable file must not keep the study from routing
            note = f"{type(exc).__name__}"
            log.debug("study #%d: prior fetch traceback", study_id, exc_info=True)
        finally:
            self.catalog.record_prior_fetch(study_id, generation, modality, state, self.clock(), note=note or None)
            released = self.catalog.release_prior_jobs(study_id, generation, self.clock())
            with self._lock:
                self._handed.discard((study_id, generation))
        took = time.monotonic() - t0
        if state in (PriorFetchState.RETRIEVED, PriorFetchState.PARTIAL):
            level = logging.INFO if state == PriorFetchState.RETRIEVED else logging.WARNING
            log.log(level, "study #%d: %s from %s in %.1f s%s", study_id, detail, self.priors.source, took,
                    f" ({note})" if note else "")
        else:
            log.warning("study #%d: no prior from %s (%s: %s); routed without it", study_id, self.priors.source,
                        state, note)
        if not released:
            log.info("study #%d changed while its prior was fetched (late instances); its new jobs follow",
                     study_id)
        return state

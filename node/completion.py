"""Early study completion (issue 15): a study is ready before its quiet period ends when it says it is whole.

The pure core, :func:`early_reason`, decides from a study's facts and the time:

(a) every series of the study announced its size (:func:`series_size`: Images in Acquisition (0020,1002)
    equal on all its instances, or one multi-frame instance) and has exactly that many instances; or
(b) every association that stored into it came from a peer with ``whole_study_per_association``
    (``node.peers``: a PACS or router that sends a study in one association);

and, for both, every association (or STOW-RS request) that stored into it has ended with a normal
release, none is still open, none was aborted, and ``assembly.early_settle_seconds`` have passed since
the last of these events (a second association from the same sender may follow at once). Otherwise
the quiet period decides, as before (:meth:`node.catalog.Catalog.mark_quiet_studies_ready`). A series
without an announced size keeps rule (a) from applying: it cannot be told from a partial one.
InstanceNumber gaps are never used.

:class:`CompletionTracker` gathers the facts in memory from the receiver's hooks (``on_stored``: each
instance stored, ``on_received``: each association or STOW-RS request ended). They are lost when the node
restarts: a study being received then waits for its quiet period. The assembler marks a study ready
early only if the catalog holds exactly the instances this process saw (several receivers sharing a
catalog, or a restart, fall back to the quiet period). Late instances after an early completion re-open
the study as before; the re-opened study waits for its quiet period.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from node.config import Settings
    from node.receive.scp import InstancesReceived, StoredInstance

ANNOUNCED_SIZE = "announced size"
WHOLE_STUDY = "whole study per association"


class Announced(NamedTuple):
    """What one instance says about its series' size."""

    images_in_acquisition: int | None
    """Images in Acquisition (0020,1002); None when absent or not a positive integer."""
    frames: int
    """Number of Frames (1 for a single-frame instance)."""


def announced_by(ds: Dataset) -> Announced:
    """The size facts of one parsed instance; never raises (a bad value counts as absent)."""
    return Announced(_positive_int(ds, "ImagesInAcquisition"), _positive_int(ds, "NumberOfFrames") or 1)


def _positive_int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        number = int(value) if value not in (None, "") else 0
    except Exception:  # a malformed IS value is the sender's problem, not a reason to refuse the instance
        return None
    return number if number > 0 else None


@dataclass(frozen=True)
class SeriesFacts:
    """One series, as this node process received it."""

    received: int
    """Instances received (new ones; duplicates are not counted)."""
    images_in_acquisition: frozenset[int | None]
    """The Images in Acquisition values of its instances (None: an instance without one)."""
    frames: frozenset[int]
    """The Number of Frames values of its instances."""


@dataclass(frozen=True)
class StudyFacts:
    """One study, as this node process received it."""

    series: tuple[SeriesFacts, ...]
    stored: int
    """Instances stored (duplicates too) through any door."""
    ended: int
    """Of those, the ones whose association or STOW-RS request has ended (released or aborted)."""
    aborted: bool
    """An association (or STOW-RS request) that stored into it was aborted."""
    senders: frozenset[tuple[str, str]]
    """(door, source) of each ended association or request: ``("dimse", calling AE)``, ``("stow", who)``."""
    last_event_at: float
    """When the last instance was stored or the last association ended."""


def series_size(series: SeriesFacts) -> int | None:
    """The number of instances the series announced, or None when it announced none reliably."""
    iia = series.images_in_acquisition
    if series.frames != frozenset({1}):  # a multi-frame instance holds the acquisition: alone, it is the series
        return 1 if series.received == 1 and iia <= {None} | series.frames else None
    if len(iia) != 1:  # absent on some instances, or values that differ
        return None
    return next(iter(iia))


def early_reason(facts: StudyFacts, now: float, settle_seconds: float,
                 whole_study_senders: frozenset[str]) -> str | None:
    """Why the study is ready now before its quiet period (:data:`ANNOUNCED_SIZE`, :data:`WHOLE_STUDY`),
    or None: see the module's rules."""
    if facts.aborted or facts.stored == 0 or facts.ended != facts.stored:
        return None  # an association still open, an aborted one, or instances from no association
    if now < facts.last_event_at + settle_seconds:
        return None
    if facts.series and all(series_size(s) == s.received for s in facts.series):
        return ANNOUNCED_SIZE
    if facts.senders and all(door == "dimse" and source in whole_study_senders for door, source in facts.senders):
        return WHOLE_STUDY
    return None


@dataclass
class _Series:
    received: int = 0
    images_in_acquisition: set[int | None] = field(default_factory=set)
    frames: set[int] = field(default_factory=set)


@dataclass
class _Study:
    last_event_at: float
    new: int = 0
    stored: int = 0
    ended: int = 0
    aborted: bool = False
    senders: set[tuple[str, str]] = field(default_factory=set)
    series: dict[str, _Series] = field(default_factory=dict)

    def facts(self) -> StudyFacts:
        return StudyFacts(
            tuple(SeriesFacts(s.received, frozenset(s.images_in_acquisition), frozenset(s.frames))
                  for s in self.series.values()),
            self.stored, self.ended, self.aborted, frozenset(self.senders), self.last_event_at)


class Candidate(NamedTuple):
    """A study :func:`early_reason` finds ready."""

    study_uid: str
    instances: int
    """New instances this process recorded for it: the catalog must hold exactly these."""
    reason: str


class CompletionTracker:
    """The facts of the studies being received, in memory (thread-safe; fed by the receiver's hooks)."""

    def __init__(self, clock: Callable[[], float], settle_seconds: float, whole_study_senders: Iterable[str]) -> None:
        self.clock = clock
        self.settle_seconds = settle_seconds
        self.whole_study_senders = frozenset(s.strip() for s in whole_study_senders)
        self._lock = threading.Lock()
        self._studies: dict[str, _Study] = {}

    @classmethod
    def from_settings(cls, settings: Settings, clock: Callable[[], float]) -> CompletionTracker:
        """``assembly.early_settle_seconds`` and the ``node.peers`` with ``whole_study_per_association``."""
        return cls(clock, settings.assembly.early_settle_seconds,
                   (p.ae_title for p in settings.node.peers if p.whole_study_per_association))

    def stored(self, event: StoredInstance) -> None:
        """``on_stored``: one instance is durable (``event.announced``: its size facts)."""
        now = self.clock()
        with self._lock:
            study = self._studies.setdefault(event.study_uid, _Study(now))
            study.last_event_at, study.stored = now, study.stored + 1
            if not event.new:
                return
            study.new += 1
            series = study.series.setdefault(event.series_uid, _Series())
            series.received += 1
            announced = event.announced or Announced(None, 1)
            series.images_in_acquisition.add(announced.images_in_acquisition)
            series.frames.add(announced.frames)

    def ended(self, event: InstancesReceived) -> None:
        """``on_received``: an association or STOW-RS request ended having stored ``event.studies``."""
        now = self.clock()
        with self._lock:
            for study_uid, by_class in event.studies.items():
                study = self._studies.get(study_uid)
                if study is None:
                    continue  # forgotten (ready or stale): the quiet period decides
                study.last_event_at, study.ended = now, study.ended + sum(by_class.values())
                study.aborted = study.aborted or event.aborted
                study.senders.add((event.door, event.source.strip()))

    def candidates(self, now: float) -> list[Candidate]:
        """The studies ready early at ``now``."""
        with self._lock:
            facts = [(uid, study.new, study.facts()) for uid, study in self._studies.items()]
        out = []
        for uid, new, f in facts:
            reason = early_reason(f, now, self.settle_seconds, self.whole_study_senders)
            if reason is not None:
                out.append(Candidate(uid, new, reason))
        return out

    def forget(self, study_uids: Iterable[str]) -> None:
        """Drop these studies' facts (marked ready: a late instance starts afresh, and waits the quiet period)."""
        with self._lock:
            for uid in study_uids:
                self._studies.pop(uid, None)

    def forget_idle(self, before: float) -> None:
        """Drop the facts of studies with no event since ``before`` (the quiet period has them)."""
        with self._lock:
            for uid in [uid for uid, s in self._studies.items() if s.last_event_at < before]:
                del self._studies[uid]

    def __len__(self) -> int:
        with self._lock:
            return len(self._studies)

"""Which waiting jobs the node sends next (pure; :mod:`node.enqueue` reads the catalog and sends).

Celery's and Redis' priorities are coarse and the embedded file-system broker has none, so the node
orders the work itself: it keeps at most ``queue.in_flight[queue]`` messages sent but not finished per
queue (about the total concurrency of the workers on that queue; workers prefetch one job and ack
late, so a message sent is a job about to start) and fills each free slot with, in this order:

1. the most urgent job (``urgent`` < ``normal`` < ``offpeak``);
2. of the study with the fewest jobs in flight (fair share: a study with 40 series cannot starve the
   others), then the study served least recently;
3. the oldest job.

``offpeak`` jobs are sent inside ``queue.offpeak_window`` (local time, may span midnight) or when their
queue is idle: no urgent or normal job waiting or in flight on it. An urgent job therefore waits at
most for one running job to finish on a worker of its queue.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

PRIORITIES = ("urgent", "normal", "offpeak")
OFFPEAK = "offpeak"
_RANK = {p: i for i, p in enumerate(PRIORITIES)}


def rank(priority: str) -> int:
    """0 for ``urgent`` up to 2 for ``offpeak`` (an unknown value counts as ``normal``)."""
    return _RANK.get(priority, _RANK["normal"])


def most_urgent(a: str, b: str) -> str:
    return a if rank(a) <= rank(b) else b


@dataclass(frozen=True)
class OffpeakWindow:
    """A daily window in local time, in minutes after midnight; ``start == end`` is the whole day."""

    start: int
    end: int

    @classmethod
    def parse(cls, text: str) -> OffpeakWindow:
        """``"22:00-06:00"`` (the settings validate the shape)."""
        a, b = text.split("-")
        return cls(*(int(x[:2]) * 60 + int(x[3:5]) for x in (a, b)))

    def contains(self, now: float) -> bool:
        t = time.localtime(now)
        minute = t.tm_hour * 60 + t.tm_min
        if self.start == self.end:
            return True
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end


class Waiting(NamedTuple):
    """A queued job without a queue message, due now."""

    job_id: int
    model: str
    queue: str
    priority: str
    study_id: int
    created_at: float


class Busy(NamedTuple):
    """A job in flight: sent and not claimed yet, or running."""

    queue: str
    study_id: int
    priority: str


def choose(waiting: Iterable[Waiting], busy: Iterable[Busy], *, capacity: Callable[[str], int],
           offpeak_open: bool, last_served: Mapping[int, float] | None = None) -> list[Waiting]:
    """The jobs to send now, in sending order (see the module's docstring).

    ``capacity(queue)``: messages allowed in flight on the queue; ``offpeak_open``: inside the
    off-peak window; ``last_served``: study id -> when a job of it was last sent (absent: never)."""
    busy = list(busy)
    in_flight = Counter(b.queue for b in busy)
    clinical_busy = {b.queue for b in busy if b.priority != OFFPEAK}
    study_load = Counter(b.study_id for b in busy)
    served = dict(last_served or {})
    by_queue: dict[str, list[Waiting]] = {}
    for w in waiting:
        by_queue.setdefault(w.queue, []).append(w)
    chosen: list[Waiting] = []
    for queue in sorted(by_queue):
        pending = by_queue[queue]
        slots = capacity(queue) - in_flight[queue]
        while slots > 0 and pending:
            best = min(pending, key=lambda j: (rank(j.priority), study_load[j.study_id],
                                               served.get(j.study_id, float("-inf")), j.created_at, j.job_id))
            if best.priority == OFFPEAK and not offpeak_open and queue in clinical_busy:
                break  # outside the window off-peak work waits until the queue is idle
            pending.remove(best)
            chosen.append(best)
            study_load[best.study_id] += 1
            served[best.study_id] = float("inf")  # just served: after every study not served in this pass
            slots -= 1
            if best.priority != OFFPEAK:
                clinical_busy.add(queue)
    return chosen


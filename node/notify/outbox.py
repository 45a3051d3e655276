"""The durable outbox (catalog tables ``notify_events``, ``notify_outbox``, ``notify_marks``): an event is
recorded once by its key together with one outbox row per subscribed target, in one transaction; rows
are retried with backoff until sent or dropped, and survive a restart of the node."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError

from node.catalog import Catalog
from node.notify.events import Event, payload
from node.schema import NotificationEventRow, NotificationMark, NotificationOutbox

PENDING, SENT, DROPPED = "pending", "sent", "dropped"


class Due(NamedTuple):
    """An outbox row due for an attempt, with its event."""

    id: int
    target: str
    attempts: int
    event: str
    payload: dict[str, Any]


class Recorded(NamedTuple):
    """A recorded event."""

    id: int
    event: str
    created_at: float
    payload: dict[str, Any]


class Outbox:
    """Queries of the notifier's tables; each method is one short transaction of the catalog."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def known(self, keys: Iterable[str]) -> set[str]:
        """The keys among ``keys`` already recorded."""
        keys = list(keys)
        found: set[str] = set()
        with self.catalog.reading() as s:
            for i in range(0, len(keys), 500):
                found.update(s.scalars(select(NotificationEventRow.key)
                                       .where(NotificationEventRow.key.in_(keys[i:i + 500]))))
        return found

    def record(self, event: Event, targets: Sequence[str], now: float, node: dict[str, str]) -> int | None:
        """Record ``event`` and an outbox row per target; None (nothing written) when its key is known
        (also when another node process on the same catalog recorded it a moment earlier)."""
        try:
            return self._record(event, targets, now, node)
        except IntegrityError:
            return None

    def _record(self, event: Event, targets: Sequence[str], now: float, node: dict[str, str]) -> int | None:
        with self.catalog.session() as s:
            if s.scalar(select(NotificationEventRow.id).where(NotificationEventRow.key == event.key)) is not None:
                return None
            row = NotificationEventRow(key=event.key, event=event.event, subject=event.subject, payload={},
                                       created_at=now)
            s.add(row)
            s.flush()
            row.payload = payload(event, row.id, now, node)
            for name in targets:
                s.add(NotificationOutbox(event_id=row.id, target=name, next_attempt_at=now))
            return row.id

    def last_episode_event(self, subject: str, events: Sequence[str]) -> Recorded | None:
        """The latest of ``events`` recorded about ``subject``."""
        with self.catalog.reading() as s:
            row = s.scalars(select(NotificationEventRow)
                            .where(NotificationEventRow.subject == subject, NotificationEventRow.event.in_(events))
                            .order_by(NotificationEventRow.id.desc()).limit(1)).first()
            return None if row is None else Recorded(row.id, row.event, row.created_at, dict(row.payload))

    def open_episode(self, subject: str, opened: str, closed: str) -> Recorded | None:
        """The latest ``opened`` event of ``subject`` if no ``closed`` event followed it."""
        last = self.last_episode_event(subject, (opened, closed))
        return last if last is not None and last.event == opened else None

    def due(self, now: float, limit: int = 50) -> list[Due]:
        with self.catalog.reading() as s:
            rows = s.execute(
                select(NotificationOutbox.id, NotificationOutbox.target, NotificationOutbox.attempts,
                       NotificationEventRow.event, NotificationEventRow.payload)
                .join(NotificationEventRow, NotificationEventRow.id == NotificationOutbox.event_id)
                .where(NotificationOutbox.state == PENDING, NotificationOutbox.next_attempt_at <= now)
                .order_by(NotificationOutbox.id).limit(limit)
            ).all()
        return [Due(*row) for row in rows]

    def sent(self, outbox_id: int, now: float) -> None:
        with self.catalog.session() as s:
            s.execute(update(NotificationOutbox).where(NotificationOutbox.id == outbox_id)
                      .values(state=SENT, sent_at=now, attempts=NotificationOutbox.attempts + 1, last_error=None))

    def failed(self, outbox_id: int, error: str, retry_at: Callable[[int], float | None]) -> int:
        """Count a failed attempt; ``retry_at(attempts)`` gives the next attempt's time, None to drop it.
        Returns the attempts so far."""
        with self.catalog.session() as s:
            row = s.get_one(NotificationOutbox, outbox_id)
            row.attempts += 1
            row.last_error = error[:500]
            when = retry_at(row.attempts)
            if when is None:
                row.state = DROPPED
            else:
                row.next_attempt_at = when
            return row.attempts

    def drop(self, outbox_id: int, error: str) -> None:
        with self.catalog.session() as s:
            s.execute(update(NotificationOutbox).where(NotificationOutbox.id == outbox_id)
                      .values(state=DROPPED, last_error=error[:500]))

    def rows(self) -> list[tuple[int, str, str, int, str | None, str]]:
        """(outbox id, target, state, attempts, last error, event key) of every row, oldest first (tests)."""
        with self.catalog.reading() as s:
            return [(o.id, o.target, o.state, o.attempts, o.last_error, e.key) for o, e in s.execute(
                select(NotificationOutbox, NotificationEventRow)
                .join(NotificationEventRow, NotificationEventRow.id == NotificationOutbox.event_id)
                .order_by(NotificationOutbox.id)).all()]

    def events(self) -> list[tuple[str, str]]:
        """(event, key) of every recorded event, oldest first (tests)."""
        with self.catalog.reading() as s:
            return [(e, k) for e, k in s.execute(select(NotificationEventRow.event, NotificationEventRow.key)
                                                 .order_by(NotificationEventRow.id))]

    def prune(self, before: float) -> int:
        """Forget events recorded before ``before`` and their outbox rows, except those still pending
        and the latest event of each episode subject (whether it is open). Returns the events removed."""
        with self.catalog.session() as s:
            latest = (select(func.max(NotificationEventRow.id)).where(NotificationEventRow.subject != "")
                      .group_by(NotificationEventRow.subject))
            pending = select(NotificationOutbox.event_id).where(NotificationOutbox.state == PENDING)
            ids = list(s.scalars(select(NotificationEventRow.id).where(
                NotificationEventRow.created_at < before, NotificationEventRow.id.not_in(latest),
                NotificationEventRow.id.not_in(pending))))
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                s.execute(delete(NotificationOutbox).where(NotificationOutbox.event_id.in_(chunk)))
                s.execute(delete(NotificationEventRow).where(NotificationEventRow.id.in_(chunk)))
            return len(ids)

    def mark(self, name: str) -> float | None:
        with self.catalog.reading() as s:
            row = s.get(NotificationMark, name)
            return None if row is None else row.value

    def set_mark(self, name: str, value: float) -> None:
        with self.catalog.session() as s:
            row = s.get(NotificationMark, name)
            if row is None:
                s.add(NotificationMark(name=name, value=value))
            else:
                row.value = value

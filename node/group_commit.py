"""Group commit: threads that each need one small durable write share one transaction (one fsync).

Leader/follower, no extra thread: the first caller leads and runs the batch of everything submitted so
far (its own item included) in one call; callers arriving meanwhile wait, and when the batch is done the
leader hands the lead to the first of them, whose batch holds all that arrived during the previous
commit. One caller alone (one association) therefore pays nothing but a lock; four associations
storing at once commit their rows together. Every caller returns only after the batch holding its item
has run, so durability is that of the batch function (the catalog: Success after the row is durable).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class _Waiter(Generic[T, R]):
    __slots__ = ("error", "event", "item", "lead", "result")

    def __init__(self, item: T) -> None:
        self.item = item
        self.event = threading.Event()
        self.lead = False
        self.result: R | None = None
        self.error: BaseException | None = None


class GroupCommit(Generic[T, R]):
    """Batches :meth:`submit` calls of concurrent threads into calls of ``run``.

    ``run(items)`` returns one result per item, in order; an exception it raises is raised in every
    caller of the batch (the batch function decides which failures are per item)."""

    def __init__(self, run: Callable[[Sequence[T]], Sequence[R]], *, max_batch: int = 64) -> None:
        self._run = run
        self._max_batch = max_batch
        self._lock = threading.Lock()
        self._pending: list[_Waiter[T, R]] = []
        self._leading = False

    def submit(self, item: T) -> R:
        """Run ``item`` in the next batch; returns its result once that batch has run."""
        me: _Waiter[T, R] = _Waiter(item)
        with self._lock:
            self._pending.append(me)
            lead = not self._leading
            self._leading = True
        if not lead:
            me.event.wait()
            if not me.lead:  # a leader ran it
                return self._outcome(me)
        with self._lock:
            batch, self._pending = self._pending[:self._max_batch], self._pending[self._max_batch:]
        try:
            results = self._run([w.item for w in batch])
            if len(results) != len(batch):
                raise RuntimeError("group commit: the batch function returned a wrong number of results")
            for w, r in zip(batch, results, strict=True):
                w.result = r
        except BaseException as exc:
            for w in batch:
                w.error = exc
        finally:
            with self._lock:
                if self._pending:  # the next leader runs what arrived meanwhile
                    nxt = self._pending[0]
                    nxt.lead = True
                    nxt.event.set()
                else:
                    self._leading = False
            for w in batch:
                if w is not me:
                    w.event.set()
        return self._outcome(me)

    @staticmethod
    def _outcome(w: _Waiter[T, R]) -> R:
        if w.error is not None:
            raise w.error
        return w.result  # type: ignore[return-value]  # set with the batch's results

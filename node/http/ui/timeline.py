"""A study's per-stage timeline: received -> ready -> routed -> queued -> running -> encoded, then
delivered per destination; each stage done (with its time), active, failed, waiting or not applicable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from node.overview import StudyFacts
from node.schema import StudyState

Status = Literal["done", "active", "failed", "todo", "none"]
STAGES = ("received", "ready", "routed", "queued", "running", "encoded")


@dataclass(frozen=True)
class Stage:
    name: str
    status: Status
    at: float | None = None
    """When it happened (None: not yet)."""
    note: str = ""


@dataclass(frozen=True)
class DestinationStage:
    destination: str
    status: Status
    sent: int
    total: int
    failing: int
    paused: bool


def stages(f: StudyFacts) -> list[Stage]:
    """The study's stages up to encoded, from its catalog times (:class:`node.overview.StudyFacts`)."""
    st = f.study
    times = [st.first_received_at, st.ready_at, st.routed_at, f.first_enqueued_at, f.jobs_started_at,
             f.jobs_finished_at]
    failed = f.jobs.get("failed", 0)
    out: list[Stage] = []
    active_given = False
    for i, (name, at) in enumerate(zip(STAGES, times, strict=True)):
        if name == "ready" and st.state == StudyState.RECEIVING:
            at = None  # a late instance reopened the study: its ready time is the previous generation's
        if i >= 3 and st.state == StudyState.UNROUTED:
            out.append(Stage(name, "none", note="no rule matched"))
            continue
        if i >= 3 and st.state == StudyState.PRIOR:
            out.append(Stage(name, "none", note="a prior of another study"))
            continue
        if at is not None:
            bad = name == "encoded" and failed > 0
            out.append(Stage(name, "failed" if bad else "done", at, f"{failed} job(s) failed" if bad else ""))
        elif not active_given:
            out.append(Stage(name, "active"))
            active_given = True
        else:
            out.append(Stage(name, "todo"))
    return out


def destination_stages(counts: dict[str, dict[str, int]], paused: set[str]) -> list[DestinationStage]:
    """One delivered-stage per destination from its deliveries by state (plus ``failing``: pending
    ones whose last attempt failed)."""
    out = []
    for dest in sorted(counts):
        c = counts[dest]
        pending, failing = c.get("pending", 0), c.get("failing", 0)
        sent = c.get("sent", 0) + c.get("not-needed", 0)
        status: Status = "done" if not pending else "failed" if failing else "active"
        out.append(DestinationStage(dest, status, sent, sent + pending, failing, dest in paused))
    return out

"""What a notification says: the event types, who gets them, the JSON payload and its one-line summary.

Payloads are minimal and carry no patient data: catalog ids (study, job, delivery), model name and
version, destination name, error text (the node's own, never tag values), counts, times, and the
dashboard path of the study (``/studies/<id>``). No UIDs, names, IDs, dates of birth or accession
numbers: a receiver that needs more asks the node's API with a token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from node.config_ops import EmailTarget, NotificationEvent, WebhookTarget

RECOVERY_OF: dict[str, NotificationEvent] = {
    "destination-recovered": "destination-down",
    "disk-recovered": "disk-high",
}
"""Follow-up events: a target subscribed to the key's event also gets its recovery."""


@dataclass(frozen=True)
class Event:
    """One fact to announce, found by :mod:`node.notify.detect`; ``key`` makes it announced once."""

    key: str
    """Stable identity, e.g. ``job-failed:12:1733130000.000`` (see :mod:`node.notify.detect`)."""
    event: str
    """A :data:`node.config_ops.NotificationEvent` or a key of :data:`RECOVERY_OF`."""
    facts: dict[str, Any] = field(default_factory=dict)
    """Event-specific fields of the payload (``study``, ``job``, ``destination``, ``disk``...)."""
    subject: str = ""
    """What an episode is about (a destination's name, ``disk``); "" for single facts."""
    model: str | None = None
    """The model of a ``results`` event (targets may list the models they want)."""


def subscribed(target: WebhookTarget | EmailTarget, event: Event) -> bool:
    """Whether ``target`` gets ``event`` (its ``events``; ``models`` filters ``results``)."""
    base = RECOVERY_OF.get(event.event, event.event)
    if base not in target.events:
        return False
    return not (base == "results" and target.models and event.model not in target.models)


def iso(t: float) -> str:
    """UTC time as ISO 8601 with a ``Z`` (seconds)."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def study_ref(study_id: int, dashboard_url: str | None) -> dict[str, Any]:
    """``{"id", "path"[, "url"]}`` of a study: its catalog id and dashboard page."""
    ref: dict[str, Any] = {"id": study_id, "path": f"/studies/{study_id}"}
    if dashboard_url:
        ref["url"] = dashboard_url.rstrip("/") + ref["path"]
    return ref


def summary(event: str, facts: dict[str, Any]) -> str:
    """One line for an e-mail subject and a chat message, e.g. ``job failed: ct-lung on study #12``."""
    study = f"study #{facts['study']['id']}" if "study" in facts else ""
    job = facts.get("job", {})
    dest = facts.get("destination", "")
    disk = facts.get("disk", {})
    if event == "job-failed":
        return f"job failed: {job.get('model')} on {study}"
    if event == "worker-lost" and "worker" in facts:
        w = facts["worker"]
        return f"worker lost: {w.get('host')}:{w.get('pid')} (no heartbeat for {facts.get('silent_seconds')} s)"
    if event == "worker-lost":
        return f"worker lost: {job.get('model')} on {study} (attempt {job.get('attempt')})"
    if event == "results":
        return f"results: {job.get('model')} on {study}"
    if event == "delivery-late":
        return f"delivery late: {study} to {dest} (pending {facts.get('pending_minutes')} min)"
    if event == "destination-down":
        return f"destination down: {dest} (failing since {facts.get('failing_since')})"
    if event == "destination-recovered":
        return f"destination recovered: {dest}"
    if event == "disk-high":
        return f"disk high: {disk.get('used_percent')}% used (high watermark {disk.get('high_watermark_percent')}%)"
    if event == "disk-recovered":
        return f"disk recovered: {disk.get('used_percent')}% used (low watermark {disk.get('low_watermark_percent')}%)"
    if event == "test":
        return f"test notification to {facts.get('target')}"
    return event


def payload(event: Event, event_id: int, created_at: float, node: dict[str, str]) -> dict[str, Any]:
    """The JSON document sent for an event (stored in the catalog, so every retry sends the same)."""
    return {
        "event": event.event,
        "id": event_id,
        "key": event.key,
        "time": iso(created_at),
        "summary": summary(event.event, event.facts),
        "node": node,
        **event.facts,
    }


def text_body(doc: dict[str, Any]) -> str:
    """The plain-text e-mail body: the summary, then the payload's facts as ``key: value`` lines."""
    lines = [str(doc.get("summary", doc.get("event"))), ""]

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, list):
            lines.append(f"{prefix}: {', '.join(str(v) for v in value)}")
        elif value is not None:
            lines.append(f"{prefix}: {value}")

    walk("", {k: v for k, v in doc.items() if k != "summary"})
    return "\n".join(lines) + "\n"

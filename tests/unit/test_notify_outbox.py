"""The notification outbox on a real catalog: backoff between attempts, dropped after max_attempts,
rows that survive a restart (a new Catalog and Notifier on the same storage), settings checks."""

from __future__ import annotations

import hashlib
import hmac
import itertools
from pathlib import Path
from typing import Any

import pytest

from models.errors import ConfigError, NotificationError, UnknownModelError
from node.catalog import Catalog
from node.checks import check_models
from node.config import check_files, parse_settings
from node.notify import Notifier
from node.notify.send import signature
from node.schema import JobState
from tests.unit.test_notify_detect import Clock, Recorder, add_job, make_settings


class Flaky:
    """Fails the first ``fail`` attempts."""

    def __init__(self, fail: int) -> None:
        self.fail = fail
        self.calls: list[tuple[int, float]] = []
        self.clock: Clock | None = None

    def send(self, event: str, outbox_id: int, doc: dict[str, Any]) -> None:
        self.calls.append((outbox_id, self.clock.t if self.clock else 0.0))
        if len(self.calls) <= self.fail:
            raise NotificationError("HTTP 503 from the webhook")


def _failed_job_event(tmp_path: Path, clock: Clock, sender: Any, url: str | None = None,
                      **ns: Any) -> tuple[Notifier, Catalog]:
    catalog = Catalog.for_storage(tmp_path, url)
    notifier = Notifier(make_settings(tmp_path, **ns), catalog, clock, usage=lambda: (1, 0, 1, 0.0),
                        senders={"hook": sender})
    notifier.detect_tick()
    job = add_job(catalog, clock.t)
    catalog.finish_job(job, JobState.FAILED, clock.t, error="x")
    assert notifier.detect_tick() == 1
    return notifier, catalog


def test_retries_with_capped_backoff_then_sent(tmp_path: Path, catalog_url: str | None) -> None:
    clock = Clock()
    sender = Flaky(fail=4)
    sender.clock = clock
    notifier, catalog = _failed_job_event(tmp_path, clock, sender, catalog_url, retry_initial_seconds=10,
                                          retry_max_seconds=40)
    for _ in range(200):
        notifier.send_tick()
        clock.t += 1
    assert [b - a for (_, a), (_, b) in itertools.pairwise(sender.calls)] == [10, 20, 40, 40]
    assert len({i for i, _ in sender.calls}) == 1  # the same outbox row each time
    [(_, target, state, attempts, error, key)] = notifier.outbox.rows()
    assert (target, state, attempts, error) == ("hook", "sent", 5, None) and key.startswith("job-failed:")
    catalog.close()


def test_dropped_after_max_attempts(tmp_path: Path) -> None:
    clock = Clock()
    sender = Flaky(fail=100)
    notifier, _ = _failed_job_event(tmp_path, clock, sender, retry_initial_seconds=1, retry_max_seconds=1,
                                    max_attempts=3)
    for _ in range(10):
        notifier.send_tick()
        clock.t += 2
    assert len(sender.calls) == 3
    [(_, _, state, attempts, error, _)] = notifier.outbox.rows()
    assert (state, attempts, error) == ("dropped", 3, "HTTP 503 from the webhook")


def test_outbox_survives_a_restart(tmp_path: Path, catalog_url: str | None) -> None:
    clock = Clock()
    down = Flaky(fail=100)
    notifier, catalog = _failed_job_event(tmp_path, clock, down, catalog_url)
    notifier.send_tick()
    assert len(down.calls) == 1
    catalog.close()
    # the node restarts: a new catalog object and notifier on the same storage
    clock.t += 3600
    rec = Recorder()
    catalog = Catalog.for_storage(tmp_path, catalog_url)
    again = Notifier(make_settings(tmp_path), catalog, clock, usage=lambda: (1, 0, 1, 0.0), senders={"hook": rec})
    assert again.tick() == 1
    assert again.tick() == 0  # neither detected again nor sent twice
    [(event, outbox_id, doc)] = rec.sent
    assert event == "job-failed" and outbox_id == down.calls[0][0] and doc["job"]["error"] == "x"
    catalog.close()


def test_a_row_for_a_target_no_longer_configured_is_dropped(tmp_path: Path) -> None:
    clock = Clock()
    _, catalog = _failed_job_event(tmp_path, clock, Flaky(fail=100))
    other = Notifier(make_settings(tmp_path, target={"name": "other"}), catalog, clock, senders={"other": Recorder()})
    assert other.send_tick() == 0
    [(_, target, state, _, error, _)] = other.outbox.rows()
    assert (target, state, error) == ("hook", "dropped", "target no longer configured")


def test_signature_is_hmac_sha256_over_timestamp_dot_body() -> None:
    expected = hmac.new(b"k", b'1700000000.{"a":1}', hashlib.sha256).hexdigest()
    assert signature(b"k", "1700000000", b'{"a":1}') == "sha256=" + expected
    assert signature(b"k", "1700000001", b'{"a":1}') != "sha256=" + expected


def _raw(tmp_path: Path, **target: Any) -> dict[str, Any]:
    return {"node": {"storage_dir": str(tmp_path)},
            "notifications": {"targets": [{"name": "hook", "type": "webhook", "url": "https://h.example/x", **target}]}}


def test_secret_files_must_be_private(tmp_path: Path) -> None:
    key = tmp_path / "hook.key"
    key.write_text("s3cret\n")
    key.chmod(0o644)
    settings = parse_settings(_raw(tmp_path, secret_file=str(key)))
    with pytest.raises(ConfigError, match=r"notifications\.targets\[hook\]\.secret_file: .* chmod 600"):
        check_files(settings)
    key.chmod(0o600)
    check_files(settings)
    with pytest.raises(ConfigError, match=r"notifications\.targets\[hook\]\.secret_file: cannot read"):
        check_files(parse_settings(_raw(tmp_path, secret_file=str(tmp_path / "missing"))))
    smtp = {"host": "mail", "from": "node@h.example", "username": "node", "password_file": str(key)}
    key.chmod(0o640)
    with pytest.raises(ConfigError, match=r"notifications\.smtp\.password_file: .* chmod 600"):
        check_files(parse_settings({"node": {"storage_dir": str(tmp_path)}, "notifications": {
            "targets": [{"name": "m", "type": "email", "to": ["a@h.example"]}], "smtp": smtp}}))


def test_target_models_are_checked_against_the_registry(tmp_path: Path) -> None:
    settings = parse_settings(_raw(tmp_path, events=["results"], models=["no-such-model"]))
    with pytest.raises(UnknownModelError, match=r"notifications\.targets\[hook\]\.models: unknown model"):
        check_models(settings, queues=[])


def test_email_targets_need_smtp(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"e-mail targets need notifications\.smtp"):
        parse_settings({"node": {"storage_dir": str(tmp_path)},
                        "notifications": {"targets": [{"name": "m", "type": "email", "to": ["a@b.c"]}]}})


def test_old_events_are_pruned_but_not_pending_ones_nor_open_episodes(tmp_path: Path, catalog_url: str | None) -> None:
    clock = Clock()
    percent = [95.0]
    sender = Flaky(fail=0)
    catalog = Catalog.for_storage(tmp_path, catalog_url)
    settings = make_settings(tmp_path, target={"events": ["job-failed", "disk-high"]})
    notifier = Notifier(settings, catalog, clock, usage=lambda: (100, 95, 5, percent[0]), senders={"hook": sender})
    notifier.detect_tick()
    first = add_job(catalog, clock.t, n=1)
    catalog.finish_job(first, JobState.FAILED, clock.t, error="x")
    clock.t += 1
    assert notifier.tick() == 2  # disk-high, job-failed
    percent[0] = 70.0
    clock.t += 1
    assert notifier.tick() == 1  # disk-recovered
    sender.fail = 10**6  # the receiver goes away
    second = add_job(catalog, clock.t, n=2)
    catalog.finish_job(second, JobState.FAILED, clock.t, error="y")
    clock.t += 1
    assert notifier.tick() == 0
    clock.t += 31 * 86400
    Notifier(settings, catalog, clock, usage=lambda: (100, 70, 30, 70.0), senders={"hook": sender}).tick()
    left = notifier.outbox.events()
    assert [e for e, _ in left] == ["disk-recovered", "job-failed"]
    assert left[1][1] == f"job-failed:{second}:{clock.t - 31 * 86400 - 1:.3f}"  # still pending
    catalog.close()

"""The pure parts of a retrospective batch (node.batch_query): the query language and the throttle."""

from __future__ import annotations

import time

import pytest

from node.batch_query import (
    QueryError,
    estimate_finish,
    format_query,
    identifier,
    modalities,
    next_start,
    parse_query,
    retrieval_due,
    window_opens,
)
from node.dispatch import OffpeakWindow


def test_the_issues_query_becomes_a_study_level_identifier() -> None:
    q = parse_query("Modality=CT StudyDate=20260101-20260131")
    assert q == {"ModalitiesInStudy": "CT", "StudyDate": "20260101-20260131"}
    ds = identifier(q)
    assert ds.QueryRetrieveLevel == "STUDY" and ds.ModalitiesInStudy == "CT"
    assert ds.StudyDate == "20260101-20260131" and ds.StudyInstanceUID == ""  # asked back
    assert modalities(q) == ["CT"]
    assert parse_query(format_query(q)) == q


@pytest.mark.parametrize(("text", "expected"), [
    ("modality=ct", None),  # keywords are case-sensitive: not a keyword
    ("Modality=ct", {"ModalitiesInStudy": "CT"}),  # code strings are upper case
    ("ModalitiesInStudy=CT\\\\MR", {"ModalitiesInStudy": "CT\\MR"}),
    ("StudyDate=-20251231", {"StudyDate": "-20251231"}),
    ("StudyDate=20260101-", {"StudyDate": "20260101-"}),
    ("StudyDate=20260101 StudyTime=0800-1800", {"StudyDate": "20260101", "StudyTime": "0800-1800"}),
    ("StudyDescription='CT CHEST*' StudyID=A1?", {"StudyDescription": "CT CHEST*", "StudyID": "A1?"}),
    ("PatientSex=f", {"PatientSex": "F"}),
    ("StudyInstanceUID=1.2.3\\\\1.2.4", {"StudyInstanceUID": "1.2.3\\1.2.4"}),
])
def test_values_as_c_find_matches_them(text: str, expected: dict[str, str] | None) -> None:
    if expected is None:
        with pytest.raises(QueryError):
            parse_query(text)
    else:
        assert parse_query(text) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("", "at least one"),
    ("Modalty=CT", "unknown DICOM keyword 'Modalty' (did you mean Modality?)"),
    ("SeriesDescription=AX", "SeriesDescription is not a STUDY-level matching key"),
    ("Modality", "'Modality' is not Key=Value"),
    ("=CT", "is not Key=Value"),
    ("Modality=", "ModalitiesInStudy needs a value"),
    ("Modality=CT ModalitiesInStudy=MR", "given twice"),
    ("StudyDate=20261301", "not a date"),
    ("StudyDate=20260131-20260101", "ends before it starts"),
    ("StudyDate=2026", "neither a value nor a range"),
    ("StudyDate=20260101--20260102", "neither a value nor a range"),
    ("StudyTime=25h", "neither a value nor a range"),
    ("Modality=C;T", "not a code string"),
    ("StudyInstanceUID=1.2.x", "not a UID"),
    ("Modality='CT", "does not split"),
    ("StudyDescription=__import__('os')\\\\x", "control characters and \\ are not allowed"),
    ("PatientID=PID-1", "PatientID: patient and visit identifiers are not accepted"),
    ("AccessionNumber=A1", "AccessionNumber: patient and visit identifiers are not accepted"),
    ("PatientName=Doe*", "PatientName: patient and visit identifiers are not accepted"),
])
def test_bad_queries_are_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(QueryError) as err:
        parse_query(text)
    assert message in str(err.value)


def _local(h: int, m: int = 0, s: int = 0, day: int = 10) -> float:
    """Seconds since the epoch of local time 2026-06-<day> h:m:s (the window is local time)."""
    return time.mktime((2026, 6, day, h, m, s, 0, 0, -1))


def test_the_throttle_spreads_retrievals_evenly() -> None:
    t0 = _local(23)
    assert next_start(None, 30) == 0.0 and retrieval_due(t0, None, 30, None)
    assert next_start(t0, 30) == t0 + 120  # 30 an hour: one every 2 minutes
    assert not retrieval_due(t0 + 119.9, t0, 30, None)
    assert retrieval_due(t0 + 120, t0, 30, None)
    # a node that was down for an hour does not catch up in a burst: one now, the next 2 minutes later
    assert retrieval_due(t0 + 3600, t0, 30, None) and not retrieval_due(t0 + 3601, t0 + 3600, 30, None)


def test_the_off_peak_window_holds_retrievals_back() -> None:
    window = OffpeakWindow.parse("22:00-06:00")
    assert retrieval_due(_local(23, 30), None, 30, window)
    assert retrieval_due(_local(5, 59), None, 30, window)
    assert not retrieval_due(_local(6, 0), None, 30, window)
    assert not retrieval_due(_local(12), None, 30, window)
    assert retrieval_due(_local(12), None, 30, None)  # --anytime
    assert window_opens(_local(12, 0, 30), window) == _local(22)
    assert window_opens(_local(21, 59, 59), window) == _local(22)
    assert window_opens(_local(23), window) == _local(23)
    assert window_opens(_local(12), OffpeakWindow.parse("00:00-00:00")) == _local(12)  # the whole day


def test_estimated_finish_follows_the_rate_and_the_window() -> None:
    window = OffpeakWindow.parse("22:00-06:00")
    now = _local(23)
    assert estimate_finish(now, None, 0, 30, window) is None
    assert estimate_finish(now, None, 1, 30, window) == now
    assert estimate_finish(now, now, 3, 30, window) == now + 3 * 120
    # 6 an hour, 7 hours left tonight: 42 tonight, the 43rd at 22:00 the next day
    assert estimate_finish(now, None, 42, 6, window) == _local(5, 50, day=11)
    assert estimate_finish(now, None, 43, 6, window) == _local(22, day=11)
    assert estimate_finish(_local(12), None, 1, 6, window) == _local(22)
    assert estimate_finish(_local(12), None, 2, 6, None) == _local(12, 10)

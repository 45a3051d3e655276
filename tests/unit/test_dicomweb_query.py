"""QIDO-RS query parsing and matching (node.dicomweb.query), without a database or HTTP."""

from __future__ import annotations

import pytest

from models.errors import InputError
from node.dicomweb.query import (
    DEFAULT_LIMIT,
    Level,
    Matcher,
    like_pattern,
    matcher_for,
    parse_query,
    returned_keywords,
)


def _m(keyword: str, value: str) -> Matcher:
    m = matcher_for(keyword, value)
    assert m is not None
    return m


def test_keys_by_keyword_or_tag_and_unknown_ones() -> None:
    q = parse_query(Level.STUDY, [("PatientID", "P1"), ("00080050", "A1")])
    assert [(m.keyword, m.values) for m in q.matchers] == [("PatientID", ("P1",)), ("AccessionNumber", ("A1",))]
    for bad in ("NoSuchKeyword", "99991234", "00100010.00100020"):
        with pytest.raises(InputError):
            parse_query(Level.STUDY, [(bad, "x")])


def test_keys_of_a_deeper_level_or_derived_counts_are_refused() -> None:
    with pytest.raises(InputError, match="SeriesNumber"):
        parse_query(Level.STUDY, [("SeriesNumber", "1")])
    with pytest.raises(InputError, match="NumberOfStudyRelatedInstances"):
        parse_query(Level.STUDY, [("NumberOfStudyRelatedInstances", "3")])
    with pytest.raises(InputError):  # a real attribute the catalog does not hold
        parse_query(Level.INSTANCE, [("ImageComments", "x")])
    q = parse_query(Level.INSTANCE, [("PatientID", "P1"), ("Modality", "CT"), ("InstanceNumber", "3")])
    assert [m.level for m in q.matchers] == [Level.STUDY, Level.SERIES, Level.INSTANCE]


def test_universal_keys_are_dropped_and_a_repeated_key_keeps_the_last() -> None:
    q = parse_query(Level.STUDY, [("PatientID", ""), ("PatientName", "*"), ("StudyID", "1"), ("StudyID", "2")])
    assert [(m.keyword, m.values) for m in q.matchers] == [("StudyID", ("2",))]


def test_includefield_limit_offset_fuzzymatching() -> None:
    q = parse_query(Level.STUDY, [("includefield", "00081030,PatientAge"), ("includefield", "StudyID"),
                                  ("limit", "5"), ("offset", "10"), ("fuzzymatching", "true")])
    assert q.include == {"StudyDescription", "PatientAge", "StudyID"} and not q.include_all
    assert (q.limit, q.offset, q.fuzzy) == (5, 10, True)
    assert parse_query(Level.STUDY, [("includefield", "all")]).include_all
    assert parse_query(Level.STUDY, [("limit", "100000")]).limit == DEFAULT_LIMIT
    for bad in (("limit", "0"), ("limit", "x"), ("offset", "-1"), ("includefield", "Bogus")):
        with pytest.raises(InputError):
            parse_query(Level.STUDY, [bad])


def test_single_value_and_wildcards() -> None:
    assert _m("PatientID", "P1").matches(["P1"]) and not _m("PatientID", "P1").matches(["p1"])
    assert _m("PatientID", "P*").matches(["P123"]) and not _m("PatientID", "P*").matches(["XP1"])
    assert _m("StudyDescription", "CT?CHEST").matches(["CT CHEST"]) and not _m("StudyDescription", "CT?CHEST").matches(
        ["CT  CHEST"])
    assert _m("StudyDescription", "a.b*").matches(["a.b[1]"]) and not _m("StudyDescription", "a.b*").matches(["axb"])
    assert not _m("PatientID", "P1").matches([]) and not _m("PatientID", "*1").matches([""])


def test_person_names_ignore_case() -> None:
    assert _m("PatientName", "doe^john").matches(["DOE^JOHN"])
    assert _m("PatientName", "DOE*").matches(["Doe^Jane"]) and not _m("PatientName", "SMITH*").matches(["Doe^Jane"])
    assert _m("ReferringPhysicianName", "*house*").matches(["HOUSE^GREGORY"])


def test_uid_lists() -> None:
    m = _m("StudyInstanceUID", "1.2.3, 1.2.4\\1.2.5")
    assert m.kind == "list" and m.values == ("1.2.3", "1.2.4", "1.2.5")
    assert m.matches(["1.2.4"]) and not m.matches(["1.2.6"])
    with pytest.raises(InputError):
        matcher_for("SeriesInstanceUID", "1.2.*")


def test_modality_lists_match_any_value_of_a_multi_valued_attribute() -> None:
    m = _m("ModalitiesInStudy", "SEG,MR")
    assert m.matches(["CT", "SEG"]) and not m.matches(["CT", "SR"])
    assert _m("Modality", "CT\\MR").matches(["MR"])


def test_date_ranges() -> None:
    closed, below, above = _m("StudyDate", "20240101-20240131"), _m("StudyDate", "-20240131"), _m(
        "StudyDate", "20240101-")
    assert closed.kind == "range"
    assert [closed.matches([d]) for d in ("20231231", "20240101", "20240115", "20240131", "20240201")] == [
        False, True, True, True, False]
    assert below.matches(["19990101"]) and not below.matches(["20240201"])
    assert above.matches(["20300101"]) and not above.matches(["20231231"])
    assert not closed.matches([]) and _m("StudyDate", "20240115").matches(["20240115"])
    for bad in ("-", "2024-01-01-2024", "abc-def"):
        with pytest.raises(InputError):
            matcher_for("StudyDate", bad)


def test_time_ranges_compare_as_times() -> None:
    m = _m("StudyTime", "0800-1200")
    assert [m.matches([t]) for t in ("075959", "080000", "08", "103000.123", "120059.9", "1201", "130000")] == [
        False, True, True, True, True, False, False]  # "1200" as an upper bound covers the whole minute 12:00
    assert _m("StudyTime", "10:30-").matches(["103000"]) and not _m("StudyTime", "10:30-").matches(["102959"])
    assert _m("SeriesTime", "-080000.5").matches(["080000.4"]) and not _m("SeriesTime", "-080000.5").matches(
        ["080000.6"])


def test_like_pattern_escapes_sql_wildcards() -> None:
    assert like_pattern("A%B_C*D?") == "A\\%B\\_C%D_"


def test_returned_attributes_by_scope() -> None:
    study = returned_keywords(parse_query(Level.STUDY, [("includefield", "BodyPartExamined")]),
                              scoped_to_study=False, scoped_to_series=False)
    assert {"PatientID", "ModalitiesInStudy", "NumberOfStudyRelatedInstances", "RetrieveURL"} <= set(study)
    assert "BodyPartExamined" not in study  # a series attribute is not a study's
    scoped = returned_keywords(parse_query(Level.SERIES, []), scoped_to_study=True, scoped_to_series=False)
    assert "PatientID" not in scoped and {"Modality", "SeriesInstanceUID", "StudyInstanceUID"} <= set(scoped)
    unscoped = returned_keywords(parse_query(Level.INSTANCE, [("SeriesDescription", "x")]),
                                 scoped_to_study=False, scoped_to_series=False)
    assert {"PatientID", "Modality", "SOPInstanceUID", "SeriesDescription"} <= set(unscoped)
    everything = returned_keywords(parse_query(Level.SERIES, [("includefield", "all")]),
                                   scoped_to_study=True, scoped_to_series=False)
    assert {"PatientBirthDate", "SeriesTime"} <= set(everything) and "Rows" not in everything

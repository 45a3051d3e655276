"""QIDO-RS query parameters (PS3.18 8.3.4) and attribute matching (PS3.4 C.2.2.2), without SQL.

:func:`parse_query` turns the query string of a search into a :class:`Query` (or raises
:class:`models.errors.InputError`, answered 400); :meth:`Matcher.matches` tests the values of one
attribute; :func:`returned_keywords` says which attributes a result carries. The SQL side
(:mod:`node.dicomweb.search`) pushes what it can into the database and asks this module for the rest.

Matching: an empty value or ``*`` matches everything; a UID attribute takes a list (``,`` or ``\\``
separated); a date, time or date-time a range (``20240101-20240131``, ``-20240131``, ``20240101-``);
``*`` and ``?`` are wildcards; a Modality (and ModalitiesInStudy) may list several codes; person
names match case-insensitively on their Alphabetic group. An attribute with no value in the catalog
matches only a universal key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from models.errors import InputError
from node.dicomweb.attributes import INSTANCE_KEYWORDS, SERIES_KEYWORDS, STUDY_KEYWORDS


class Level(StrEnum):
    STUDY = "study"
    SERIES = "series"
    INSTANCE = "instance"


DEPTH = {Level.STUDY: 0, Level.SERIES: 1, Level.INSTANCE: 2}

STUDY_DERIVED = ("ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances")
SERIES_DERIVED = ("NumberOfSeriesRelatedInstances",)
COMPUTED = ("RetrieveURL", "InstanceAvailability")
"""Returned at every level, never matched."""

LEVEL_OF: dict[str, Level] = {
    **{kw: Level.STUDY for kw in (*STUDY_KEYWORDS, "StudyInstanceUID", *STUDY_DERIVED)},
    **{kw: Level.SERIES for kw in (*SERIES_KEYWORDS, "SeriesInstanceUID", *SERIES_DERIVED)},
    **{kw: Level.INSTANCE for kw in (*INSTANCE_KEYWORDS, "SOPInstanceUID", "SOPClassUID")},
}
"""Every attribute the catalog can return, and the level it belongs to."""

NOT_MATCHABLE = frozenset((*STUDY_DERIVED[1:], *SERIES_DERIVED))

DEFAULTS: dict[Level, tuple[str, ...]] = {
    Level.STUDY: ("StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy", "ReferringPhysicianName",
                  "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
                  "StudyDescription", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"),
    Level.SERIES: ("Modality", "SeriesDescription", "SeriesInstanceUID", "SeriesNumber", "BodyPartExamined",
                   "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
                   "NumberOfSeriesRelatedInstances"),
    Level.INSTANCE: ("SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns", "BitsAllocated",
                     "NumberOfFrames"),
}
"""Returned without includefield (PS3.18 Table 6.7.1-2 to 2b, as far as the catalog holds them)."""

DEFAULT_LIMIT = 1000
"""Results per response when the client gives no ``limit`` (and the most it may ask for)."""

_RANGE_WIDTH = {"DA": 8, "TM": 12, "DT": 20}
"""Digits a date, time (HHMMSS + 6 fraction digits) or date-time is padded to for range comparison."""
_LIST_VRS = ("UI",)
_MULTI_CODE = ("Modality", "ModalitiesInStudy")


def tag_of(keyword: str) -> str:
    """The 8-hex-digit tag of a dictionary keyword (DICOM JSON key)."""
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return f"{tag:08X}"


def keyword_of(name: str) -> str:
    """A query key (keyword, or tag as 8 hex digits) as a keyword; InputError if it is neither."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        kw = keyword_for_tag(int(name, 16))
        if kw:
            return kw
        raise InputError(f"unknown attribute tag {name}")
    if tag_for_keyword(name) is not None:
        return name
    raise InputError(f"unknown attribute {name!r}")


def _digits(value: str, vr: str, fill: str) -> str:
    """A DA/TM/DT value as digits only, padded to a fixed width with ``fill`` (0 low, 9 high)."""
    text = value.split("+")[0] if vr == "DT" else value
    digits = re.sub(r"[^0-9]", "", text)
    width = _RANGE_WIDTH[vr]
    if vr == "TM" and "." in text:  # HHMMSS.ffffff: pad the integer part before the fraction
        whole, _, frac = text.replace(":", "").partition(".")
        digits = re.sub(r"[^0-9]", "", whole).ljust(6, "0") + re.sub(r"[^0-9]", "", frac)
    return digits[:width].ljust(width, fill)


@dataclass(frozen=True)
class Matcher:
    """One attribute's matching key."""

    keyword: str
    vr: str
    kind: Literal["list", "single", "wildcard", "range"]
    values: tuple[str, ...] = ()
    """``list``/``single``: the values any one of which must equal the attribute's (a PN: ignoring case)."""
    low: str = ""
    high: str = ""
    """``range``: inclusive bounds as given ("" = open)."""
    pattern: str = ""
    """``wildcard``: the key with ``*`` and ``?``."""

    @property
    def tag(self) -> str:
        return tag_of(self.keyword)

    @property
    def level(self) -> Level:
        return LEVEL_OF[self.keyword]

    def matches(self, values: list[str]) -> bool:
        """Whether an attribute with ``values`` (any one of several) matches."""
        values = [v for v in values if v != ""]
        if not values:
            return False
        fold = self.vr == "PN"
        if fold:
            values = [v.casefold() for v in values]
        if self.kind in ("list", "single"):
            wanted = {v.casefold() for v in self.values} if fold else set(self.values)
            return any(v in wanted for v in values)
        if self.kind == "wildcard":
            rx = wildcard_regex(self.pattern.casefold() if fold else self.pattern)
            return any(rx.fullmatch(v) for v in values)
        return any(self.in_range(v) for v in values)

    def in_range(self, value: str) -> bool:
        if self.low and _digits(value, self.vr, "0") < _digits(self.low, self.vr, "0"):
            return False
        return not (self.high and _digits(value, self.vr, "0") > _digits(self.high, self.vr, "9"))


def wildcard_regex(pattern: str) -> re.Pattern[str]:
    """``*`` any run of characters, ``?`` one character, everything else literal."""
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern), re.DOTALL)


def like_pattern(pattern: str) -> str:
    """A DICOM wildcard key as an SQL LIKE pattern with ``\\`` as the escape character."""
    out = []
    for c in pattern:
        if c in "%_\\":
            out.append("\\" + c)
        else:
            out.append("%" if c == "*" else "_" if c == "?" else c)
    return "".join(out)


def matcher_for(keyword: str, value: str) -> Matcher | None:
    """The matcher of one query key, or None for a universal key (empty, ``*``)."""
    value = value.strip()
    if value in ("", "*"):
        return None
    vr = str(dictionary_VR(keyword))
    if vr in _LIST_VRS:
        if any(c in value for c in "*?"):
            raise InputError(f"{keyword}: wildcards are not allowed in a UID")
        return Matcher(keyword, vr, "list", values=tuple(v.strip() for v in re.split(r"[,\\]", value) if v.strip()))
    if vr in _RANGE_WIDTH and "-" in value:
        low, _, high = value.partition("-")
        if not (low or high) or not re.fullmatch(r"[0-9:.+]*", low + high):
            raise InputError(f"{keyword}: invalid range")
        return Matcher(keyword, vr, "range", low=low.strip(), high=high.strip())
    if any(c in value for c in "*?"):
        return Matcher(keyword, vr, "wildcard", pattern=value)
    if keyword in _MULTI_CODE:
        return Matcher(keyword, vr, "list", values=tuple(v.strip() for v in re.split(r"[,\\]", value) if v.strip()))
    return Matcher(keyword, vr, "single", values=(value,))


@dataclass
class Query:
    """A parsed QIDO-RS search at one level."""

    level: Level
    matchers: list[Matcher] = field(default_factory=list)
    include: set[str] = field(default_factory=set)
    include_all: bool = False
    limit: int = DEFAULT_LIMIT
    offset: int = 0
    fuzzy: bool = False
    """``fuzzymatching=true`` was asked: accepted and ignored (literal matching; see the Warning header)."""

    def matcher(self, keyword: str) -> Matcher | None:
        return next((m for m in self.matchers if m.keyword == keyword), None)


def _int_param(name: str, value: str, minimum: int) -> int:
    try:
        n = int(value)
    except ValueError:
        raise InputError(f"{name} must be an integer") from None
    if n < minimum:
        raise InputError(f"{name} must be at least {minimum}")
    return n


def parse_query(level: Level, items: list[tuple[str, str]]) -> Query:
    """The query of a search at ``level`` from its (name, value) pairs (repeated names allowed)."""
    q = Query(level)
    for name, value in items:
        if name == "limit":
            q.limit = min(_int_param(name, value, 1), DEFAULT_LIMIT)
        elif name == "offset":
            q.offset = _int_param(name, value, 0)
        elif name == "fuzzymatching":
            q.fuzzy = value.strip().lower() == "true"
        elif name == "includefield":
            for part in (p.strip() for p in value.split(",")):
                if part.lower() == "all":
                    q.include_all = True
                elif part:
                    q.include.add(keyword_of(part))  # unknown -> 400; known but not held: never present
        else:
            keyword = keyword_of(name)
            where = LEVEL_OF.get(keyword)
            if where is None or keyword in NOT_MATCHABLE or DEPTH[where] > DEPTH[level]:
                raise InputError(f"matching on {keyword} is not supported in a {level} search")
            m = matcher_for(keyword, value)
            if m is not None:
                q.matchers = [x for x in q.matchers if x.keyword != keyword] + [m]
    return q


def returned_keywords(query: Query, *, scoped_to_study: bool, scoped_to_series: bool) -> list[str]:
    """The attributes a result of ``query`` carries: the level's defaults (and those of the study and
    series when the search is not scoped to one), the matched keys, includefield (``all``: every
    attribute held at the levels returned), plus the UIDs that locate it."""
    levels = [lv for lv in Level if DEPTH[lv] <= DEPTH[query.level]]
    shown = [lv for lv in levels if lv == query.level
             or (lv == Level.STUDY and not scoped_to_study) or (lv == Level.SERIES and not scoped_to_series)]
    out = [kw for lv in shown for kw in DEFAULTS[lv]]
    out += [m.keyword for m in query.matchers]
    if query.include_all:
        out += [kw for kw, lv in LEVEL_OF.items() if lv in levels]
    out += [kw for kw in query.include if LEVEL_OF.get(kw) in levels]
    out += {Level.STUDY: ["StudyInstanceUID"], Level.SERIES: ["StudyInstanceUID", "SeriesInstanceUID"],
            Level.INSTANCE: ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"]}[query.level]
    return list(dict.fromkeys([*out, *COMPUTED]))

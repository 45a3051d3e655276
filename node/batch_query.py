"""The pure parts of a retrospective batch (:mod:`node.batch`): its query language and its throttle.

Query: ``Key=Value`` pairs separated by spaces (shell quoting for values with spaces), ``Key`` a DICOM
keyword that is a STUDY-level matching key of the Study Root C-FIND (``Modality`` stands for
``ModalitiesInStudy``), ``Value`` as C-FIND matches it: dates and times single or as ranges
(``20260101-20260131``, ``-20251231``, ``20260101-``), several code values separated by ``\\``,
``*``/``?`` wildcards in text keys. Patient and visit identifiers (Patient ID, name, birth date,
accession number) are refused: the query is stored with the batch and shown by the API and the CLI.
Nothing is evaluated; anything else is refused with the reason.

Throttle: at most ``rate`` retrievals an hour, one every ``3600 / rate`` seconds (evenly spread, never
a burst after a pause), and only inside the off-peak window unless the batch runs at any time.
"""

from __future__ import annotations

import datetime as dt
import difflib
import re
import shlex
import time

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from node.dispatch import OffpeakWindow

STUDY_KEYS: dict[str, str] = {
    "StudyDate": "DA", "StudyTime": "TM", "ModalitiesInStudy": "CS", "StudyDescription": "LO", "StudyID": "SH",
    "StudyInstanceUID": "UI", "PatientSex": "CS",
}
"""The STUDY-level matching keys a batch query may use, and their value representations."""
IDENTIFYING = ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "AccessionNumber",
               "ReferringPhysicianName", "OtherPatientIDsSequence")
"""Matching keys refused: the query is stored with the batch and shown by the API and the CLI."""
ALIASES = {"Modality": "ModalitiesInStudy"}
RETURN_KEYS = ("StudyInstanceUID", "StudyDate", "ModalitiesInStudy")
"""Asked back from every match (the study is retrieved by its UID)."""
MAX_LENGTH = 1024
_DATE = r"\d{8}"
_TIME = r"\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?"
_TEXT = re.compile(r"[^\\\x00-\x1f\x7f]+")


class QueryError(ValueError):
    """A batch query that is not valid (the message says why)."""


def _date(text: str, key: str) -> str:
    try:
        dt.datetime.strptime(text, "%Y%m%d")
    except ValueError:
        raise QueryError(f"{key}: {text!r} is not a date (YYYYMMDD)") from None
    return text


def _range(value: str, key: str, single: str, check: bool) -> str:
    """A single value or a ``first-last`` range (either end may be open) of dates or times."""
    m = re.fullmatch(rf"({single})?(-)?({single})?", value)
    if m is None or not (m.group(1) or m.group(3)) or (m.group(3) and not m.group(2)):
        kind = "YYYYMMDD" if check else "HHMMSS"
        raise QueryError(f"{key}: {value!r} is neither a value nor a range ({kind}, {kind}-{kind}, -{kind}, {kind}-)")
    first, last = m.group(1), m.group(3)
    if check:
        for d in (first, last):
            if d:
                _date(d, key)
    if first and last and first > last:
        raise QueryError(f"{key}: the range {value!r} ends before it starts")
    return value


def _value(key: str, vr: str, value: str) -> str:
    if not value:
        raise QueryError(f"{key} needs a value ({key}=...)")
    if vr == "DA":
        value = _range(value, key, _DATE, check=True)
    elif vr == "TM":
        value = _range(value, key, _TIME, check=False)
    elif vr == "CS":
        value = value.upper()
        for v in value.split("\\"):
            if re.fullmatch(r"[A-Z0-9_ ]{1,16}", v) is None:
                raise QueryError(f"{key}: {v!r} is not a code string (letters, digits, _; several separated by \\)")
    elif vr == "UI":
        for v in value.split("\\"):
            if re.fullmatch(r"[0-9]+(\.[0-9]+)*", v) is None or len(v) > 64:
                raise QueryError(f"{key}: {v!r} is not a UID (digits and dots; several separated by \\)")
        return value
    elif _TEXT.fullmatch(value) is None:
        raise QueryError(f"{key}: control characters and \\ are not allowed")
    if len(value) > MAX_LENGTH:
        raise QueryError(f"{key}: value longer than {MAX_LENGTH} characters")
    return value


def _keyword(key: str) -> str:
    key = ALIASES.get(key, key)
    if key in STUDY_KEYS:
        return key
    if key in IDENTIFYING:
        raise QueryError(f"{key}: patient and visit identifiers are not accepted (the query is stored and shown "
                         "with the batch)")
    if tag_for_keyword(key) is None:
        close = difflib.get_close_matches(key, [*STUDY_KEYS, *ALIASES], n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise QueryError(f"unknown DICOM keyword {key!r}{hint}")
    raise QueryError(f"{key} is not a STUDY-level matching key; use one of: {', '.join(['Modality', *STUDY_KEYS])}")


def parse_query(text: str) -> dict[str, str]:
    """``'Modality=CT StudyDate=20260101-20260131'`` -> ``{"ModalitiesInStudy": "CT", "StudyDate": "..."}``;
    raise :class:`QueryError`."""
    try:
        tokens = shlex.split(text)
    except ValueError as exc:
        raise QueryError(f"the query does not split into Key=Value pairs: {exc}") from None
    if not tokens:
        raise QueryError("the query needs at least one Key=Value pair (e.g. Modality=CT StudyDate=20260101-20260131)")
    query: dict[str, str] = {}
    for token in tokens:
        key, eq, value = token.partition("=")
        if not eq or not key:
            raise QueryError(f"{token!r} is not Key=Value")
        keyword = _keyword(key.strip())
        if keyword in query:
            raise QueryError(f"{keyword} is given twice")
        query[keyword] = _value(keyword, STUDY_KEYS[keyword], value.strip())
    return query


def format_query(query: dict[str, str]) -> str:
    """The query as it is typed (shell-quoted where needed)."""
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in query.items())


def identifier(query: dict[str, str]) -> Dataset:
    """The STUDY-level C-FIND identifier: the matching keys, and :data:`RETURN_KEYS` asked back."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for key in (*query, *RETURN_KEYS):
        setattr(ds, key, query.get(key, ""))
    return ds


def modalities(query: dict[str, str]) -> list[str]:
    """The modalities the query asks for (retrieved series and jobs are limited to them); [] for any."""
    value = query.get("ModalitiesInStudy", "")
    return [m for m in value.split("\\") if m]


# ---- the throttle ---------------------------------------------------------------------------------
def interval(rate_per_hour: float) -> float:
    """Seconds between two retrievals."""
    return 3600.0 / rate_per_hour


def next_start(last_started: float | None, rate_per_hour: float) -> float:
    """When the next retrieval may start by the rate alone (0: at once)."""
    return 0.0 if last_started is None else last_started + interval(rate_per_hour)


def window_opens(t: float, window: OffpeakWindow | None) -> float:
    """``t`` if retrievals may run then, else when ``window`` next opens (local time; None: always open)."""
    if window is None or window.contains(t):
        return t
    lt = time.localtime(t)
    wait = ((window.start - (lt.tm_hour * 60 + lt.tm_min)) % 1440) * 60 - lt.tm_sec
    t = float(int(t) + wait)
    for _ in range(180):  # a daylight-saving change moved it: walk on, a minute at a time
        if window.contains(t):
            break
        t += 60
    return t


def retrieval_due(now: float, last_started: float | None, rate_per_hour: float, window: OffpeakWindow | None) -> bool:
    """Whether a retrieval may start at ``now``."""
    return now >= next_start(last_started, rate_per_hour) and window_opens(now, window) == now


def estimate_finish(now: float, last_started: float | None, remaining: int, rate_per_hour: float,
                    window: OffpeakWindow | None) -> float | None:
    """When the last of ``remaining`` retrievals would start at this rate and window (None: none left)."""
    if remaining <= 0:
        return None
    t = window_opens(max(now, next_start(last_started, rate_per_hour)), window)
    step = interval(rate_per_hour)
    for _ in range(remaining - 1):
        t = window_opens(t + step, window)
    return t

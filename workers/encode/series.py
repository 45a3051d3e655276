"""Series Number and Series Description of every result object: one convention, one place.

A radiologist finds AI results by description (``AI <WHAT> <model>``) and, in viewers that sort by
number, after the acquired series (9xx). The number depends on the object kind only, so results of
several models on one study sit next to each other by kind; the description names the model. UIDs
are not decided here (see :mod:`workers.encode.uids`).
"""

from __future__ import annotations

from dataclasses import dataclass

_LO_MAX = 64  # Series Description is LO


@dataclass(frozen=True)
class SeriesConvention:
    number: int
    label: str


SERIES: dict[str, SeriesConvention] = {
    "SEG": SeriesConvention(900, "SEG"),
    "SR": SeriesConvention(901, "SR"),
    "REGISTERED-PRIOR": SeriesConvention(902, "REGISTERED PRIOR"),
    "SC": SeriesConvention(903, "KEY IMAGES"),
    "PDF": SeriesConvention(904, "PDF REPORT"),
    "SRO": SeriesConvention(905, "REGISTRATION"),
}
"""Result kind -> Series Number and the word(s) after ``AI`` in the Series Description."""


def series_number(kind: str) -> int:
    """Series Number of result ``kind`` (a key of :data:`SERIES`)."""
    return _convention(kind).number


def series_description(kind: str, model_name: str) -> str:
    """``AI <LABEL> <model name>``, cut to 64 characters."""
    return f"AI {_convention(kind).label} {model_name}"[:_LO_MAX]


def _convention(kind: str) -> SeriesConvention:
    try:
        return SERIES[kind]
    except KeyError:
        raise ValueError(f"no series convention for result kind {kind!r}; known: {sorted(SERIES)}") from None

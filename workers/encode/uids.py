"""Deterministic DICOM UIDs for AI results.

A rerun of the same model version on the same source series yields the same Series and SOP
Instance UIDs, so the PACS replaces the earlier object instead of storing a duplicate.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

_SEPARATOR = "|"  # cannot occur in a UID; parts containing it are rejected so the join is injective
_ROOT = "2.25."


def derive_uid(*parts: str) -> str:
    """Return a ``2.25.<int>`` UID from the first 128 bits of SHA-256 over ``parts``.

    The result is deterministic, at most 64 characters (2.25. + up to 39 digits) and has no
    leading zero in its last component.
    """
    if not parts:
        raise ValueError("derive_uid needs at least one part")
    for part in parts:
        if not isinstance(part, str):
            raise TypeError(f"UID parts must be str, got {type(part).__name__}")
        if _SEPARATOR in part:
            raise ValueError(f"UID parts must not contain {_SEPARATOR!r}: {part!r}")
    digest = hashlib.sha256(_SEPARATOR.join(parts).encode("utf-8", "surrogatepass")).digest()
    # A decimal int has no leading zero; 2**128 has 39 digits, so the UID is <= 44 characters.
    return _ROOT + str(int.from_bytes(digest[:16], "big"))


@dataclass(frozen=True)
class ResultUIDs:
    """Series and SOP Instance UID of one output object."""

    series_uid: str
    sop_instance_uid: str


def input_fingerprint(source_sop_instance_uids: Iterable[str]) -> str:
    """A digest of the set of source instances (order-independent)."""
    h = hashlib.sha256()
    for uid in sorted(source_sop_instance_uids):
        h.update(uid.encode("ascii") + b"|")
    return h.hexdigest()


def result_uids(
    source_series_uid: str, model_name: str, model_version: str, kind: str, input_fingerprint: str = ""
) -> ResultUIDs:
    """UIDs for the output object ``kind`` (``"SEG"``, ``"SR"``...) of a model run on a series.

    The series UID depends on the source series, model name, version and kind only, so every run
    lands in one result series. The instance UID also depends on ``input_fingerprint`` (the set of
    source instances): a resend or a rerun on the same input gives the same UID (the PACS keeps one
    copy), while a rerun after late instances gives a new instance that supersedes the old one.
    """
    if not source_series_uid:
        raise ValueError("source_series_uid must not be empty")
    base = (source_series_uid, model_name, model_version, kind)
    return ResultUIDs(
        series_uid=derive_uid("series", *base),
        sop_instance_uid=derive_uid("instance", *base, *((input_fingerprint,) if input_fingerprint else ())),
    )


def device_uid(manufacturer: str, model_name: str, model_version: str) -> str:
    """UID of a model version as a device: SR Device Observer UID and SEG/SR Device Serial Number."""
    return derive_uid("device", manufacturer, model_name, model_version)


def segment_tracking_uid(source_series_uid: str, model_name: str, segment_name: str) -> str:
    """Tracking UID of a segment: the same for reruns and for every version of the same model."""
    return derive_uid("tracking", source_series_uid, model_name, segment_name)

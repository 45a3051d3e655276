"""Deterministic UID derivation."""

from __future__ import annotations

import hashlib
import random

import pytest
from pydicom.uid import UID

from workers.encode.uids import (
    ResultUIDs,
    derive_uid,
    device_uid,
    input_fingerprint,
    result_uids,
    segment_tracking_uid,
)

SERIES = "1.2.826.0.1.3680043.8.498.86989210041925935015265338592351062013"


def _valid(uid: str) -> bool:
    components = uid.split(".")
    return (
        len(uid) <= 64
        and UID(uid).is_valid
        and all(c.isdigit() and (c == "0" or not c.startswith("0")) for c in components)
    )


def test_known_answer() -> None:
    """The algorithm is part of the contract: 2.25 + int of SHA-256("a|b")[:16]."""
    expected = "2.25." + str(int.from_bytes(hashlib.sha256(b"a|b").digest()[:16], "big"))
    assert derive_uid("a", "b") == expected


def test_deterministic_and_valid() -> None:
    uid = derive_uid(SERIES, "model", "1.0", "SEG")
    assert uid == derive_uid(SERIES, "model", "1.0", "SEG")
    assert uid.startswith("2.25.")
    assert _valid(uid)


def test_always_valid() -> None:
    rng = random.Random(1234)
    alphabet = "".join(chr(c) for c in range(1, 0x800) if chr(c) != "|") + "\ud800"  # incl. a lone surrogate
    for _ in range(2000):
        parts = ["".join(rng.choices(alphabet, k=rng.randint(0, 40))) for _ in range(rng.randint(1, 5))]
        assert _valid(derive_uid(*parts)), parts
    assert _valid(derive_uid(""))


def test_parts_are_not_concatenated() -> None:
    assert derive_uid("ab", "c") != derive_uid("a", "bc")
    assert derive_uid("a") != derive_uid("a", "")


def test_rejects_separator_and_bad_input() -> None:
    with pytest.raises(ValueError, match="must not contain"):
        derive_uid("a|b")
    with pytest.raises(ValueError):
        derive_uid()
    with pytest.raises(TypeError):
        derive_uid("a", 1)  # type: ignore[arg-type]


def test_result_uids_same_inputs_same_uids() -> None:
    first = result_uids(SERIES, "lungs", "1.0.0", "SEG")
    assert isinstance(first, ResultUIDs)
    assert first == result_uids(SERIES, "lungs", "1.0.0", "SEG")
    assert first.series_uid != first.sop_instance_uid
    assert _valid(first.series_uid) and _valid(first.sop_instance_uid)


@pytest.mark.parametrize(
    "other",
    [
        ("1.2.3", "lungs", "1.0.0", "SEG"),  # another source series
        (SERIES, "liver", "1.0.0", "SEG"),  # another model
        (SERIES, "lungs", "1.0.1", "SEG"),  # another model version
        (SERIES, "lungs", "1.0.0", "SR"),  # another object kind
    ],
)
def test_result_uids_differ(other: tuple[str, str, str, str]) -> None:
    base = result_uids(SERIES, "lungs", "1.0.0", "SEG")
    changed = result_uids(*other)
    assert changed.series_uid != base.series_uid
    assert changed.sop_instance_uid != base.sop_instance_uid


def test_result_uids_needs_series() -> None:
    with pytest.raises(ValueError):
        result_uids("", "lungs", "1.0.0", "SEG")


def test_tracking_uid_ignores_model_version_device_uid_does_not() -> None:
    assert segment_tracking_uid(SERIES, "lungs", "Body") == segment_tracking_uid(SERIES, "lungs", "Body")
    assert segment_tracking_uid(SERIES, "lungs", "Body") != segment_tracking_uid(SERIES, "lungs", "Left lung")
    assert device_uid("node", "lungs", "1") != device_uid("node", "lungs", "2")


def test_instance_uid_follows_the_input_set_series_uid_does_not() -> None:
    a = result_uids(SERIES, "lungs", "1.0.0", "SEG", input_fingerprint(["1.2.3", "1.2.4"]))
    same = result_uids(SERIES, "lungs", "1.0.0", "SEG", input_fingerprint(["1.2.4", "1.2.3"]))
    late = result_uids(SERIES, "lungs", "1.0.0", "SEG", input_fingerprint(["1.2.3", "1.2.4", "1.2.5"]))
    assert a == same  # order of the sources does not matter: a rerun replaces
    assert late.series_uid == a.series_uid and late.sop_instance_uid != a.sop_instance_uid  # supersedes

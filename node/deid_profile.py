"""PS3.15 Table E.1-1 (Basic Application Level Confidentiality Profile) as data, for node/deid.py.

The table itself comes from ``dicom-anonymizer`` (Kitware), which tracks each DICOM release; its
actions are not used (random UIDs in a module-global dictionary, dates set to 00010101, no
descent into sequences): node/deid.py applies the table with keyed pseudonyms and date shifts.

Compound actions are resolved to one action, the one that keeps an object valid whatever the
attribute's type in its IOD: X/Z and X/Z/D -> Z (empty), X/D and Z/D -> D (dummy, shifted date or
pseudonym), X/Z/U* -> U (keep the sequence, replace the UIDs in it). A sequence whose compound
action allows X is removed (:data:`MAY_REMOVE`): most are Type 3, where an empty sequence is invalid.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from types import MappingProxyType

from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector

TABLE_VERSION = "dicomfields_2026c"
"""The dicom-anonymizer table used: PS3.15 of DICOM 2026c."""


class Action(Enum):
    """What the basic profile does with an attribute."""

    REMOVE = "X"
    EMPTY = "Z"
    DUMMY = "D"
    UID = "U"


_CATEGORIES: tuple[tuple[str, Action], ...] = (
    # In dicom-anonymizer's order: a tag listed twice gets the later category's action.
    ("D_TAGS", Action.DUMMY),
    ("Z_TAGS", Action.EMPTY),
    ("X_TAGS", Action.REMOVE),
    ("U_TAGS", Action.UID),
    ("Z_D_TAGS", Action.DUMMY),
    ("X_Z_TAGS", Action.EMPTY),
    ("X_D_TAGS", Action.DUMMY),
    ("X_Z_D_TAGS", Action.EMPTY),
    ("X_Z_U_STAR_TAGS", Action.UID),
)

MaskedTag = tuple[int, int, int, int]
"""(group, element, group mask, element mask): a repeating group such as overlays (60xx,3000)."""


_REMOVABLE_CATEGORIES = ("X_Z_TAGS", "X_D_TAGS", "X_Z_D_TAGS")


def _load() -> tuple[Mapping[int, Action], tuple[tuple[MaskedTag, Action], ...]]:
    table = dicom_anonymization_database_selector(TABLE_VERSION)
    exact: dict[int, Action] = {}
    masked: dict[MaskedTag, Action] = {}
    for category, action in _CATEGORIES:
        for entry in table[category]:
            if len(entry) == 2:
                exact[(entry[0] << 16) | entry[1]] = action
            else:
                group, element, group_mask, element_mask = entry
                masked[(group, element, group_mask, element_mask)] = action
    return MappingProxyType(exact), tuple(masked.items())


EXACT_ACTIONS, MASKED_ACTIONS = _load()
"""Tag (as int) -> action; and the repeating-group entries, matched under their masks."""
MAY_REMOVE = frozenset((g << 16) | e for category in _REMOVABLE_CATEGORIES
                       for g, e in dicom_anonymization_database_selector(TABLE_VERSION)[category])
"""Tags whose compound action includes X (X/Z, X/D, X/Z/D)."""


def action_for(tag: int) -> Action | None:
    """The profile's action for ``tag``; None when the profile keeps the attribute."""
    action = EXACT_ACTIONS.get(tag)
    if action is not None:
        return action
    group, element = tag >> 16, tag & 0xFFFF
    for (g, e, g_mask, e_mask), masked_action in MASKED_ACTIONS:
        if group & g_mask == g & g_mask and element & e_mask == e & e_mask:
            return masked_action
    return None

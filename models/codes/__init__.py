"""Coded concepts (SNOMED CT) for anatomical structure names: what a site model's labels default to.

The table is ``totalsegmentator_snomed_mapping.csv``, copied unchanged from the TotalSegmentator
PyPI package 2.18.0 (``totalsegmentator/resources/totalsegmentator_snomed_mapping.csv``, sha256
68c6b972...8540869), Copyright Jakob Wasserthal, Apache License 2.0 (``LICENSE-totalsegmentator``
next to it). It maps 170 structure names (``spleen``, ``kidney_left``, ``vertebrae_L1``...) to a
Segmented Property Category, Type and optional Type Modifier (laterality). See ``README.md``.

Lookups are by normalised name: case, spaces and hyphens do not matter (``"Kidney Left"`` ->
``kidney_left``). Importing this module reads no file; the table is read once on first use.

Findings (what a detection model reports: ``nodule``, ``mass``, ``lesion``) are not structures and
not in that table: :data:`FINDINGS` codes them (SNOMED CT, category "Morphologically Abnormal
Structure", as the built-in nodule models use); the table wins on a name in both.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType

from models.base import Code

__all__ = ["FINDINGS", "TABLE", "CodedStructure", "lookup", "normalise", "table"]

TABLE = Path(__file__).resolve().parent / "totalsegmentator_snomed_mapping.csv"
_PREFIX = "SegmentedProperty"


@dataclass(frozen=True)
class CodedStructure:
    """One row of the table: the structure's category, type and optional laterality modifier."""

    name: str
    category: Code
    type: Code
    laterality: Code | None = None


def normalise(name: str) -> str:
    """``"Kidney Left"`` / ``"kidney-left"`` -> ``"kidney_left"`` (the table's spelling)."""
    return re.sub(r"[\s\-]+", "_", name.strip()).lower()


def _code(row: Mapping[str, str], sequence: str) -> Code | None:
    value = row.get(f"{sequence}.CodeValue", "").strip()
    if not value:
        return None
    return Code(value, row[f"{sequence}.CodingSchemeDesignator"].strip(), row[f"{sequence}.CodeMeaning"].strip())


@lru_cache(maxsize=1)
def table() -> Mapping[str, CodedStructure]:
    """The whole table by normalised structure name (read once)."""
    found: dict[str, CodedStructure] = {}
    with TABLE.open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            category = _code(row, f"{_PREFIX}CategoryCodeSequence")
            kind = _code(row, f"{_PREFIX}TypeCodeSequence")
            if category is None or kind is None:
                continue
            modifier = _code(row, f"{_PREFIX}TypeModifierCodeSequence")
            laterality = modifier if modifier is not None and modifier.meaning in ("Left", "Right") else None
            name = row["Structure"].strip()
            found[normalise(name)] = CodedStructure(name, category, kind, laterality)
    return MappingProxyType(found)


_ABNORMAL = Code("49755003", "SCT", "Morphologically Abnormal Structure")

#: Finding names a detection model's labels may use (SNOMED CT), by normalised name.
FINDINGS: Mapping[str, CodedStructure] = MappingProxyType({
    "nodule": CodedStructure("nodule", _ABNORMAL, Code("27925004", "SCT", "Nodule")),
    "lung_nodule": CodedStructure("lung_nodule", _ABNORMAL, Code("27925004", "SCT", "Nodule")),
    "mass": CodedStructure("mass", _ABNORMAL, Code("4147007", "SCT", "Mass")),
    "lesion": CodedStructure("lesion", _ABNORMAL, Code("52988006", "SCT", "Lesion")),
})


def lookup(name: str) -> CodedStructure | None:
    """The coded structure (or finding, :data:`FINDINGS`) for ``name``; None when neither knows it."""
    key = normalise(name)
    return table().get(key) or FINDINGS.get(key)

"""``ct-emphysema``: LAA-950 and a severity grade on chest CT (no weights)."""

from models.ct_emphysema.model import (
    GRADES,
    MANIFEST_PATH,
    AirwayParams,
    CtEmphysema,
    EmphysemaParams,
    find_airways,
    grade,
)

__all__ = ["GRADES", "MANIFEST_PATH", "AirwayParams", "CtEmphysema", "EmphysemaParams", "find_airways", "grade"]

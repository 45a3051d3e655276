"""The view of a projection radiograph (View Position, PA or AP) as a coded evaluation of each
classification, so the SR says on which projection a figure such as the cardiothoracic ratio was
measured (on AP and supine films the heart is magnified)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from pydicom.dataset import Dataset

from models.base import Code, ModelResult

IMAGE_VIEW = Code("111031", "DCM", "Image View")
VIEWS: dict[str, Code] = {
    "PA": Code("272479007", "SCT", "postero-anterior"),  # CID 4010
    "AP": Code("399348003", "SCT", "antero-posterior"),  # CID 4010
}
"""View Position (0018,5101) -> its code; other views are not stated."""


def with_view_position(result: ModelResult, sources: Sequence[Dataset]) -> ModelResult:
    """``result`` with (Image View, PA|AP) added to each classification when the one source is a
    CR/DX image with that View Position; unchanged otherwise."""
    if len(sources) != 1 or str(sources[0].get("Modality", "")).upper() not in ("CR", "DX"):
        return result
    view = VIEWS.get(str(sources[0].get("ViewPosition", "") or "").strip().upper())
    if view is None or not result.classifications:
        return result
    classifications = tuple(
        c if any(concept == IMAGE_VIEW for concept, _ in c.evaluations)
        else replace(c, evaluations=(*c.evaluations, (IMAGE_VIEW, view)))
        for c in result.classifications
    )
    return replace(result, classifications=classifications)

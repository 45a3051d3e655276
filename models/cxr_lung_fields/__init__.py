"""``cxr-lung-fields``: lung fields and the cardiothoracic ratio on a frontal chest radiograph (no weights)."""

from models.cxr_lung_fields.model import (
    CARDIOMEGALY,
    MANIFEST_PATH,
    CxrLungFields,
    CxrParams,
    ThoraxMeasures,
    measure_thorax,
)

__all__ = ["CARDIOMEGALY", "MANIFEST_PATH", "CxrLungFields", "CxrParams", "ThoraxMeasures", "measure_thorax"]

"""``ct-hu-segmentation``: body, lungs and bone on CT from Hounsfield thresholds (no weights)."""

from models.ct_hu_segmentation.bone import BoneParams
from models.ct_hu_segmentation.model import MANIFEST_PATH, CtHuSegmentation, HuSegParams

__all__ = ["MANIFEST_PATH", "BoneParams", "CtHuSegmentation", "HuSegParams"]

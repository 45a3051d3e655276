"""``dl-ct-segmentation``: body, lungs and bone on CT from a small MONAI 3-D U-Net (imports torch)."""

from models.dl_ct_segmentation.model import OUT_BODY, OUT_BONE, OUT_LEFT, OUT_RIGHT, DlCtSegmentation, SegParams

__all__ = ["OUT_BODY", "OUT_BONE", "OUT_LEFT", "OUT_RIGHT", "DlCtSegmentation", "SegParams"]

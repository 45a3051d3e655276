"""``mr-brain-segmentation``: head and brain masks with volumes on T1/T2 MR of the head (no weights)."""

from models.mr_brain_segmentation.model import MANIFEST_PATH, MrBrainParams, MrBrainSegmentation, segment_head

__all__ = ["MANIFEST_PATH", "MrBrainParams", "MrBrainSegmentation", "segment_head"]

"""``dl-lung-nodule-detection``: lung nodule candidates from a centre-heatmap U-Net (imports torch)."""

from models.dl_lung_nodule_detection.model import DetParams, DlNoduleDetection, decode_peaks

__all__ = ["DetParams", "DlNoduleDetection", "decode_peaks"]

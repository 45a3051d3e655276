"""``dl-emphysema-classification``: emphysema grade from a lung-masked CT with a 3-D CNN (imports torch)."""

from models.dl_emphysema_classification.model import ClsParams, DlEmphysemaClassification, classifier_input

__all__ = ["ClsParams", "DlEmphysemaClassification", "classifier_input"]

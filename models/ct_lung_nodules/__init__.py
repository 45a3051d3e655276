"""``ct-lung-nodules``: solid lung nodule candidates on CT from a multi-scale blob detector (no weights)."""

from models.ct_lung_nodules.model import MANIFEST_PATH, Candidate, CtLungNodules, NoduleParams, detect_nodules

__all__ = ["MANIFEST_PATH", "Candidate", "CtLungNodules", "NoduleParams", "detect_nodules"]

"""``dl-ct-registration``: learned rigid registration of a prior CT onto the current one (imports torch)."""

from models.dl_ct_registration.model import DlCtRegistration, RegParams, grid_affine, resample_to, rigid_from_params

__all__ = ["DlCtRegistration", "RegParams", "grid_affine", "resample_to", "rigid_from_params"]

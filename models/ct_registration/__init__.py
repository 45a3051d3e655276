"""``ct-registration``: rigid then affine registration of a prior series onto the current one (no weights)."""

from models.ct_registration.model import (
    MANIFEST_PATH,
    CtRegistration,
    RegistrationParams,
    register,
    to_sitk,
    transform_to_matrix,
)

__all__ = ["MANIFEST_PATH", "CtRegistration", "RegistrationParams", "register", "to_sitk", "transform_to_matrix"]

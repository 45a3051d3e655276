"""The explicit list of models this node can run.

``REGISTRY`` maps a model name to a factory that imports the model lazily and builds an
instance. Each model ships ``models/<package>/manifest.yaml`` (the package is the name with
``-`` replaced by ``_``); :func:`manifest` reads it without importing the model code. Nothing
is cached here: the worker keeps the instances it builds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import MappingProxyType

from models.base import Manifest, Model
from models.manifest import MANIFEST_FILENAME, load_manifest

MODELS_DIR = Path(__file__).resolve().parent


class UnknownModelError(KeyError, ValueError):
    """A model name that is not in :data:`REGISTRY`; the message lists the known models."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "unknown model"


def _ct_hu_segmentation() -> Model:
    from models.ct_hu_segmentation import CtHuSegmentation

    return CtHuSegmentation()


def _ct_lung_nodules() -> Model:
    from models.ct_lung_nodules import CtLungNodules

    return CtLungNodules()


def _ct_emphysema() -> Model:
    from models.ct_emphysema import CtEmphysema

    return CtEmphysema()


def _ct_registration() -> Model:
    # A PairModel (models.base.is_pair_model): its run() refuses a single series.
    from models.ct_registration import CtRegistration

    return CtRegistration()


# --- Deep-learning models (torch + MONAI, imported only when a factory runs) ------------------
# Demo weights ship as MONAI-style bundles in models/dl_<name>/ (trained on phantoms by
# tools/train_demo_models.py); the classes in models.dl.* also take a site's bundle directory or
# TorchScript file, device, batch size and precision.


def _dl_ct_segmentation() -> Model:
    from models.dl.segmentation import DlCtSegmentation

    return DlCtSegmentation()


def _dl_lung_nodule_detection() -> Model:
    from models.dl.detection import DlNoduleDetection

    return DlNoduleDetection()


def _dl_emphysema_classification() -> Model:
    from models.dl.classification import DlEmphysemaClassification

    return DlEmphysemaClassification()


def _dl_ct_registration() -> Model:
    # A PairModel (models.base.is_pair_model): its run() refuses a single series.
    from models.dl.registration import DlCtRegistration

    return DlCtRegistration()


_DL_MODELS: dict[str, Callable[[], Model]] = {
    "dl-ct-segmentation": _dl_ct_segmentation,
    "dl-lung-nodule-detection": _dl_lung_nodule_detection,
    "dl-emphysema-classification": _dl_emphysema_classification,
    "dl-ct-registration": _dl_ct_registration,
}
# --- end of deep-learning models ----------------------------------------------------------------


REGISTRY: Mapping[str, Callable[[], Model]] = MappingProxyType(
    {
        "ct-hu-segmentation": _ct_hu_segmentation,
        "ct-lung-nodules": _ct_lung_nodules,
        "ct-emphysema": _ct_emphysema,
        "ct-registration": _ct_registration,
        **_DL_MODELS,
    }
)


def available() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(REGISTRY)


def _unknown(names: Iterable[str]) -> UnknownModelError:
    listed = ", ".join(repr(n) for n in names)
    return UnknownModelError(f"unknown model(s) {listed}; known models: {', '.join(available()) or '(none)'}")


def validate_names(names: Iterable[str]) -> None:
    """Raise :class:`UnknownModelError` if any of ``names`` is not registered."""
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise _unknown(unknown)


def manifest_path(name: str) -> Path:
    """Where the manifest of model ``name`` lives."""
    validate_names([name])
    return MODELS_DIR / name.replace("-", "_") / MANIFEST_FILENAME


def manifest(name: str) -> Manifest:
    """The manifest of model ``name``, read from its YAML without importing the model."""
    m = load_manifest(manifest_path(name))
    if m.name != name:
        raise ValueError(f"{manifest_path(name)}: manifest name {m.name!r} differs from registry name {name!r}")
    return m


def load(name: str) -> Model:
    """Build a new instance of model ``name`` (the caller keeps it; nothing is cached)."""
    validate_names([name])
    model = REGISTRY[name]()
    if model.manifest.name != name:
        raise ValueError(f"model registered as {name!r} reports manifest name {model.manifest.name!r}")
    return model

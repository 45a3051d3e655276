"""The explicit list of models this node can run, and the per-model options a site may set.

``REGISTRY`` maps a model name to a factory that imports the model lazily and builds an
instance from :class:`ModelOptions`. Each model ships ``models/<package>/manifest.yaml`` (the
package is the name with ``-`` replaced by ``_``); :func:`manifest` reads it without importing
the model code. Nothing is cached here: the worker keeps the instances it builds. Importing this
module (as the node process does) never imports torch; only building a deep-learning model does.

Options (:class:`ModelOptions`, from ``models.<name>`` in the node configuration):

* deep-learning models (``dl-*``) honour all of them: ``path`` (a MONAI bundle directory or a
  TorchScript file; None = the demo weights shipped in ``models/dl_<name>/``), ``device``,
  ``batch_size`` and ``precision``. Only the configured path is read (a bundle is code):
  nothing is searched for or downloaded, and a path that does not exist fails the load with
  the path in the message.
* classical models have no weights and run on the CPU with numpy/SciPy/SimpleITK: ``path``,
  ``device: cuda`` and ``precision: amp`` cannot be honoured and are refused by
  :func:`check_options` (called by :func:`load`) with a :class:`ModelOptionsError`;
  ``device: auto|cpu`` and ``batch_size`` are accepted and ignored (they have nothing to batch).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal, get_args

from models.base import Manifest, Model
from models.manifest import MANIFEST_FILENAME, load_manifest

MODELS_DIR = Path(__file__).resolve().parent
log = logging.getLogger("models.registry")

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["fp32", "amp"]


class UnknownModelError(KeyError, ValueError):
    """A model name that is not in :data:`REGISTRY`; the message lists the known models."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "unknown model"


class ModelOptionsError(ValueError):
    """Options a model cannot honour, or a configured path that does not exist (the message says which)."""


@dataclass(frozen=True)
class ModelOptions:
    """A site's settings for one model (the worker builds them from ``node.config.ModelSettings``).

    Attributes:
        path: bundle directory or TorchScript file of a deep-learning model; None = shipped weights.
        device: ``auto`` (cuda when the worker sees a GPU, else cpu), ``cpu`` or ``cuda``.
        batch_size: windows per forward pass of a deep-learning model; None = the model's default.
        precision: ``fp32``, or ``amp`` (autocast: float16 on CUDA, bfloat16 on CPU).
    """

    path: Path | None = None
    device: Device = "auto"
    batch_size: int | None = None
    precision: Precision = "fp32"

    def __post_init__(self) -> None:
        if self.device not in get_args(Device):
            raise ModelOptionsError(f"device must be one of {', '.join(get_args(Device))}, got {self.device!r}")
        if self.precision not in get_args(Precision):
            raise ModelOptionsError(f"precision must be fp32 or amp, got {self.precision!r}")
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or self.batch_size < 1):
            raise ModelOptionsError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.path is not None and not isinstance(self.path, Path):
            object.__setattr__(self, "path", Path(self.path))


DEFAULT_OPTIONS = ModelOptions()


def _ct_hu_segmentation(_: ModelOptions) -> Model:
    from models.ct_hu_segmentation import CtHuSegmentation

    return CtHuSegmentation()


def _ct_lung_nodules(_: ModelOptions) -> Model:
    from models.ct_lung_nodules import CtLungNodules

    return CtLungNodules()


def _ct_emphysema(_: ModelOptions) -> Model:
    from models.ct_emphysema import CtEmphysema

    return CtEmphysema()


def _ct_registration(_: ModelOptions) -> Model:
    # A PairModel (models.base.is_pair_model): its run() refuses a single series.
    from models.ct_registration import CtRegistration

    return CtRegistration()


_CLASSICAL: dict[str, Callable[[ModelOptions], Model]] = {
    "ct-hu-segmentation": _ct_hu_segmentation,
    "ct-lung-nodules": _ct_lung_nodules,
    "ct-emphysema": _ct_emphysema,
    "ct-registration": _ct_registration,
}


# --- Deep-learning models (torch + MONAI, imported only when a factory runs) ------------------
# Demo weights ship as MONAI-style bundles in models/dl_<name>/ (trained on phantoms by
# tools/train_demo_models.py); the classes in models.dl.* also take a site's bundle directory or
# TorchScript file, device, batch size and precision (ModelOptions).


def _device(options: ModelOptions) -> str | None:
    return None if options.device == "auto" else options.device


def _dl_ct_segmentation(options: ModelOptions) -> Model:
    from models.dl.segmentation import DlCtSegmentation

    return DlCtSegmentation(
        options.path, device=_device(options), batch_size=options.batch_size or 4, precision=options.precision
    )


def _dl_lung_nodule_detection(options: ModelOptions) -> Model:
    from models.dl.detection import DlNoduleDetection

    return DlNoduleDetection(
        options.path, device=_device(options), batch_size=options.batch_size or 4, precision=options.precision
    )


def _dl_emphysema_classification(options: ModelOptions) -> Model:
    # Its lung masks come from the shipped dl-ct-segmentation bundle (the one it was trained
    # with), on the same device, batch size and precision.
    from models.dl.classification import DlEmphysemaClassification

    return DlEmphysemaClassification(
        options.path, device=_device(options), batch_size=options.batch_size or 4, precision=options.precision
    )


def _dl_ct_registration(options: ModelOptions) -> Model:
    # A PairModel (models.base.is_pair_model): its run() refuses a single series.
    from models.dl.registration import DlCtRegistration

    return DlCtRegistration(
        options.path, device=_device(options), batch_size=options.batch_size or 1, precision=options.precision
    )


_DL_MODELS: dict[str, Callable[[ModelOptions], Model]] = {
    "dl-ct-segmentation": _dl_ct_segmentation,
    "dl-lung-nodule-detection": _dl_lung_nodule_detection,
    "dl-emphysema-classification": _dl_emphysema_classification,
    "dl-ct-registration": _dl_ct_registration,
}
# --- end of deep-learning models ----------------------------------------------------------------


REGISTRY: Mapping[str, Callable[[ModelOptions], Model]] = MappingProxyType({**_CLASSICAL, **_DL_MODELS})


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


def is_deep_learning(name: str) -> bool:
    """True for the deep-learning models (torch + MONAI), which honour every :class:`ModelOptions` field."""
    validate_names([name])
    return name in _DL_MODELS


def check_options(name: str, options: ModelOptions) -> None:
    """Raise :class:`ModelOptionsError` if model ``name`` can never honour ``options``.

    Static checks only (no file access, no torch import: cheap enough for the node's start-up,
    where the workers' paths and GPUs may not exist): a classical model refuses a ``path``,
    ``device: cuda`` and ``precision: amp``. :func:`load` also checks that a configured path
    exists; the model checks that CUDA is available when asked for.
    """
    validate_names([name])
    if name in _DL_MODELS:
        return
    refused = [
        what
        for what, bad in (
            (f"path ({options.path})", options.path is not None),
            ("device: cuda", options.device == "cuda"),
            ("precision: amp", options.precision == "amp"),
        )
        if bad
    ]
    if refused:
        raise ModelOptionsError(
            f"models.{name}: {name} is a classical model (no weights, CPU only) and cannot honour "
            f"{', '.join(refused)}; remove them (device auto/cpu and batch_size are accepted and ignored)"
        )


def load(name: str, options: ModelOptions | None = None) -> Model:
    """Build a new instance of model ``name`` with ``options`` (the caller keeps it; nothing is cached).

    Raises :class:`UnknownModelError`; :class:`ModelOptionsError` for options the model cannot
    honour (:func:`check_options`) or a configured path that does not exist; the model's own
    ``ValueError`` when its weights cannot be loaded (``models.dl.bundle.BundleError``, naming
    the file) or CUDA is asked for and not available.
    """
    opts = options or DEFAULT_OPTIONS
    check_options(name, opts)
    if opts.path is not None and not opts.path.exists():
        raise ModelOptionsError(
            f"models.{name}.path: {opts.path} does not exist (a bundle directory or TorchScript file is expected)"
        )
    t0 = time.perf_counter()
    model = REGISTRY[name](opts)
    if model.manifest.name != name:
        raise ValueError(f"model registered as {name!r} reports manifest name {model.manifest.name!r}")
    if name in _DL_MODELS:
        note = getattr(model, "note", None)
        log.info(
            "model %s %s loaded in %.1f s from %s (%s, batch size %s)",
            name,
            model.manifest.version,
            time.perf_counter() - t0,
            opts.path if opts.path is not None else "the shipped demo bundle",
            note() if callable(note) else "",
            getattr(model, "batch_size", "-"),
        )
    return model

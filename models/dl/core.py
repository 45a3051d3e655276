"""What the four deep-learning models share: manifest, bundle loading, device, precision, checks."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypedDict, TypeVar, cast

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from models.base import Manifest, Volume, check_input
from models.dl.bundle import BundleError, LoadedNetwork, load_network
from models.dl.runtime import Precision, autocast, pick_device
from models.errors import ModelOptionsError
from models.manifest import MANIFEST_FILENAME, ManifestFile, load_manifest_file

if TYPE_CHECKING:
    from models.bundle import BundleConfig

MODELS_DIR = Path(__file__).resolve().parents[1]


class Params(BaseModel):
    """Base of each model's ``dicom_node`` bundle parameters (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


P = TypeVar("P", bound=Params)


class DlOptions(TypedDict, total=False):
    """The keyword options of :class:`DlModel` (for subclasses that add their own, via ``Unpack``)."""

    device: str | torch.device | None
    batch_size: int | None
    precision: Precision


def bundle_dir(package: str) -> Path:
    """The shipped bundle of a model: ``models/<package>/`` (it also holds the manifest)."""
    return MODELS_DIR / package


class DlModel(Generic[P]):
    """Loads the manifest, the network and its ``PARAMS`` once; subclasses implement ``run``.

    Args:
        bundle: bundle directory or TorchScript file (default: the shipped demo bundle next to the
            manifest). Only this explicit path is read.
        device: ``"cuda"``, ``"cpu"``... (default: ``cuda`` if available, else ``cpu``).
        batch_size: windows per forward pass in sliding-window inference (and similar batching)
            (default: the model's ``BATCH_SIZE``).
        precision: ``"fp32"`` or ``"amp"`` (autocast: float16 on CUDA, bfloat16 on CPU).

    The bundle's ``dicom_node`` parameters are parsed as ``PARAMS`` into ``self.params``
    (:class:`BundleError` if they do not fit); then :meth:`setup` runs.
    """

    PACKAGE: ClassVar[str]
    PARAMS: ClassVar[type[Params]]
    BATCH_SIZE: ClassVar[int] = 4

    def __init__(
        self,
        bundle: str | Path | None = None,
        *,
        device: str | torch.device | None = None,
        batch_size: int | None = None,
        precision: Precision = "fp32",
    ) -> None:
        if batch_size is None:
            batch_size = self.BATCH_SIZE
        if batch_size < 1:
            raise ModelOptionsError("batch_size must be >= 1")
        if precision not in ("fp32", "amp"):
            raise ModelOptionsError(f"precision must be 'fp32' or 'amp', got {precision!r}")
        default = bundle_dir(self.PACKAGE)
        self.spec: ManifestFile = load_manifest_file(default / MANIFEST_FILENAME)
        self.manifest: Manifest = self.spec.to_manifest()
        self.device = pick_device(device)
        self.batch_size = batch_size
        self.precision: Precision = precision
        source = default if bundle is None else Path(bundle)
        self.bundle_root: Path | None = source if source.is_dir() else None
        self.loaded: LoadedNetwork = load_network(source, self.device)
        self.network = self.loaded.network
        self.params: P = self.parse_params()
        self.setup()

    def setup(self) -> None:
        """The model's own checks of its manifest and parameters, and its warm-up (default: none).

        Runs at the end of ``__init__``, once ``params`` are parsed.
        """

    def parse_params(self) -> P:
        """The bundle's ``dicom_node`` parameters as ``PARAMS`` (:class:`BundleError` if they do not fit)."""
        try:
            return cast(P, self.PARAMS.model_validate(dict(self.loaded.params)))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
            raise BundleError(f"{self.loaded.source}: bad 'dicom_node' parameters: {problems}") from None

    def bundle_config(self) -> BundleConfig | None:
        """The bundle's config read by the safe resolver (:mod:`models.bundle`); None for a TorchScript file."""
        if self.bundle_root is None:
            return None
        from models.bundle import BundleConfig, BundleConfigError

        try:
            return BundleConfig.read(self.bundle_root, overrides={"device": self.device})
        except BundleConfigError as exc:
            raise BundleConfigError(f"{self.bundle_root}: {exc}") from None

    def expect_output(self, inputs: torch.Tensor, channels: int) -> None:
        """Run the network on ``inputs`` and check it gives ``channels`` output channels (warms it up)."""
        with torch.no_grad(), self.autocast():
            out = self.network(inputs.to(self.device))
        if not isinstance(out, torch.Tensor) or out.ndim < 2 or out.shape[1] != channels:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise BundleError(f"{self.loaded.source}: network output {shape} does not have {channels} channels")

    def autocast(self) -> Any:
        return autocast(self.device, self.precision)

    def note(self) -> str:
        return f"{self.loaded.describe()} on {self.device.type}, {self.precision}"

    def check(self, volume: Volume) -> None:
        """Raise :class:`UnsuitableInput` unless ``volume`` has an accepted modality, enough slices
        and a usable geometry (any orientation: the networks see it in canonical orientation)."""
        check_input(self.manifest, volume)

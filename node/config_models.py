"""Settings of the ``models:`` section: options of a built-in model, or the definition of a site model.

An entry keyed by a built-in model's name tunes it (``path``, ``device``, ``batch_size``,
``precision``, ``queue``). An entry with ``bundle:`` or ``torchscript:`` DEFINES a new model (a
*site model*) run from the site's own MONAI bundle or TorchScript file::

    models:
      spleen-ct:
        family: segmentation
        bundle: /opt/models/spleen_ct_segmentation     # configs/inference.json + metadata.json, models/model.pt
        modality: CT
        labels:                                         # optional: default = the bundle's channel_def
          1: {name: spleen}                             # codes from models/codes (SNOMED CT) ...
          # 2: {name: lesion, category: {value: "49755003", scheme: SCT, meaning: Morphologically Altered Structure},
          #     type: {value: "52988006", scheme: SCT, meaning: Lesion}}   # ... or given here
        queue: gpu

Only the shapes are checked here; :func:`node.checks.check_models` resolves the labels against the
bundle's ``metadata.json`` and the code table (:mod:`models.site`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, StringConstraints, model_validator

from node.config_ops import Frozen

_NonEmpty = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
_Modality = Annotated[str, StringConstraints(pattern=r"^[A-Z]{2,4}$")]


class CodeSettings(Frozen):
    """A coded concept: ``{value: "78961009", scheme: SCT, meaning: Spleen}``."""

    value: _NonEmpty
    scheme: _NonEmpty
    meaning: _NonEmpty


class LabelSettings(Frozen):
    """One output label of a site model (keyed by its channel index in the bundle's output)."""

    name: _NonEmpty
    category: CodeSettings | None = None
    """Segmented Property Category; None = from the code table (``models/codes``) by ``name``."""
    type: CodeSettings | None = None
    """Segmented Property Type; None = from the code table by ``name``."""
    laterality: CodeSettings | None = None


class ModelSettings(Frozen):
    """Per-model options (``models:`` section, keyed by model name); with ``bundle`` or ``torchscript``
    the entry defines a site model."""

    path: Path | None = None
    """A site's MONAI bundle directory or TorchScript file for a built-in ``dl-*`` model (only this
    path is loaded: bundles are code). None = the weights shipped with the model."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = cuda when a GPU is visible to the worker, else cpu."""
    batch_size: int = Field(4, ge=1, le=256)
    precision: Literal["fp32", "amp"] = "fp32"
    queue: str = Field("cpu", pattern=r"^[a-z0-9_-]{1,32}$")
    """Celery queue its jobs go to: run GPU models on ``gpu`` workers (concurrency 1 per GPU)."""
    time_limit_seconds: int | None = Field(None, ge=1, le=86400)
    """A job of this model running longer is stopped with the error "time limit of N s exceeded" (and
    retried up to ``queue.job_max_attempts``); None: ``queue.job_time_limit_seconds``."""

    # ---- a site model's definition ----
    family: Literal["segmentation", "detection"] | None = None
    """What the model produces (``segmentation``: one SEG segment per label; ``detection``: findings in a
    TID 1500 SR, from a bundle with a RetinaNet ``detector``; labels are its class indices from 0)."""
    bundle: Path | None = None
    """A MONAI bundle directory (``configs/inference.json|yaml``, ``configs/metadata.json``,
    ``models/model.pt``): run unchanged through the safe resolver (no code is executed)."""
    torchscript: Path | None = None
    """A TorchScript file: compiled code from its author, run as it is (a site's own choice)."""
    modality: _Modality | None = None
    modalities: list[_Modality] | None = None
    labels: dict[int, LabelSettings] | None = None
    """Output channel index -> label; None = the bundle's ``metadata.json`` channel_def (no background)."""
    description: _NonEmpty | None = None
    version: Annotated[str, StringConstraints(pattern=r"^\d+\.\d+\.\d+([.+-][0-9A-Za-z.+-]+)?$")] | None = None
    """None = the bundle's ``metadata.json`` version."""
    objects: list[Literal["SEG", "SR", "SC", "PDF"]] | None = None
    """Result objects; None = SEG and SR (detection: SR, SC and PDF)."""
    min_slices: int = Field(1, ge=1)

    @property
    def defines_model(self) -> bool:
        """True when this entry defines a site model (it has ``bundle`` or ``torchscript``)."""
        return self.bundle is not None or self.torchscript is not None

    @property
    def site_modalities(self) -> tuple[str, ...]:
        return tuple(self.modalities or ([self.modality] if self.modality else []))

    @model_validator(mode="after")
    def _definition(self) -> ModelSettings:
        site_keys = [k for k in ("family", "modality", "modalities", "labels", "description", "version", "objects")
                     if getattr(self, k) is not None]
        if not self.defines_model:
            if site_keys:
                raise ValueError(f"{', '.join(site_keys)}: only a site model (an entry with bundle: or "
                                 "torchscript:) takes these keys")
            return self
        if self.bundle is not None and self.torchscript is not None:
            raise ValueError("give bundle or torchscript, not both")
        if self.path is not None:
            raise ValueError("path: a site model's file is its bundle: or torchscript: key")
        if self.family is None:
            raise ValueError("family is required for a site model (segmentation or detection)")
        if self.modality is not None and self.modalities is not None:
            raise ValueError("give modality or modalities, not both")
        if not self.site_modalities:
            raise ValueError("modality (or modalities) is required for a site model")
        if self.torchscript is not None and not self.labels:
            raise ValueError("labels are required for a TorchScript site model (it has no metadata.json)")
        if self.labels is not None and any(i < 0 for i in self.labels):
            raise ValueError("labels: channel indices must be >= 0")
        return self

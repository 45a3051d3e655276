"""Site models: models a site defines in its configuration, run from its own MONAI bundle or TorchScript file.

:func:`define` turns one ``models:`` entry (already shape-checked by ``node.config_models``) into a
:class:`SiteModel`: labels default to the bundle's ``metadata.json`` channel_def (background left
out), their codes to the shipped SNOMED CT table (:mod:`models.codes`), both overridable; the
bundle's configs are parsed and checked against the resolver's grammar and allow-list
(:mod:`models.bundle`). Nothing here imports torch or MONAI, so the node process can do it.

Families: ``segmentation`` (one SEG segment per label, channels from 1; run by
:mod:`models.dl.bundle_model`) and ``detection`` (a bundle with a RetinaNet ``detector``: findings in
an SR, labels are the detector's class indices from 0, e.g. ``{0: {name: nodule}}``; run by
:mod:`models.dl.bundle_detection`).

A bundle config is data run through the safe resolver; a TorchScript file is code compiled by its
author, loaded with ``torch.jit.load`` and run as it is: using one is the site's own choice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from models import codes
from models.base import Code, Family, OutputObject
from models.errors import BundleError, ModelOptionsError
from models.manifest import ManifestFile

__all__ = ["LabelDef", "SiteLabel", "SiteModel", "define"]

SourceKind = Literal["bundle", "torchscript"]
ENTRY = "BundleSegmentation"
"""The class in :mod:`models.dl.bundle_model` that runs a site segmentation model."""
ENTRIES: Mapping[str, tuple[str, str]] = {
    "segmentation": ("models.dl.bundle_model", ENTRY),
    "detection": ("models.dl.bundle_detection", "BundleDetection"),
}
"""Family -> (module, class) that runs a site model of that family."""
DEFAULT_OBJECTS: Mapping[str, tuple[OutputObject, ...]] = {"segmentation": ("SEG", "SR"),
                                                           "detection": ("SR", "SC", "PDF")}
DETECTION_IDS = ("network_def", "detector", "detector_ops", "preprocessing", "postprocessing")
"""What a detection bundle's run uses (its ``inferer``, a script in the model zoo, is replaced: see
:mod:`models.dl.bundle_detection`)."""


@dataclass(frozen=True)
class LabelDef:
    """A label as configured: name and optional codes (None = from the code table)."""

    name: str
    category: Code | None = None
    type: Code | None = None
    laterality: Code | None = None


@dataclass(frozen=True)
class SiteLabel:
    """A resolved output label: the channel (label value) of the network output and its codes."""

    index: int
    name: str
    category: Code
    type: Code
    laterality: Code | None = None


@dataclass(frozen=True)
class SiteModel:
    """A model defined by the site's configuration (see :func:`define`)."""

    name: str
    family: Family
    kind: SourceKind
    source: Path
    modalities: tuple[str, ...]
    labels: tuple[SiteLabel, ...]
    description: str
    version: str
    objects: tuple[OutputObject, ...]
    min_slices: int

    def manifest_file(self) -> ManifestFile:
        """The manifest this model would have, so the registry treats it like a built-in one."""
        data = {
            "name": self.name, "version": self.version, "entry": ENTRIES[self.family][1], "runtime": "torch",
            "requires": {"extra": "ml", "modules": ["torch", "monai"]}, "family": self.family,
            "description": self.description, "modalities": list(self.modalities), "min_slices": self.min_slices,
            "objects": list(self.objects),
            "outputs": [
                {"name": lb.name, "category": _code_dict(lb.category), "type": _code_dict(lb.type),
                 **({"laterality": _code_dict(lb.laterality)} if lb.laterality else {})}
                for lb in self.labels
            ],
        }
        try:
            return ManifestFile.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
            raise ModelOptionsError(f"models.{self.name}: {problems}") from None


def _code_dict(code: Code) -> dict[str, str]:
    return {"value": code.value, "scheme": code.scheme, "meaning": code.meaning}


def define(
    name: str,
    *,
    family: Family,
    bundle: Path | None = None,
    torchscript: Path | None = None,
    modalities: Sequence[str],
    labels: Mapping[int, LabelDef] | None = None,
    description: str | None = None,
    version: str | None = None,
    objects: Sequence[OutputObject] | None = None,
    min_slices: int = 1,
) -> SiteModel:
    """Resolve a site model's definition; raise :class:`ModelOptionsError` naming ``models.<name>.<key>``.

    A bundle must exist and its configs must pass the resolver's checks (no torch is imported);
    every label must have codes, from the configuration or from :mod:`models.codes`.
    """
    where = f"models.{name}"
    if (bundle is None) == (torchscript is None):
        raise ModelOptionsError(f"{where}: give bundle or torchscript (one of them)")
    if family not in ENTRIES:
        raise ModelOptionsError(f"{where}.family: site models of family {family!r} are not supported yet "
                                f"({' and '.join(ENTRIES)} are)")
    if family == "detection" and torchscript is not None:
        raise ModelOptionsError(f"{where}.torchscript: a detection site model needs a bundle (its detector, "
                                "anchors and box postprocessing are config)")
    metadata: Mapping[str, object] = {}
    channel_def: Mapping[int, str] = {}
    kind: SourceKind
    if bundle is not None:
        metadata, channel_def = _read_bundle(where, bundle, family)
        source, kind = bundle, "bundle"
    else:
        assert torchscript is not None
        if not torchscript.is_file():
            raise ModelOptionsError(f"{where}.torchscript: {torchscript} is not a file")
        source, kind = torchscript, "torchscript"
    resolved = _labels(where, labels, channel_def, first=0 if family == "detection" else 1)
    meta_version = metadata.get("version")
    meta_text = metadata.get("description") or metadata.get("name")
    return SiteModel(
        name=name, family=family, kind=kind, source=source, modalities=tuple(modalities), labels=resolved,
        description=description or (str(meta_text) if meta_text else f"site model from {source.name}"),
        version=version or (str(meta_version) if isinstance(meta_version, str) else "0.0.0"),
        objects=tuple(objects) if objects else DEFAULT_OBJECTS[family], min_slices=min_slices,
    )


def _read_bundle(where: str, bundle: Path, family: Family) -> tuple[Mapping[str, object], Mapping[int, str]]:
    from models.bundle import BundleConfig  # parsing only: no torch

    if not bundle.is_dir():
        raise ModelOptionsError(f"{where}.bundle: {bundle} is not a bundle directory")
    try:
        cfg = BundleConfig.read(bundle)
        if "network_def" not in cfg:
            raise BundleError(f"{bundle}: the inference config has no network_def")
        if family == "detection":
            if "detector" not in cfg:
                raise BundleError(f"{bundle}: the inference config has no detector (a detection bundle's "
                                  "RetinaNetDetector)")
            cfg.check(*(i for i in DETECTION_IDS if i in cfg))
        else:
            cfg.check()  # network_def, preprocessing, inferer, postprocessing (those present) and what they use
    except BundleError as exc:
        raise ModelOptionsError(f"{where}.bundle: {exc}") from None
    return cfg.metadata, {int(k): str(v) for k, v in (cfg.channel_def or {}).items()}


def _labels(where: str, labels: Mapping[int, LabelDef] | None, channel_def: Mapping[int, str],
            first: int = 1) -> tuple[SiteLabel, ...]:
    """Labels by output index: segmentation channels from 1 (0 is the background), detection classes from 0."""
    if labels is None:
        labels = {i: LabelDef(n) for i, n in sorted(channel_def.items()) if n.strip().lower() != "background"}
        if not labels:
            raise ModelOptionsError(f"{where}.labels: the bundle's metadata.json has no channel_def with labels; "
                                    "give labels: {index: {name: ...}}")
    out: list[SiteLabel] = []
    for index, lb in sorted(labels.items()):
        if index < first:
            raise ModelOptionsError(f"{where}.labels.0 ({lb.name!r}): label 0 is the background")
        if channel_def and index not in channel_def:
            raise ModelOptionsError(f"{where}.labels.{index} ({lb.name!r}): the bundle's channel_def has no "
                                    f"channel {index} (it has {', '.join(str(i) for i in sorted(channel_def))})")
        known = codes.lookup(lb.name)
        category = lb.category or (known.category if known else None)
        kind = lb.type or (known.type if known else None)
        if category is None or kind is None:
            raise ModelOptionsError(
                f"{where}.labels.{index}: label {lb.name!r} is not in the code table (models/codes); give its "
                "category and type ({value, scheme, meaning}, e.g. SNOMED CT codes)")
        laterality = lb.laterality or (known.laterality if known and lb.type is None else None)
        out.append(SiteLabel(index, _display(lb.name), category, kind, laterality))
    names = [lb.name for lb in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ModelOptionsError(f"{where}.labels: duplicate names {dupes}")
    return tuple(out)


def _display(name: str) -> str:
    """``spleen`` -> ``Spleen``, ``kidney_left`` -> ``Kidney Left`` (a name as configured with capitals is kept)."""
    return name if any(c.isupper() for c in name) else name.replace("_", " ").title()

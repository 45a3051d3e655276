"""Load and strictly validate ``models/<name>/manifest.yaml`` into a :class:`models.base.Manifest`.

Example::

    name: ct-hu-segmentation
    version: 1.0.0
    family: segmentation
    description: ...
    modalities: [CT]
    min_slices: 3
    objects: [SEG, SR]
    outputs:
      - name: Right Lung
        category: {value: "123037004", scheme: SCT, meaning: Anatomical Structure}
        type: {value: "3341006", scheme: SCT, meaning: Right lung}
        laterality: {value: "24028007", scheme: SCT, meaning: Right}   # optional

Unknown keys are errors. ``laterality`` is not part of :class:`models.base.OutputLabel`; read it
with :func:`load_manifest_file` (``ManifestFile.laterality(name)``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator
from pydantic_core import ErrorDetails

from models.base import Code, Family, Manifest, OutputLabel, OutputObject

MANIFEST_FILENAME = "manifest.yaml"

_NonEmpty = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class ManifestError(ValueError):
    """A manifest file is missing, not YAML, or does not match the schema."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class CodeSpec(_Strict):
    """A coded concept as written in YAML: ``{value: "39607008", scheme: SCT, meaning: Lung}``."""

    value: _NonEmpty
    scheme: _NonEmpty
    meaning: _NonEmpty

    def to_code(self) -> Code:
        return Code(self.value, self.scheme, self.meaning)


class OutputSpec(_Strict):
    """One output label of the model."""

    name: _NonEmpty
    category: CodeSpec
    type: CodeSpec
    laterality: CodeSpec | None = None


class ManifestFile(_Strict):
    """The schema of ``manifest.yaml``."""

    name: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]*$")]
    version: Annotated[str, StringConstraints(pattern=r"^\d+\.\d+\.\d+([.+-][0-9A-Za-z.+-]+)?$")]
    family: Family
    description: _NonEmpty
    modalities: Annotated[list[Annotated[str, StringConstraints(pattern=r"^[A-Z]{2,4}$")]], Field(min_length=1)]
    min_slices: Annotated[int, Field(ge=1)]
    outputs: list[OutputSpec]
    objects: list[OutputObject]

    @field_validator("outputs")
    @classmethod
    def _unique_output_names(cls, outputs: list[OutputSpec]) -> list[OutputSpec]:
        names = [o.name for o in outputs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate output names: {dupes}")
        return outputs

    def to_manifest(self) -> Manifest:
        """The frozen contract object."""
        return Manifest(
            name=self.name,
            version=self.version,
            family=self.family,
            description=self.description,
            modalities=tuple(self.modalities),
            min_slices=self.min_slices,
            outputs=tuple(OutputLabel(o.name, o.category.to_code(), o.type.to_code()) for o in self.outputs),
            objects=tuple(self.objects),
        )

    def laterality(self, output_name: str) -> Code | None:
        """The laterality code declared for ``output_name`` (None if none is declared)."""
        for o in self.outputs:
            if o.name == output_name:
                return o.laterality.to_code() if o.laterality else None
        raise KeyError(f"manifest {self.name!r} declares no output {output_name!r}")


def load_manifest_file(path: str | Path) -> ManifestFile:
    """Parse and validate ``path``; raise :class:`ManifestError` naming the file and the bad keys."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read manifest: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: the manifest must be a mapping, got {type(data).__name__}")
    try:
        return ManifestFile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(err) for err in exc.errors())
        raise ManifestError(f"{path}: invalid manifest: {problems}") from exc


def _describe(err: ErrorDetails) -> str:
    """``key.path: message (got value)`` for one pydantic error."""
    where = ".".join(str(p) for p in err["loc"]) or "<root>"
    if err["type"] in ("missing", "extra_forbidden"):
        return f"{where}: {err['msg']}"
    got = repr(err.get("input"))
    return f"{where}: {err['msg']} (got {got[:60]})"


def load_manifest(path: str | Path) -> Manifest:
    """Load ``path`` (a ``manifest.yaml``) as a :class:`models.base.Manifest`."""
    return load_manifest_file(path).to_manifest()

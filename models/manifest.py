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

How the registry builds the model (see :mod:`models.registry`)::

    entry: CtRegistration          # a class exported (``__all__``) by models.<package>; an identifier only
    runtime: classical             # classical | torch: which ModelOptions the model honours
    requires:                      # optional; omitted = the base install is enough
      extra: ml                    # the optional extra to install: pip install 'dicom-ai-node[ml]'
      modules: [SimpleITK]         # top-level modules it imports (looked up, never imported, to check)

Optional: ``looks_for`` (coded concepts a run reports as found, absent or not assessed; default
the outputs' types) and, for detection models, ``sensitivity_by_slice_thickness`` (``{mm: 0-1}``,
measured on phantoms, quoted in the SR and PDF). Unknown keys are errors. ``laterality`` is not
part of :class:`models.base.OutputLabel`; read it with :func:`load_manifest_file`
(``ManifestFile.laterality(name)``).
"""

from __future__ import annotations

import keyword
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from models.base import Code, Family, Manifest, OutputLabel, OutputObject
from models.errors import ManifestError

MANIFEST_FILENAME = "manifest.yaml"

_NonEmpty = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
_Identifier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
_Millimetres = Annotated[float, Field(gt=0)]
_Fraction = Annotated[float, Field(ge=0, le=1)]

Runtime = Literal["classical", "torch"]
"""``classical``: no weights, CPU only (refuses ``path``, ``device: cuda``, ``precision: amp``);
``torch``: built as ``cls(path, device=, batch_size=, precision=)`` and honours every option."""


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


class RequiresSpec(_Strict):
    """What a model needs beyond the base install: ``{extra: ml, modules: [SimpleITK]}``."""

    extra: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]*$")]
    modules: Annotated[list[_Identifier], Field(min_length=1)]


class ManifestFile(_Strict):
    """The schema of ``manifest.yaml``."""

    name: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]*$")]
    version: Annotated[str, StringConstraints(pattern=r"^\d+\.\d+\.\d+([.+-][0-9A-Za-z.+-]+)?$")]
    entry: _Identifier
    runtime: Runtime
    requires: RequiresSpec | None = None
    family: Family
    description: _NonEmpty
    modalities: Annotated[list[Annotated[str, StringConstraints(pattern=r"^[A-Z]{2,4}$")]], Field(min_length=1)]
    min_slices: Annotated[int, Field(ge=1)]
    outputs: list[OutputSpec]
    objects: list[OutputObject]
    looks_for: list[CodeSpec] = []
    """What a run reports as found, absent or not assessed (omitted: the outputs' types)."""
    sensitivity_by_slice_thickness: dict[_Millimetres, _Fraction] | None = None
    """Detection models: measured sensitivity (0-1) per slice thickness (mm) on phantoms, quoted in reports."""

    @field_validator("outputs")
    @classmethod
    def _unique_output_names(cls, outputs: list[OutputSpec]) -> list[OutputSpec]:
        names = [o.name for o in outputs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate output names: {dupes}")
        return outputs

    @field_validator("entry")
    @classmethod
    def _entry_is_a_name(cls, entry: str) -> str:
        if keyword.iskeyword(entry):
            raise ValueError(f"must be a class name, not the keyword {entry!r}")
        return entry

    @model_validator(mode="after")
    def _torch_is_required(self) -> ManifestFile:
        if self.runtime == "torch" and (self.requires is None or "torch" not in self.requires.modules):
            raise ValueError("runtime torch needs requires.modules to list torch")
        return self

    @property
    def required_modules(self) -> tuple[str, ...]:
        """The top-level modules the model imports beyond the base install (empty: none)."""
        return tuple(self.requires.modules) if self.requires else ()

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
            looks_for=tuple(c.to_code() for c in self.looks_for),
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

"""The models this node can run, found from their manifests, and the per-model options a site may set.

Each model is one folder ``models/<package>/`` (the package is the model name with ``-`` replaced
by ``_``) holding its ``manifest.yaml``, its code (an ``__init__.py`` that exports the model
class in ``__all__``) and, for deep-learning models, its demo bundle (``configs/``, ``models/``).
The manifest says how to build the model (see :mod:`models.manifest`)::

    entry: CtRegistration                         # a class exported by models.ct_registration
    runtime: classical                            # classical | torch
    requires: {extra: ml, modules: [SimpleITK]}   # omitted = the base install is enough

:func:`scan` reads every ``models/*/manifest.yaml`` without importing model code (the entry is
checked against the package's ``__all__`` by parsing its ``__init__.py``); the default registry
is scanned once, lazily (:func:`specs`). A manifest can never name arbitrary code: ``entry`` is an
identifier, looked up only in the model's own package. Importing this module (as the node process
does) never imports torch, SimpleITK or model code; only :func:`load` does.

Options (:class:`ModelOptions`, from ``models.<name>`` in the node configuration):

* ``runtime: torch`` models (``dl-*``) honour all of them: ``path`` (a MONAI bundle directory or
  a TorchScript file; None = the demo weights shipped in ``models/dl_<name>/``), ``device``,
  ``batch_size`` and ``precision``. Only the configured path is read (a bundle is code):
  nothing is searched for or downloaded, and a path that does not exist fails the load with
  the path in the message.
* ``runtime: classical`` models have no weights and run on the CPU with numpy/SciPy/SimpleITK:
  ``path``, ``device: cuda`` and ``precision: amp`` cannot be honoured and are refused by
  :func:`check_options` (called by :func:`load`) with a :class:`ModelOptionsError`;
  ``device: auto|cpu`` and ``batch_size`` are accepted and ignored (they have nothing to batch).

A model whose ``requires.modules`` are not installed (a base install without the ``ml`` extra)
is refused by :func:`check_installed` with a :class:`MissingExtraError` naming the extra: at
start-up by ``dicom-node`` when the models run on this host, and by :func:`load` in a worker.

Site models (:mod:`models.site`: defined in the configuration's ``models:`` section with a
``bundle:`` or ``torchscript:``) are listed beside the built-in ones once the configuration is
checked (:func:`node.checks.check_models` calls :func:`set_site_models`, replacing the previous set):
:func:`available`, :func:`spec`, :func:`manifest` and :func:`load` treat them alike.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import logging
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Literal, cast, get_args

from models.base import Manifest, Model
from models.errors import ManifestError, MissingExtraError, ModelOptionsError, UnknownModelError
from models.manifest import MANIFEST_FILENAME, ManifestFile, Runtime, load_manifest_file
from models.site import ENTRIES as SITE_ENTRIES
from models.site import SiteModel

__all__ = [
    "DEFAULT_OPTIONS",
    "MODELS_DIR",
    "ManifestError",
    "MissingExtraError",
    "ModelOptions",
    "ModelOptionsError",
    "ModelSpec",
    "UnknownModelError",
    "available",
    "build",
    "check_installed",
    "check_options",
    "is_deep_learning",
    "load",
    "manifest",
    "manifest_path",
    "missing_modules",
    "scan",
    "set_site_models",
    "site_models",
    "spec",
    "specs",
    "validate_names",
]

MODELS_DIR = Path(__file__).resolve().parent
log = logging.getLogger("models.registry")

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["fp32", "amp"]


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


@dataclass(frozen=True)
class ModelSpec:
    """One model as found by :func:`scan`: its validated manifest and the package that holds its code.

    Attributes:
        package: the importable package, e.g. ``models.ct_registration`` (from the folder, never
            from the manifest text).
        path: the ``manifest.yaml`` it was read from.
        file: the validated manifest.
    """

    package: str
    path: Path
    file: ManifestFile
    site: SiteModel | None = None
    """Set for a site model (then ``path`` is its bundle directory or TorchScript file)."""

    @property
    def name(self) -> str:
        return self.file.name

    @property
    def entry(self) -> str:
        return self.file.entry

    @property
    def runtime(self) -> Runtime:
        return self.file.runtime

    @property
    def extra(self) -> str | None:
        """The optional extra that provides :attr:`modules` (None: the base install is enough)."""
        return self.file.requires.extra if self.file.requires else None

    @property
    def modules(self) -> tuple[str, ...]:
        return self.file.required_modules


def _exports(init: Path) -> frozenset[str]:
    """The names in the literal ``__all__`` of ``init`` (parsed, not imported; empty if none)."""
    try:
        tree = ast.parse(init.read_text(encoding="utf-8"), filename=str(init))
    except (OSError, SyntaxError, ValueError) as exc:
        raise ManifestError(f"{init}: cannot read the model package: {exc}") from exc
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets: list[ast.expr] = list(node.targets)
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets = [node.target]
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets) and node.value is not None:
            try:
                names = ast.literal_eval(node.value)
            except ValueError:
                raise ManifestError(f"{init}: __all__ must be a literal list of names") from None
            if isinstance(names, list | tuple) and all(isinstance(n, str) for n in names):
                return frozenset(names)
            raise ManifestError(f"{init}: __all__ must be a literal list of names")
    return frozenset()


def scan(models_dir: Path, package: str = "models") -> dict[str, ModelSpec]:
    """Every model under ``models_dir`` (folders with a ``manifest.yaml``), by name; imports nothing.

    ``package`` is the importable name of ``models_dir``. Raises :class:`ManifestError` for an
    invalid manifest, a model whose folder is not its name with ``-`` -> ``_``, or an ``entry``
    that the folder's ``__init__.py`` does not list in ``__all__``.
    """
    found: dict[str, ModelSpec] = {}
    for path in sorted(Path(models_dir).glob(f"*/{MANIFEST_FILENAME}")):
        folder = path.parent
        file = load_manifest_file(path)
        expected = file.name.replace("-", "_")
        if folder.name != expected or not expected.isidentifier():
            raise ManifestError(
                f"{path}: model {file.name!r} must live in a folder named {expected!r} (a Python package), "
                f"not {folder.name!r}"
            )
        if file.entry not in _exports(folder / "__init__.py"):
            raise ManifestError(
                f"{path}: entry {file.entry!r} is not exported by {package}.{folder.name} "
                f"(list it in __all__ of {folder / '__init__.py'})"
            )
        found[file.name] = ModelSpec(package=f"{package}.{folder.name}", path=path, file=file)
    return found


@lru_cache(maxsize=1)
def builtin_specs() -> Mapping[str, ModelSpec]:
    """The models shipped in ``models/`` (scanned once, on first use)."""
    return MappingProxyType(scan(MODELS_DIR))


_site_specs: Mapping[str, ModelSpec] = MappingProxyType({})


def set_site_models(models: Iterable[SiteModel]) -> None:
    """Register the configuration's site models, replacing those registered before.

    Raises :class:`ModelOptionsError` if one takes a built-in model's name or two share a name.
    """
    global _site_specs
    found: dict[str, ModelSpec] = {}
    builtin = builtin_specs()
    for model in models:
        if model.name in builtin:
            raise ModelOptionsError(f"models.{model.name}: a site model (bundle:/torchscript:) cannot take the name "
                                    f"of the built-in model {model.name!r}; choose another name")
        if model.name in found:
            raise ModelOptionsError(f"models.{model.name}: defined twice")
        found[model.name] = ModelSpec(package=SITE_ENTRIES[model.family][0], path=model.source,
                                      file=model.manifest_file(), site=model)
    _site_specs = MappingProxyType(found)


def site_models() -> list[str]:
    """Names of the registered site models, sorted."""
    return sorted(_site_specs)


def specs() -> Mapping[str, ModelSpec]:
    """Every model: the built-in ones and the registered site models."""
    if not _site_specs:
        return builtin_specs()
    return MappingProxyType({**builtin_specs(), **_site_specs})


def available() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(specs())


def _unknown(names: Iterable[str]) -> UnknownModelError:
    listed = ", ".join(repr(n) for n in names)
    return UnknownModelError(f"unknown model(s) {listed}; known models: {', '.join(available()) or '(none)'}")


def validate_names(names: Iterable[str]) -> None:
    """Raise :class:`UnknownModelError` if any of ``names`` is not registered."""
    known = specs()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise _unknown(unknown)


def spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of model ``name`` (:class:`UnknownModelError` if there is none)."""
    found = specs().get(name)
    if found is None:
        raise _unknown([name])
    return found


def manifest_path(name: str) -> Path:
    """Where the manifest of model ``name`` lives."""
    return spec(name).path


def manifest(name: str) -> Manifest:
    """The manifest of model ``name``, read from its YAML without importing the model."""
    return spec(name).file.to_manifest()


def is_deep_learning(name: str) -> bool:
    """True for ``runtime: torch`` models, which honour every :class:`ModelOptions` field."""
    return spec(name).runtime == "torch"


def _installed(module: str) -> bool:
    if sys.modules.get(module) is not None:
        return True
    try:
        return importlib.util.find_spec(module) is not None  # top-level names only: imports nothing
    except (ValueError, ImportError):
        return False


def missing_modules(name: str) -> list[str]:
    """The modules in model ``name``'s ``requires.modules`` that cannot be imported here (none imported)."""
    return [m for m in spec(name).modules if not _installed(m)]


def check_installed(name: str) -> None:
    """Raise :class:`MissingExtraError` if model ``name`` needs modules this installation lacks."""
    missing = missing_modules(name)
    if missing:
        extra = spec(name).extra
        raise MissingExtraError(
            f"models.{name}: needs the optional extra '{extra}' (pip install 'dicom-ai-node[{extra}]'); "
            f"missing: {', '.join(missing)}"
        )


def check_options(name: str, options: ModelOptions) -> None:
    """Raise :class:`ModelOptionsError` if model ``name`` can never honour ``options``.

    Static checks only (no file access, no torch import: cheap enough for the node's start-up,
    where the workers' paths and GPUs may not exist): a classical model refuses a ``path``,
    ``device: cuda`` and ``precision: amp``. :func:`load` also checks that a configured path
    exists; the model checks that CUDA is available when asked for.
    """
    if spec(name).runtime == "torch":
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


def _entry_class(model: ModelSpec) -> type:
    """The class ``entry`` names, looked up only in the model's own package (which this imports)."""
    module = importlib.import_module(model.package)
    cls = getattr(module, model.entry, None) if model.entry in getattr(module, "__all__", ()) else None
    if not isinstance(cls, type):
        raise ManifestError(f"{model.path}: entry {model.entry!r} is not a class exported by {model.package}")
    return cls


def build(model: ModelSpec, options: ModelOptions = DEFAULT_OPTIONS) -> Model:
    """Import ``model``'s package and construct its entry class with ``options`` (no checks: see :func:`load`).

    ``runtime: torch``: ``cls(path, device=, batch_size=, precision=)`` (``device: auto`` -> None,
    ``batch_size`` None -> the class's ``BATCH_SIZE``); ``runtime: classical``: ``cls()``.
    """
    if model.site is not None:  # models.dl.bundle_model.BundleSegmentation, models.dl.bundle_detection...
        module, entry = SITE_ENTRIES[model.site.family]
        runner = getattr(importlib.import_module(module), entry)
        device = None if options.device == "auto" else options.device
        return cast(Model, runner(model.site, device=device, batch_size=options.batch_size,
                                  precision=options.precision))
    cls = _entry_class(model)
    if model.runtime == "torch":
        device = None if options.device == "auto" else options.device
        built = cls(options.path, device=device, batch_size=options.batch_size, precision=options.precision)
    else:
        built = cls()
    return cast(Model, built)


def load(name: str, options: ModelOptions | None = None) -> Model:
    """Build a new instance of model ``name`` with ``options`` (the caller keeps it; nothing is cached).

    Raises :class:`UnknownModelError`; :class:`MissingExtraError` when the model needs an extra
    that is not installed (before anything is imported); :class:`ModelOptionsError` for options the
    model cannot honour (:func:`check_options`) or a configured path that does not exist; the
    model's own ``ValueError`` when its weights cannot be loaded (``BundleError``, naming the file)
    or CUDA is asked for and not available.
    """
    model_spec = spec(name)
    opts = options or DEFAULT_OPTIONS
    check_installed(name)
    check_options(name, opts)
    if model_spec.site is not None and not model_spec.site.source.exists():
        raise ModelOptionsError(f"models.{name}.{model_spec.site.kind}: {model_spec.site.source} does not exist")
    if opts.path is not None and not opts.path.exists():
        raise ModelOptionsError(
            f"models.{name}.path: {opts.path} does not exist (a bundle directory or TorchScript file is expected)"
        )
    t0 = time.perf_counter()
    model = build(model_spec, opts)
    if model.manifest.name != name:
        raise ManifestError(f"model registered as {name!r} reports manifest name {model.manifest.name!r}")
    if model_spec.runtime == "torch":
        note = getattr(model, "note", None)
        log.info(
            "model %s %s loaded in %.1f s from %s (%s, batch size %s)",
            name,
            model.manifest.version,
            time.perf_counter() - t0,
            opts.path or (model_spec.site.source if model_spec.site else "the shipped demo bundle"),
            note() if callable(note) else "",
            getattr(model, "batch_size", "-"),
        )
    return model

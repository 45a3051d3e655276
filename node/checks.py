"""Settings checked against the model registry: what every command and the worker load first.

:func:`node.config.load_settings` validates the file on its own; this adds what needs the registry
(manifests only: no model code, no torch): every model named in a rule or under ``models:`` exists,
its options can be honoured, and where its jobs run on this host its optional extra is installed.
Site models (``models:`` entries with ``bundle:`` or ``torchscript:``) are resolved first (their
bundle's configs parsed and checked by the safe resolver, their labels coded) and registered beside
the built-in ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from models import registry
from models.base import Code
from models.errors import UnknownModelError
from models.site import LabelDef, SiteModel, define
from node.config import Settings, load_settings
from node.config_models import CodeSettings, ModelSettings


def _code(c: CodeSettings | None) -> Code | None:
    return Code(c.value, c.scheme, c.meaning) if c is not None else None


def site_model(name: str, ms: ModelSettings) -> SiteModel:
    """The :class:`models.site.SiteModel` a ``models:`` entry with ``bundle:``/``torchscript:`` defines
    (:class:`models.errors.ModelOptionsError` naming the key if it cannot be used)."""
    assert ms.family is not None
    labels = None if ms.labels is None else {
        i: LabelDef(lb.name, _code(lb.category), _code(lb.type), _code(lb.laterality)) for i, lb in ms.labels.items()
    }
    return define(name, family=ms.family, bundle=ms.bundle, torchscript=ms.torchscript, modalities=ms.site_modalities,
                  labels=labels, description=ms.description, version=ms.version, objects=ms.objects,
                  min_slices=ms.min_slices)


def check_models(settings: Settings, *, queues: Sequence[str] | None = None) -> None:
    """Raise a :class:`models.errors.ConfigError` (its subclasses name the model and the key) if a
    configured model cannot run.

    ``queues``: this host runs a worker for these queues, so the models routed to them must be
    installed here. ``None``: the host of ``dicom-node run``, whose embedded workers (if
    ``queue.embedded_workers``) run every model. ``path`` options are not checked: a remote worker may
    hold them; a site model's ``bundle`` is (its labels and version come from it, so it must be readable here too).
    """
    registry.set_site_models([site_model(n, ms) for n, ms in settings.models.items() if ms.defines_model])
    names = list(dict.fromkeys([m for rule in settings.rules for m in rule.models] + list(settings.models)))
    registry.validate_names(names)
    for target in settings.notifications.targets:  # the models whose results a target announces
        try:
            registry.validate_names(target.models)
        except UnknownModelError as exc:
            raise UnknownModelError(f"notifications.targets[{target.name}].models: {exc}") from None
    for name, ms in settings.models.items():
        registry.check_options(name, registry.ModelOptions(path=ms.path, device=ms.device, batch_size=ms.batch_size,
                                                           precision=ms.precision))
    if queues is not None:
        here = [n for n in names if settings.model_settings(n).queue in queues]
    else:
        here = names if settings.queue.embedded_workers else []
    for name in here:
        registry.check_installed(name)  # MissingExtraError names the extra and the missing modules


def load_checked_settings(path: Path, *, queues: Sequence[str] | None = None) -> Settings:
    """:func:`node.config.load_settings` then :func:`check_models`."""
    settings = load_settings(path)
    check_models(settings, queues=queues)
    return settings

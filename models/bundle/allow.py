"""What a bundle config may build or call: MONAI transforms, networks and inferers, a few torch/numpy values.

Everything here is a *name*; nothing is imported until :func:`load` (so checking a config needs neither
torch nor MONAI). A ``_target_`` may be spelled by its short name (``"Orientationd"``, as MONAI's locator
allows), its canonical path (``"monai.transforms.Orientationd"``) or any path inside the same MONAI package
(``"monai.transforms.spatial.dictionary.Orientationd"``), which :func:`load` checks is the same object.
Dictionary transforms are also accepted under MONAI's aliases ``...D`` and ``...Dict``.

Data input (``LoadImage[d]``) and output writing (``SaveImage[d]``) are the node's: :data:`REPLACED` says why;
the resolver leaves them out of transform lists and reports them. Anything else (``os.system``,
``scripts.detection_inferer.RetinaNetInferer``, ``monai.utils.set_determinism``, ``Lambdad``...) is refused.
MONAI's RetinaNet feature extractor (``resnet_fpn_feature_extractor``) imports ``torchvision`` for one
argument check: its name is mapped to a torchvision-free equivalent (:mod:`models.bundle.compat`, same
arguments, same network): see :data:`STAND_INS`.
"""

from __future__ import annotations

import builtins
import functools
import importlib
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

_TRANSFORM_PAIRS = (
    "EnsureChannelFirst", "Orientation", "Spacing", "ScaleIntensityRange", "ScaleIntensityRangePercentiles",
    "ScaleIntensity", "CropForeground", "NormalizeIntensity", "EnsureType", "CastToType", "ToTensor", "ToNumpy",
    "Activations", "AsDiscrete", "KeepLargestConnectedComponent", "FillHoles", "RemoveSmallObjects", "LabelFilter",
    "Resize", "SpatialPad", "DivisiblePad", "CenterSpatialCrop", "ResizeWithPadOrCrop", "ThresholdIntensity",
    "ClipIntensityPercentiles", "Identity", "SqueezeDim", "SplitDim", "Flip", "AsChannelLast", "MapLabelValue",
    "Invert",
)
_TRANSFORM_DICT_ONLY = (
    "CopyItemsd", "DeleteItemsd", "SelectItemsd", "ConcatItemsd",
)
_NETWORKS = (
    "UNet", "BasicUNet", "SegResNet", "SegResNetDS", "SwinUNETR", "DynUNet", "UNETR", "AttentionUnet", "VNet",
    "DenseNet121", "DenseNet169", "ResNet", "resnet18", "resnet34", "resnet50", "EfficientNetBN", "Classifier",
    "Regressor", "FlexibleUNet", "HighResNet",
)
_INFERERS = (
    "SlidingWindowInferer", "SimpleInferer", "SliceInferer",
)
_DETECTION = {
    "monai.apps.detection.networks.retinanet_network": ("RetinaNet", "resnet_fpn_feature_extractor"),
    "monai.apps.detection.networks.retinanet_detector": ("RetinaNetDetector",),
    "monai.apps.detection.utils.anchor_utils": ("AnchorGeneratorWithAnchorShape", "AnchorGenerator"),
    "monai.apps.detection.transforms.dictionary": (
        "ClipBoxToImaged", "AffineBoxToWorldCoordinated", "ConvertBoxModed", "ConvertBoxToStandardModed"
    ),
}


#: MONAI callables built by our own equivalent (``monai path`` -> ``our module``): same arguments, same result.
STAND_INS: Mapping[str, str] = MappingProxyType({
    "monai.apps.detection.networks.retinanet_network.resnet_fpn_feature_extractor": "models.bundle.compat",
})


@dataclass(frozen=True)
class Entry:
    """One allowed constructor or callable: ``module.attr`` is its canonical location; paths under ``root``
    that end in one of its names are accepted spellings. ``stands_for`` is the MONAI path a stand-in
    (:data:`STAND_INS`) replaces: that spelling loads the stand-in."""

    name: str
    module: str
    attr: str
    root: str
    stands_for: str | None = None

    @property
    def path(self) -> str:
        return f"{self.module}.{self.attr}"


def _table() -> dict[str, Entry]:
    table: dict[str, Entry] = {}

    def add(name: str, module: str, root: str, attr: str | None = None) -> None:
        table[name] = Entry(name, module, attr or name, root)

    for base in _TRANSFORM_PAIRS:
        add(base, "monai.transforms", "monai.transforms")
        if base != "Invert":
            for alias in ("d", "D", "Dict"):
                add(base + alias, "monai.transforms", "monai.transforms", base + "d")
    add("Invertd", "monai.transforms", "monai.transforms")
    add("InvertD", "monai.transforms", "monai.transforms", "Invertd")
    add("InvertDict", "monai.transforms", "monai.transforms", "Invertd")
    for name in _TRANSFORM_DICT_ONLY:
        add(name, "monai.transforms", "monai.transforms")
    add("Compose", "monai.transforms", "monai.transforms")
    for name in _NETWORKS:
        add(name, "monai.networks.nets", "monai.networks")
    for name in _INFERERS:
        add(name, "monai.inferers", "monai.inferers")
    for module, names in _DETECTION.items():
        for name in names:
            add(name, module, "monai.apps.detection")
    for path, module in STAND_INS.items():
        name = path.rsplit(".", 1)[1]
        table[name] = Entry(name, module, name, table[name].root, stands_for=path)
    return table


ENTRIES: Mapping[str, Entry] = MappingProxyType(_table())

REPLACED: Mapping[str, str] = MappingProxyType({
    **{n: "data input is the node's (the loaded DICOM series with its affine)" for n in
       ("LoadImage", "LoadImaged", "LoadImageD", "LoadImageDict")},
    **{n: "output writing is the node's (DICOM SEG/SR)" for n in
       ("SaveImage", "SaveImaged", "SaveImageD", "SaveImageDict")},
})

#: Dotted values an expression may name outside MONAI constructors (``np`` is spelled ``numpy`` here).
DOTTED: Mapping[str, tuple[str, str]] = MappingProxyType({
    "torch.device": ("torch", "device"),
    "torch.cuda.is_available": ("torch.cuda", "is_available"),
    "torch.cuda.device_count": ("torch.cuda", "device_count"),
    **{f"torch.{t}": ("torch", t) for t in
       ("float16", "float32", "float64", "bfloat16", "half", "float", "double", "uint8", "int8", "int16",
        "int32", "int64", "long", "bool")},
    **{f"numpy.{t}": ("numpy", t) for t in
       ("float16", "float32", "float64", "uint8", "int8", "int16", "uint16", "int32", "int64", "bool_")},
})

#: Roots of dotted names in expressions (MONAI's default globals: monai, torch, np, numpy).
MODULE_ROOTS = frozenset({"monai", "torch", "numpy", "np"})

#: Methods (and attributes) an expression may use, each only on the kind of value it belongs to (see
#: :func:`method_allowed`), e.g. ``$@network_def.to(@device)`` and the RetinaNet detector's setters.
#: ``format`` (a classic sandbox escape) and every ``_name`` are refused.
_OBJECT_METHODS = frozenset({
    "to", "cpu", "eval", "float", "half",
    "set_target_keys", "set_box_selector_parameters", "set_sliding_window_inferer", "set_box_coder_weights",
})
_STR_METHODS = frozenset({"lower", "upper", "strip", "split", "replace", "startswith", "endswith", "join"})
_DICT_METHODS = frozenset({"keys", "values", "items", "get"})
_SEQ_METHODS = frozenset({"index", "count"})
METHODS = _OBJECT_METHODS | _STR_METHODS | _DICT_METHODS | _SEQ_METHODS

_MAX_RANGE = 1_000_000
_PLAIN = (str, bytes, int, float, list, tuple, dict, set)  # instances of allowed builtin types are not callable


def _range(*args: int) -> range:
    r = range(*args)
    if len(r) > _MAX_RANGE:
        raise ValueError(f"range of {len(r)} items is too long")
    return r


#: Builtins an expression may call (pure; ``range`` is capped).
BUILTINS: Mapping[str, Callable[..., Any]] = MappingProxyType({
    **{n: getattr(builtins, n) for n in
       ("list", "tuple", "dict", "set", "len", "min", "max", "int", "float", "str", "bool", "abs", "round",
        "sorted", "sum", "zip", "enumerate", "any", "all", "reversed")},
    "range": _range,
})


def normalize(path: str) -> str:
    """``np.float32`` -> ``numpy.float32``."""
    return "numpy" + path[2:] if path == "np" or path.startswith("np.") else path


def find(path: str) -> Entry | None:
    """The entry a ``_target_`` or dotted expression name means, or None (no import)."""
    name = path.rsplit(".", 1)[-1]
    entry = ENTRIES.get(name)
    if entry is None:
        return None
    if entry.stands_for is not None:  # spelled as MONAI's: our module's own path is not a config name
        return entry if path in (name, entry.stands_for) else None
    if path in (name, entry.path, f"{entry.module}.{name}"):
        return entry
    module = path.rsplit(".", 1)[0] if "." in path else ""
    if module == entry.root or module.startswith(entry.root + "."):
        return entry
    return None


def is_allowed_dotted(path: str) -> bool:
    """Whether an expression may name ``path`` (a module-rooted dotted name); no import."""
    path = normalize(path)
    return path in DOTTED or (path.startswith("monai.") and find(path) is not None)


def load(entry: Entry, spelled: str | None = None) -> Any:
    """Import ``entry``; a long spelling must name the very same object (checked in an already allowed package)."""
    obj = getattr(importlib.import_module(entry.module), entry.attr)
    if entry.stands_for is not None:  # our equivalent: only the MONAI path it replaces (or the short name)
        if spelled and spelled not in (entry.name, entry.stands_for):
            raise LookupError(f"{spelled!r} is not {entry.stands_for}")
        return obj
    if spelled and "." in spelled and spelled not in (entry.path, f"{entry.module}.{entry.name}"):
        module_name, attr = spelled.rsplit(".", 1)
        module = sys.modules.get(module_name) or importlib.import_module(module_name)
        if getattr(module, attr, None) is not obj:
            raise LookupError(f"{spelled!r} is not {entry.path}")
    return obj


def load_dotted(path: str) -> Any:
    """The object of an allowed dotted expression name (``torch.device``, ``monai.networks.nets.resnet.resnet50``)."""
    path = normalize(path)
    if path in DOTTED:
        module, attr = DOTTED[path]
        return getattr(importlib.import_module(module), attr)
    entry = find(path)
    if entry is None or not path.startswith("monai."):
        raise LookupError(f"{path!r} is not allowed")
    return load(entry, path)


@functools.cache
def _allowed_objects() -> tuple[tuple[Any, ...], tuple[type, ...]]:
    """Every allowed callable, imported, and the classes among them (to check a value about to be called)."""
    objs = (*(load(e) for e in ENTRIES.values()), *(load_dotted(p) for p in DOTTED), *BUILTINS.values())
    return objs, tuple(o for o in objs if isinstance(o, type) and o not in (type, object))


def _allowed_instance(obj: Any) -> bool:
    """An instance (not a class) of an allowed class, a torch module or a tensor."""
    if isinstance(obj, (type, *_PLAIN)):
        return False
    import torch  # an allowed network's sub-modules are modules too

    return isinstance(obj, (torch.nn.Module, torch.Tensor, *_allowed_objects()[1]))


def method_allowed(obj: Any, name: str) -> bool:
    """Whether ``obj.name`` may be used: string methods on strings, dict methods on dicts, ``to``/``eval``/the
    detector setters on instances of allowed classes (networks, detectors, tensors)."""
    if name in _STR_METHODS:
        return isinstance(obj, str)
    if name in _DICT_METHODS:
        return isinstance(obj, dict)
    if name in _SEQ_METHODS:
        return isinstance(obj, list | tuple | str)
    return name in _OBJECT_METHODS and _allowed_instance(obj)


def may_call(obj: Any) -> bool:
    """Whether ``obj`` (a value reached through references) may be called: an allowed callable, an instance of
    an allowed class (a transform, network or inferer), or an allowed method bound to the right kind of value."""
    if any(obj is a for a in _allowed_objects()[0]):
        return True
    if _allowed_instance(obj):
        return True
    self_, name = getattr(obj, "__self__", None), getattr(obj, "__name__", "")
    return self_ is not None and name in METHODS and method_allowed(self_, name)

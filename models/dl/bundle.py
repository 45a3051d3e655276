"""Load the network of a ``dl-*`` model from a MONAI bundle directory or a TorchScript file, safely.

Supported layouts (only from a path the caller gives; nothing is ever downloaded)::

    <bundle>/configs/metadata.json    # MONAI metadata; "version" required, "name" optional,
                                      # network_data_format with the outputs' channel_def
    <bundle>/configs/inference.json   # an ordinary MONAI inference config: "network_def" (+ "device",
                                      # "network"), and the model family's "dicom_node" parameters
    <bundle>/models/model.pt          # state dict (torch.load(weights_only=True)), preferred
    <bundle>/models/model.ts          # or TorchScript, used when there is no model.pt

    <file>.ts / <file>.pt              # TorchScript; parameters from its extra file "dicom_node.json"

``network_def`` is built by the safe resolver (:mod:`models.bundle`: ``@``/``%``/``$``/``_target_``
with an allow-list of MONAI/torch constructors and a small expression grammar; nothing else of the
config is built). The ``dicom_node`` object holds the model family's inference parameters (working
spacing, HU window, patch size...) as plain JSON; each model validates its own keys. The four demo
bundles are written by :func:`write_bundle`; a site's own bundle with its own pre/post-processing
runs as a *site model* instead (:mod:`models.dl.bundle_model`).

A TorchScript file's ``dicom_node.json`` extra file is ``{"name": ..., "version": ...,
"dicom_node": {...}}``; :func:`save_torchscript` writes it.
"""

from __future__ import annotations

import inspect
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from monai.networks import nets

from models.errors import BundleError

NETWORKS: Mapping[str, Callable[..., torch.nn.Module]] = {
    "UNet": nets.UNet,
    "BasicUNet": nets.BasicUNet,
    "SegResNet": nets.SegResNet,
    "Classifier": nets.Classifier,
    "Regressor": nets.Regressor,
}
EXTRA_FILE = "dicom_node.json"
_FORBIDDEN_KEYS = frozenset({"_target_", "_requires_", "_disabled_", "_desc_", "_mode_"})


@dataclass(frozen=True)
class LoadedNetwork:
    """A network ready for inference (eval mode, on its device) and what it was loaded from."""

    network: torch.nn.Module
    source: Path
    kind: Literal["state_dict", "torchscript"]
    name: str
    version: str
    network_name: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """One line for result notes and logs, e.g. ``weights: dl-ct-segmentation 0.1.0-demo (state_dict)``."""
        return f"weights: {self.name} {self.version} ({self.kind}, {self.source.name})"


@dataclass(frozen=True)
class NetworkDef:
    """A parsed, whitelisted ``network_def``."""

    name: str
    args: Mapping[str, Any]

    def build(self) -> torch.nn.Module:
        return NETWORKS[self.name](**self.args)

    def to_json(self) -> dict[str, Any]:
        return {"_target_": f"monai.networks.nets.{self.name}", **self.args}


def parse_network_def(spec: object, where: str = "network_def") -> NetworkDef:
    """Validate ``spec`` (the JSON ``network_def``) against :data:`NETWORKS`; raise :class:`BundleError`."""
    if not isinstance(spec, dict):
        raise BundleError(f"{where} must be an object, got {type(spec).__name__}")
    target = spec.get("_target_")
    if not isinstance(target, str):
        raise BundleError(f"{where}._target_ must be a network name")
    name = target.removeprefix("monai.networks.nets.")
    if name not in NETWORKS:
        raise BundleError(f"{where}: network {target!r} is not allowed; allowed: {', '.join(sorted(NETWORKS))}")
    args = {k: v for k, v in spec.items() if k != "_target_"}
    for key, value in args.items():
        _check_literal(value, f"{where}.{key}")
    try:
        inspect.signature(NETWORKS[name]).bind(**args)
    except TypeError as exc:
        raise BundleError(f"{where}: bad arguments for {name}: {exc}") from None
    return NetworkDef(name, args)


def _check_literal(value: object, where: str) -> None:
    """Accept JSON literals only: no config expressions, references, macros or nested objects to build."""
    if value is None or isinstance(value, bool | int | float):
        return
    if isinstance(value, str):
        if value[:1] in ("$", "@", "%"):
            raise BundleError(f"{where}: config expressions and references are not supported ({value[:40]!r})")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_literal(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        bad = _FORBIDDEN_KEYS.intersection(value)
        if bad:
            raise BundleError(f"{where}: nested {sorted(bad)[0]} is not supported")
        for k, item in value.items():
            _check_literal(item, f"{where}.{k}")
        return
    raise BundleError(f"{where}: unsupported value of type {type(value).__name__}")


def _params(value: object, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BundleError(f"{where}: 'dicom_node' must be an object")
    _check_literal(value, f"{where}: dicom_node")
    return dict(value)


def load_network(path: str | Path, device: torch.device | str = "cpu") -> LoadedNetwork:
    """Load the bundle directory or TorchScript file at ``path`` onto ``device`` in eval mode."""
    source = Path(path)
    dev = torch.device(device)
    if source.is_dir():
        return _load_bundle(source, dev)
    if source.is_file():
        return _load_torchscript(source, dev, name=source.stem, version="unknown")
    raise BundleError(f"{source}: no such bundle directory or TorchScript file")


def _load_bundle(root: Path, device: torch.device) -> LoadedNetwork:
    from models.bundle import BundleConfigError

    try:
        return _build_bundle(root, device)
    except BundleConfigError as exc:  # names the config file and key: add the bundle
        raise BundleConfigError(f"{root}: {exc}") from None


def _build_bundle(root: Path, device: torch.device) -> LoadedNetwork:
    from models.bundle import BundleConfig, BundleConfigError, load_weights

    cfg = BundleConfig.read(root)
    version = cfg.metadata.get("version")
    if not isinstance(version, str) or not version:
        raise BundleError(f"{root / 'configs' / 'metadata.json'}: 'version' (a string) is required")
    name = cfg.name
    params = _params(cfg.raw("dicom_node") if "dicom_node" in cfg else None, cfg.where("dicom_node"))
    weights, script = root / "models" / "model.pt", root / "models" / "model.ts"
    if not weights.is_file():
        if script.is_file():
            loaded = _load_torchscript(script, device, name=name, version=version)
            return LoadedNetwork(loaded.network, script, "torchscript", name, version, None, params or loaded.params)
        raise BundleError(f"{root}: neither models/model.pt nor models/model.ts")
    if "network_def" not in cfg:
        raise BundleConfigError(f"{cfg.where('network_def')}: 'network_def' is required")
    network = cfg.network()
    if not isinstance(network, torch.nn.Module):
        raise BundleConfigError(f"{cfg.where('network_def')}: builds a {type(network).__name__}, not a network")
    load_weights(network, weights)
    network.to(device).eval()
    return LoadedNetwork(network, weights, "state_dict", name, version, type(network).__name__, params)


def _load_torchscript(path: Path, device: torch.device, *, name: str, version: str) -> LoadedNetwork:
    extra = {EXTRA_FILE: ""}
    try:
        with warnings.catch_warnings():
            # torch 2.13 deprecates TorchScript in favour of torch.export, but model.ts is what
            # MONAI bundles ship; loading it still works.
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except Exception as exc:  # torch raises RuntimeError or ValueError depending on the damage
        raise BundleError(f"{path}: not a TorchScript file: {exc}") from exc
    params: dict[str, Any] = {}
    raw = extra[EXTRA_FILE]
    if raw:
        try:
            info = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{path}: extra file {EXTRA_FILE} is not valid JSON: {exc}") from exc
        if not isinstance(info, dict):
            raise BundleError(f"{path}: extra file {EXTRA_FILE} must be a JSON object")
        name = str(info.get("name", name))
        version = str(info.get("version", version))
        params = _params(info.get("dicom_node"), f"{path}: {EXTRA_FILE}")
    module.eval()
    return LoadedNetwork(module, path, "torchscript", name, version, None, params)


def write_bundle(
    root: Path,
    network: torch.nn.Module,
    netdef: NetworkDef,
    *,
    name: str,
    version: str,
    description: str,
    params: Mapping[str, Any],
    metadata: Mapping[str, Any] | None = None,
    items: Mapping[str, Any] | None = None,
) -> None:
    """Write ``network``'s weights and configs as an ordinary MONAI bundle at ``root`` (used by the training
    tool and tests); ``metadata`` adds keys to ``metadata.json`` (``network_data_format`` with channel_def)."""
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "name": name,
        "version": version,
        "description": description,
        "monai_version": _monai_version(),
        "pytorch_version": torch.__version__.split("+")[0],
        "intended_use": "Demonstration only: trained on synthetic phantoms, not a clinical model.",
        **(metadata or {}),
    }
    inference = _inference_config(netdef.to_json(), params, items)
    (root / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    (root / "configs" / "inference.json").write_text(json.dumps(inference, indent=2) + "\n", encoding="utf-8")
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    torch.save(state, root / "models" / "model.pt")


def network_data_format(
    inputs: Mapping[str, str], output_format: str, outputs: Sequence[str], spatial_shape: Sequence[int]
) -> dict[str, Any]:
    """metadata.json's ``network_data_format``: one ``image`` input (``inputs``: channel -> meaning) and one
    ``pred`` output of ``output_format`` whose channel_def is ``outputs`` (channel i -> ``outputs[i]``)."""
    is_image = output_format in ("segmentation", "regression") and len(spatial_shape) == 3
    return {
        "inputs": {"image": {
            "type": "image", "format": "hounsfield", "modality": "CT", "num_channels": len(inputs),
            "spatial_shape": list(spatial_shape), "dtype": "float32", "value_range": [0, 1],
            "is_patch_data": True, "channel_def": dict(inputs),
        }},
        "outputs": {"pred": {
            "type": "image" if is_image else "probabilities", "format": output_format,
            "num_channels": len(outputs), "spatial_shape": list(spatial_shape) if is_image else [len(outputs)],
            "dtype": "float32", "value_range": [0, 1] if output_format != "regression" else [],
            "is_patch_data": is_image, "channel_def": {str(i): name for i, name in enumerate(outputs)},
        }},
    }


def _inference_config(
    netdef_json: Mapping[str, Any], params: Mapping[str, Any], items: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """inference.json: device, network_def, network, then ordinary bundle ``items`` (preprocessing, inferer,
    postprocessing...) and the model-specific ``dicom_node`` block (left out when empty)."""
    config: dict[str, Any] = {
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": dict(netdef_json),
        "network": "$@network_def.to(@device)",
        **dict(items or {}),
    }
    if params:
        config["dicom_node"] = dict(params)
    return config


def rewrite_configs(
    root: Path,
    data_format: Mapping[str, Any],
    items: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
) -> None:
    """Rewrite an existing demo bundle's configs in the format :func:`write_bundle` writes (weights untouched):
    ``items`` (bundle items such as preprocessing/inferer) and ``params`` (the new ``dicom_node`` block) replace
    the old ones when given."""
    meta_path, inference_path = root / "configs" / "metadata.json", root / "configs" / "inference.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    inference = json.loads(inference_path.read_text(encoding="utf-8"))
    meta["network_data_format"] = dict(data_format)
    old_params = inference.get("dicom_node") or {}
    inference = _inference_config(inference["network_def"], old_params if params is None else params, items)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    inference_path.write_text(json.dumps(inference, indent=2) + "\n", encoding="utf-8")


def save_torchscript(
    path: Path, network: torch.nn.Module, *, name: str, version: str, params: Mapping[str, Any]
) -> None:
    """Script ``network`` and save it with its ``dicom_node.json`` extra file."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning)
        scripted = torch.jit.script(network.cpu().eval())
        info = {"name": name, "version": version, "dicom_node": dict(params)}
        scripted.save(str(path), _extra_files={EXTRA_FILE: json.dumps(info).encode()})


def _monai_version() -> str:
    import monai

    return str(monai.__version__)

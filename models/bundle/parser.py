"""Reading a bundle's ``configs/`` (JSON or YAML, safely) and ``metadata.json``; ids, relative ids and ``%`` macros.

Ids are ``::``-separated paths into the config (``preprocessing::transforms::0``); the old ``#`` separator is
accepted everywhere. Relative references (``@::x`` = ``x`` beside the current item, ``@::::x`` one level up)
and ``%`` macros (``%id`` or ``%file.json::id``, a copy of that raw config) are expanded when the config is
read, as MONAI does; a macro may only read a ``.json``/``.yaml``/``.yml`` file inside the bundle directory.
Nothing here imports torch or MONAI.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from models.bundle.expr import REF_SEP, normalize_id
from models.errors import BundleConfigError

CONFIG_DIR = "configs"
METADATA_FILE = "metadata.json"
SUFFIXES = (".json", ".yaml", ".yml")
_RELATIVE = re.compile(r"(?:@|%)(?:::)+")
_PATH_ID = re.compile(r"(.*?\.(?:json|yaml|yml))(?=(?:::.*)|$)", re.IGNORECASE)
_MAX_FILE_BYTES = 16 * 1024 * 1024


def split_id(id: str | int) -> list[str]:
    """``"a::b::0"`` (or ``"a#b#0"``) -> ``["a", "b", "0"]``; ``""`` is the whole config."""
    text = normalize_id(str(id))
    return text.split(REF_SEP) if text else []


def lookup(config: Any, id: str) -> Any:
    """The raw value at ``id``; raises ``KeyError`` naming the first missing part."""
    value = config
    for part in split_id(id):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            raise KeyError(part)
    return value


def assign(config: dict[str, Any], id: str, value: Any) -> None:
    """Set ``id`` (its parent must exist; a missing last dict key is added)."""
    parts = split_id(id)
    if not parts:
        raise KeyError(id)
    parent = lookup(config, REF_SEP.join(parts[:-1]))
    last = parts[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        parent[int(last)] = value
    else:
        raise KeyError(last)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def load_file(path: Path) -> Any:
    """Parse one JSON or YAML file (``yaml.safe_load``: no tags, no objects); :class:`BundleConfigError` names it."""
    if path.suffix.lower() not in SUFFIXES:
        raise BundleConfigError(f"{path.name}: only .json, .yaml and .yml config files are read")
    try:
        if path.stat().st_size > _MAX_FILE_BYTES:
            raise BundleConfigError(f"{path.name}: larger than {_MAX_FILE_BYTES // 2**20} MiB")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            return json.loads(text, object_pairs_hook=_no_duplicates)
        return yaml.safe_load(text)
    except OSError as exc:
        raise BundleConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (ValueError, yaml.YAMLError) as exc:  # JSONDecodeError is a ValueError
        raise BundleConfigError(f"{path.name}: not valid {path.suffix[1:].upper()}: {exc}") from None
    except RecursionError:
        raise BundleConfigError(f"{path.name}: nested too deeply") from None


def find_config(root: Path, name: str) -> Path:
    """``configs/<name>.json|yaml|yml`` (or ``configs/<name>`` when it has a suffix), inside ``root``."""
    folder = root / CONFIG_DIR
    candidates = [folder / name] if name.lower().endswith(SUFFIXES) else [folder / f"{name}{s}" for s in SUFFIXES]
    for path in candidates:
        if path.is_file():
            return _inside(root, path, name)
    raise BundleConfigError(f"{root}: no {CONFIG_DIR}/{name}{'' if Path(name).suffix else '.json|yaml|yml'}")


def _inside(root: Path, path: Path, spelled: str) -> Path:
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise BundleConfigError(f"{spelled!r} is outside the bundle directory")
    return resolved


def resolve_relative(id: str, value: str) -> str:
    """``@::x`` inside item ``a::b`` -> ``@a::x``; ``@::::x`` -> ``@x`` (MONAI's relative ids)."""
    value = normalize_id(value)
    current = split_id(id)
    for prefix in sorted(set(_RELATIVE.findall(value)), reverse=True):
        sym = prefix[0]
        up = prefix[1:].count(REF_SEP)
        if up > len(current):
            raise ValueError(f"relative id in {value!r} goes above the config root")
        base = "" if up == len(current) else REF_SEP.join(current[:-up]) + REF_SEP
        value = value.replace(prefix, sym + base)
    return value


class Expander:
    """Expands relative ids and ``%`` macros of a freshly read config in place, naming keys in errors."""

    def __init__(self, root: Path, config: dict[str, Any], where: Any) -> None:
        self._root = root
        self._config = config
        self._where = where
        self._files: dict[Path, Any] = {}

    def run(self) -> None:
        for key in list(self._config):
            self._config[key] = self._expand(self._config[key], str(key))

    def _expand(self, value: Any, id: str) -> Any:
        if isinstance(value, dict):
            return {k: self._expand(v, f"{id}{REF_SEP}{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [self._expand(v, f"{id}{REF_SEP}{i}") for i, v in enumerate(value)]
        if isinstance(value, str) and value[:1] in ("@", "%", "$"):
            try:
                value = resolve_relative(id, value)
            except ValueError as exc:
                raise BundleConfigError(f"{self._where(id)}: {exc}") from None
            if value.startswith("%"):
                return copy.deepcopy(self._macro(value[1:], id))
        return value

    def _macro(self, spec: str, id: str) -> Any:
        match = _PATH_ID.match(spec)
        source: Any = self._config
        target = spec
        if match:
            path_text = match.group(1)
            target = spec[len(path_text):].removeprefix(REF_SEP)
            source = self._file(path_text, id)
        try:
            return lookup(source, target)
        except KeyError:
            raise BundleConfigError(f"{self._where(id)}: macro '%{spec}' names no item") from None

    def _file(self, spelled: str, id: str) -> Any:
        candidates = [Path(spelled)] if Path(spelled).is_absolute() else [
            self._root / spelled, self._root / CONFIG_DIR / spelled]
        for path in candidates:
            try:
                resolved = _inside(self._root, path, spelled)
            except BundleConfigError as exc:
                raise BundleConfigError(f"{self._where(id)}: macro file {exc}") from None
            if resolved.is_file():
                if resolved not in self._files:
                    self._files[resolved] = load_file(resolved)
                return self._files[resolved]
        raise BundleConfigError(f"{self._where(id)}: macro file {spelled!r} not found in the bundle")


def read_configs(root: Path, names: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Merge the named config files (later ones override top-level keys, ``a::b`` keys set nested items) and
    return the config and, per top-level key, the file it came from."""
    config: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for name in names:
        path = find_config(root, name)
        data = load_file(path)
        if not isinstance(data, dict):
            raise BundleConfigError(f"{path.name}: must be a JSON/YAML object")
        for key, value in data.items():
            key = normalize_id(str(key))
            if REF_SEP in key:
                try:
                    assign(config, key, value)
                except KeyError:
                    raise BundleConfigError(f"{path.name}: {key}: no such item to override") from None
            else:
                config[key] = value
            origin.setdefault(split_id(key)[0], path.name)
    return config, origin


def read_metadata(root: Path) -> dict[str, Any]:
    """``configs/metadata.json`` as a dict (empty when the bundle has none)."""
    path = root / CONFIG_DIR / METADATA_FILE
    if not path.is_file():
        return {}
    data = load_file(_inside(root, path, METADATA_FILE))
    if not isinstance(data, dict):
        raise BundleConfigError(f"{METADATA_FILE}: must be a JSON object")
    return data


def channel_def(metadata: Mapping[str, Any]) -> dict[int, str]:
    """``network_data_format.outputs.<first>.channel_def`` as ``{index: name}`` (empty when absent)."""
    outputs = metadata.get("network_data_format", {}).get("outputs", {})
    if not isinstance(outputs, Mapping) or not outputs:
        return {}
    first = next(iter(outputs.values()))
    channels = first.get("channel_def", {}) if isinstance(first, Mapping) else {}
    try:
        return {int(k): str(v) for k, v in channels.items()}
    except (TypeError, ValueError, AttributeError):
        raise BundleConfigError(f"{METADATA_FILE}: network_data_format::outputs: channel_def keys must be "
                                "channel numbers") from None


def data_key(metadata: Mapping[str, Any], section: str, default: str) -> str:
    """The first key of ``network_data_format.<section>`` (``image`` / ``pred``), else ``default``."""
    entries = metadata.get("network_data_format", {}).get(section, {})
    return str(next(iter(entries))) if isinstance(entries, Mapping) and entries else default

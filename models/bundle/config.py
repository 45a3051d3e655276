""":class:`BundleConfig`: one bundle's metadata and inference config, checked and built on demand."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from models.bundle import parser
from models.bundle.expr import normalize_id
from models.bundle.resolve import Checker, Replaced, Resolver
from models.errors import BundleConfigError

#: The items a runner uses; :meth:`BundleConfig.check` checks these by default.
RUN_IDS = ("network_def", "preprocessing", "inferer", "postprocessing")
_JSONISH = (str, int, float, bool, type(None), list, dict)


class BundleConfig:
    """A bundle's ``configs/metadata.json`` and inference config (``configs/inference.json|yaml`` by default).

    Reading parses the files and expands macros and relative ids; nothing is built until :meth:`get` (or the
    shortcuts) asks for an item. ``overrides`` replace items by id before anything is built: JSON-like values
    are config (``{"device": "$torch.device('cpu')"}``), other values are taken as built objects
    (``{"device": torch.device("cpu")}``). ``bundle_root`` is always the bundle directory.
    """

    def __init__(self, root: Path, config: dict[str, Any], metadata: dict[str, Any], origin: Mapping[str, str],
                 objects: Mapping[str, Any] | None = None) -> None:
        self.root = root
        self.config = config
        self.metadata = metadata
        self._origin = dict(origin)
        self._primary = next(iter(self._origin.values()), "config")
        self._objects = dict(objects or {})
        self._resolver = Resolver(self.config, self.where, self._objects)

    @classmethod
    def read(cls, bundle_dir: str | Path, config: str | Sequence[str] = "inference",
             overrides: Mapping[str, Any] | None = None) -> BundleConfig:
        """Read ``bundle_dir``'s metadata and the named config file(s) (later files override earlier ones)."""
        root = Path(bundle_dir)
        if not root.is_dir():
            raise BundleConfigError(f"{root}: no such bundle directory")
        names = [config] if isinstance(config, str) else list(config)
        raw, origin = parser.read_configs(root, names)
        metadata = parser.read_metadata(root)
        objects: dict[str, Any] = {}
        for key, value in {"bundle_root": str(root), **(overrides or {})}.items():
            key = normalize_id(key)
            if isinstance(value, _JSONISH):
                try:
                    parser.assign(raw, key, copy.deepcopy(value))
                except KeyError:
                    raise BundleConfigError(f"override {key!r}: no such item") from None
            else:
                objects[key] = value
        self = cls(root, raw, metadata, origin, objects)
        try:
            parser.Expander(root, raw, self.where).run()
        except RecursionError:
            raise BundleConfigError(f"{self._primary}: nested too deeply") from None
        return self

    def where(self, id: str) -> str:
        """``inference.json: preprocessing::transforms::0``: the file an id came from, and the id."""
        top = parser.split_id(id)[:1]
        return f"{self._origin.get(top[0], self._primary) if top else self._primary}: {id}"

    # -- metadata --------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return str(self.metadata.get("name") or self.root.name)

    @property
    def version(self) -> str:
        return str(self.metadata.get("version") or "unknown")

    @property
    def channel_def(self) -> dict[int, str]:
        """Output channel -> name, from ``network_data_format.outputs`` (``{0: "background", 1: "spleen"}``)."""
        return parser.channel_def(self.metadata)

    @property
    def input_key(self) -> str:
        return parser.data_key(self.metadata, "inputs", "image")

    @property
    def output_key(self) -> str:
        return parser.data_key(self.metadata, "outputs", "pred")

    # -- config ----------------------------------------------------------------------------------------------
    def ids(self) -> list[str]:
        """The top-level ids of the config."""
        return list(self.config)

    def __contains__(self, id: object) -> bool:
        try:
            parser.lookup(self.config, normalize_id(str(id)))
        except KeyError:
            return False
        return True

    def raw(self, id: str) -> Any:
        """The config at ``id`` (macros expanded), as read; nothing is built."""
        try:
            return copy.deepcopy(parser.lookup(self.config, normalize_id(id)))
        except KeyError:
            raise BundleConfigError(f"{self.where(normalize_id(id))}: no such item") from None

    def check(self, *ids: str) -> None:
        """Check ``ids`` (default :data:`RUN_IDS` that exist) and all they reference against the expression
        grammar and the allow-list, without importing torch or MONAI; raise :class:`BundleConfigError`."""
        wanted = ids or tuple(i for i in RUN_IDS if i in self)
        checker = Checker(self.config, self.where, set(self._objects))
        for id in wanted:
            try:
                checker.check(id)
            except RecursionError:
                raise BundleConfigError(f"{self.where(id)}: nested too deeply") from None

    def get(self, id: str) -> Any:
        """The built item ``id`` (cached: the same object on every call and for every reference)."""
        try:
            return self._resolver.get(id)
        except RecursionError:
            raise BundleConfigError(f"{self.where(id)}: nested too deeply") from None

    @property
    def replaced(self) -> list[Replaced]:
        """Items left out of the lists built so far because the node supplies them (``LoadImaged``...)."""
        return list(self._resolver.replaced)

    def weights_path(self) -> Path:
        """The state dict the bundle loads: ``checkpointloader::load_path`` when it is there and evaluates (safely)
        to a file inside the bundle (``"$@bundle_root + '/models/' + @modelname"``), else ``models/model.pt``."""
        default = self.root / "models" / "model.pt"
        if "checkpointloader::load_path" not in self:
            return default
        try:
            value = self.get("checkpointloader::load_path")
        except BundleConfigError:  # e.g. os.path.join(...): not in the grammar; the usual place then
            return default
        if not isinstance(value, str):
            return default
        path = Path(value) if Path(value).is_absolute() else self.root / value
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise BundleConfigError(f"{self.where('checkpointloader::load_path')}: {value!r} is outside the bundle")
        return path

    # -- the items a runner uses -----------------------------------------------------------------------------
    def network(self) -> Any:
        """``network_def`` built (on the CPU, not moved to any device, not in eval mode)."""
        return self.get("network_def")

    def inferer(self) -> Any:
        return self.get("inferer")

    def preprocessing(self) -> Any:
        return self._compose("preprocessing")

    def postprocessing(self) -> Any:
        return self._compose("postprocessing")

    def _compose(self, id: str) -> Any:
        """The item as a MONAI ``Compose`` (a bare list of transforms is wrapped)."""
        built = self.get(id)
        if isinstance(built, list):
            from monai.transforms import Compose

            return Compose(built)
        return built

"""Building objects from a parsed bundle config by id, lazily, with cycle detection; and the same walk as a
static check that builds nothing.

An item is built the first time it is needed and cached by id, so two references to ``@preprocessing`` (the
Compose itself and ``Invertd``'s ``transform``) are one object. A dict with ``_target_`` is built by calling the
allow-listed constructor with its other keys (``_disabled_`` items are left out of their list or dict,
``_requires_`` is resolved first, ``_desc_`` is ignored, ``_mode_`` must be "default"); a ``$`` string is a
:mod:`models.bundle.expr` expression; a whole ``@id`` string is that item. ``LoadImage[d]``/``SaveImage[d]``
inside a list are left out and recorded in :attr:`Resolver.replaced`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from models.bundle import allow, expr
from models.bundle.expr import REF_SEP, normalize_id
from models.bundle.parser import lookup
from models.errors import BundleConfigError

NON_ARG_KEYS = frozenset({"_target_", "_disabled_", "_requires_", "_desc_", "_mode_"})
MODES = frozenset({"default"})
_DISABLED = object()
log = logging.getLogger(__name__)


@contextmanager
def _quiet(where: str) -> Iterator[None]:
    """MONAI's deprecation notices about a bundle's (unchanged) arguments go to the DEBUG log, not to the caller."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught:
        log.debug("%s: %s: %s", where, warning.category.__name__, warning.message)


@dataclass(frozen=True)
class Replaced:
    """An item the node supplies itself instead of building it (data input, output writing)."""

    id: str
    target: str
    reason: str


def _sub(id: str, key: str | int) -> str:
    return f"{id}{REF_SEP}{key}" if id else str(key)


def _is_component(value: Any) -> bool:
    return isinstance(value, Mapping) and "_target_" in value


def _replaced_target(value: Any) -> str | None:
    """The name of a ``_target_`` the node replaces (``LoadImaged``, ``monai.transforms.SaveImaged``...), else None."""
    target = value.get("_target_") if _is_component(value) else None
    if not isinstance(target, str):
        return None
    name = target.rsplit(".", 1)[-1]
    return name if name in allow.REPLACED and (target == name or target.startswith("monai.")) else None


class _Walk:
    """Shared raw access, cycle detection and error naming."""

    def __init__(self, config: Mapping[str, Any], where: Callable[[str], str]) -> None:
        self._config = config
        self._where = where
        self._stack: list[str] = []

    def error(self, id: str, message: str) -> BundleConfigError:
        return BundleConfigError(f"{self._where(id)}: {message}")

    def raw(self, id: str, referrer: str | None = None) -> Any:
        try:
            return lookup(self._config, id)
        except KeyError:
            if referrer is None:
                raise BundleConfigError(f"{self._where(id)}: no such item") from None
            raise self.error(referrer, f"reference '@{id}' names no item") from None

    def enter(self, id: str, referrer: str | None) -> None:
        for busy in self._stack:
            if busy == id or busy.startswith(id + REF_SEP):
                chain = " -> ".join([*self._stack[self._stack.index(busy):], id])
                raise self.error(referrer or id, f"reference cycle: {chain}")
        self._stack.append(id)

    def leave(self) -> None:
        self._stack.pop()

    def mode(self, value: Mapping[str, Any], id: str) -> None:
        mode = value.get("_mode_", "default")
        if mode not in MODES:
            raise self.error(id, f"_mode_ {mode!r} is not supported (only 'default')")

    def target(self, value: Mapping[str, Any], id: str, *, in_list: bool) -> allow.Entry | None:
        """The allow-list entry of a string ``_target_``; None for a ``$``/``@`` target (checked when built)."""
        target = value["_target_"]
        if not isinstance(target, str):
            raise self.error(id, f"_target_ must be a string, got {type(target).__name__}")
        if target[:1] in ("$", "@"):
            return None
        replaced = _replaced_target(value)
        if replaced is not None and not in_list:
            raise self.error(id, f"_target_ {target!r} is not built: {allow.REPLACED[replaced]}")
        entry = allow.find(target)
        if entry is None:
            raise self.error(id, f"_target_ {target!r} is not allowed")
        return entry

    def parse(self, text: str, id: str) -> expr.Expression | None:
        """The parsed ``$`` expression at ``id`` (None for ``$import ...``, which is never executed)."""
        body = text[1:]
        if expr.is_import(body):
            return None
        try:
            return expr.parse(body)
        except expr.ExpressionError as exc:
            raise self.error(id, f"{exc} in {text[:80]!r}") from None


class Checker(_Walk):
    """Checks items and everything they reference against the grammar and the allow-list; builds nothing."""

    def __init__(self, config: Mapping[str, Any], where: Callable[[str], str], known: set[str]) -> None:
        super().__init__(config, where)
        self._done: set[str] = set(known)

    def check(self, id: str, referrer: str | None = None) -> None:
        id = normalize_id(id)
        if id in self._done:
            return
        raw = self.raw(id, referrer)
        self.enter(id, referrer)
        try:
            self._value(raw, id, in_list=False)
        finally:
            self.leave()
        self._done.add(id)

    def _value(self, value: Any, id: str, *, in_list: bool) -> None:
        if _is_component(value):
            disabled = value.get("_disabled_", False)
            if disabled is True or (isinstance(disabled, str) and disabled.strip().lower() == "true"):
                return
            if in_list and _replaced_target(value):
                return
            self.mode(value, id)
            self.target(value, id, in_list=in_list)
            for key, item in value.items():
                if key not in ("_desc_", "_mode_"):
                    self._value(item, _sub(id, key), in_list=False)
        elif isinstance(value, Mapping):
            for key, item in value.items():
                self._value(item, _sub(id, key), in_list=False)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                self._value(item, _sub(id, i), in_list=True)
        elif isinstance(value, str) and value.startswith("$"):
            parsed = self.parse(value, id)
            for ref in parsed.refs.values() if parsed else ():
                self.check(ref, id)
        elif isinstance(value, str) and value.startswith("@"):
            self.check(value[1:], id)


class Resolver(_Walk):
    """Builds items by id; ``objects`` are prebuilt values by id (overrides such as a device)."""

    def __init__(self, config: Mapping[str, Any], where: Callable[[str], str],
                 objects: Mapping[str, Any] | None = None) -> None:
        super().__init__(config, where)
        self._cache: dict[str, Any] = {normalize_id(k): v for k, v in (objects or {}).items()}
        self.replaced: list[Replaced] = []

    def get(self, id: str, referrer: str | None = None) -> Any:
        id = normalize_id(id)
        if id in self._cache:
            return self._cache[id]
        raw = self.raw(id, referrer)
        self.enter(id, referrer)
        try:
            value = self._build(raw, id)
        finally:
            self.leave()
        if value is _DISABLED:
            raise self.error(referrer or id, f"'{id}' is disabled")
        return value

    def _build(self, value: Any, id: str) -> Any:
        """The built value of ``value`` (the raw config at ``id``), cached per id."""
        if id in self._cache:
            return self._cache[id]
        if _is_component(value):
            built = self._component(value, id)
        elif isinstance(value, Mapping):
            built = {}
            for key, item in value.items():
                out = self._child(item, _sub(id, key))
                if out is not _DISABLED:
                    built[key] = out
        elif isinstance(value, list):
            built = []
            for i, item in enumerate(value):
                name = _replaced_target(item)
                if name is not None:
                    if not self._disabled(item, _sub(id, i)):
                        self.replaced.append(Replaced(_sub(id, i), str(item["_target_"]), allow.REPLACED[name]))
                    continue
                out = self._child(item, _sub(id, i))
                if out is not _DISABLED:
                    built.append(out)
        elif isinstance(value, str) and value.startswith("$"):
            built = self._expression(value, id)
        elif isinstance(value, str) and value.startswith("@"):
            built = self.get(value[1:], id)
        else:
            return value
        self._cache[id] = built
        return built

    def _child(self, value: Any, id: str) -> Any:
        if id in self._cache:
            return self._cache[id]
        self.enter(id, None)
        try:
            return self._build(value, id)
        finally:
            self.leave()

    def _expression(self, text: str, id: str) -> Any:
        parsed = self.parse(text, id)
        if parsed is None:
            return None
        try:
            with _quiet(self._where(id)):
                return expr.evaluate(parsed, lambda ref: self.get(ref, id))
        except BundleConfigError:
            raise
        except expr.ExpressionError as exc:
            raise self.error(id, f"{exc} in {text[:80]!r}") from None
        except Exception as exc:  # whatever an allowed call raises on bad arguments
            raise self.error(id, f"evaluating {text[:80]!r} failed: {type(exc).__name__}: {exc}") from None

    def _disabled(self, value: Mapping[str, Any], id: str) -> bool:
        flag = value.get("_disabled_", False)
        if isinstance(flag, str) and flag[:1] in ("$", "@"):
            flag = self._child(flag, _sub(id, "_disabled_"))
        return flag.strip().lower() == "true" if isinstance(flag, str) else bool(flag)

    def _component(self, value: Mapping[str, Any], id: str) -> Any:
        if self._disabled(value, id):
            return _DISABLED
        self.mode(value, id)
        entry = self.target(value, id, in_list=False)
        if "_requires_" in value:
            self._child(value["_requires_"], _sub(id, "_requires_"))
        if entry is None:
            func = self._child(value["_target_"], _sub(id, "_target_"))
            if not callable(func) or not allow.may_call(func):
                raise self.error(id, f"_target_ {value['_target_']!r} is not an allowed callable")
            name = str(value["_target_"])
        else:
            try:
                func = allow.load(entry, value["_target_"])
            except (ImportError, AttributeError, LookupError) as exc:
                raise self.error(id, f"_target_ {value['_target_']!r} cannot be loaded: {exc}") from None
            name = entry.name
        kwargs: dict[str, Any] = {}
        for key, item in value.items():
            if key in NON_ARG_KEYS:
                continue
            out = self._child(item, _sub(id, key))
            if out is not _DISABLED:
                kwargs[str(key)] = out
        try:
            with _quiet(self._where(id)):
                return func(**kwargs)
        except Exception as exc:  # a constructor rejecting its arguments: many exception types
            raise self.error(id, f"building {name} failed: {type(exc).__name__}: {exc}") from None

"""A result computed from a volume, kept for the next model that asks for it on the same volume.

ct-hu-segmentation, ct-lung-nodules and ct-emphysema all begin with the same masks (body, lungs,
airways: :func:`models.ct_hu_segmentation.model.chest_masks`). When one process runs them on the
same :class:`Volume` object (a worker that loads a study once for all its jobs) a
:class:`VolumeCache` lets the first compute them and the others reuse them. A result is reused only
for the same voxel array object, read-only (the loader's arrays are; nothing can then change the
voxels under the cache), with the same affine and key; it is dropped when that array is
garbage-collected or when a newer volume takes its place (one volume is kept).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import numpy as np
import numpy.typing as npt

from models.base import Volume

_T = TypeVar("_T")
_Voxels = npt.NDArray[np.float32]


class VolumeCache(Generic[_T]):
    """The result of the most recent read-only volume (one entry, weakly tied to its voxel array)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()  # the weakref callback may run inside a locked section
        self._key: tuple[Hashable, ...] | None = None
        self._voxels: weakref.ref[_Voxels] | None = None
        self._value: _T | None = None

    def get(self, volume: Volume, key: Hashable, compute: Callable[[], _T]) -> _T:
        """``compute()``, or the value it gave for this volume (same array, affine and ``key``)."""
        voxels = volume.voxels
        if voxels.flags.writeable:
            return compute()
        full_key = (voxels.shape, volume.affine.tobytes(), key)
        with self._lock:
            if self._key == full_key and self._voxels is not None and self._voxels() is voxels:
                assert self._value is not None
                return self._value
        value = compute()
        with self._lock:
            self._key, self._voxels, self._value = full_key, weakref.ref(voxels, self._forget), value
        return value

    def clear(self) -> None:
        """Forget the kept value."""
        with self._lock:
            self._key = self._voxels = self._value = None

    def _forget(self, ref: weakref.ref[_Voxels]) -> None:
        with self._lock:
            if self._voxels is ref:
                self._key = self._voxels = self._value = None

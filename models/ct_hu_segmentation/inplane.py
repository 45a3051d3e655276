"""Fast in-plane binary morphology and a thread map, shared by the classical CT models.

In-plane erosion and dilation by a symmetric footprint whose rows are centred runs (a digital
disk, an ellipse, a diamond): such a footprint is the union of centred rectangles, one per
distinct run length, and a rectangle is separable. Eroding by a union is the intersection of the
erosions by its parts (dilating: the union of the dilations), so each part costs two 1-D
windowed AND (OR) passes (:func:`run_filter`), instead of one test per footprint pixel per voxel.
Outside the array counts as background, as with ``scipy.ndimage.binary_erosion`` /
``binary_dilation`` (``border_value=0``), whose results these equal exactly.

:func:`thread_map` runs independent pieces of work (slabs of slices, scales) on the threads the
worker allows: scipy.ndimage's filters and numpy's element-wise operations release the GIL.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import numpy.typing as npt

BoolArray = npt.NDArray[np.bool_]
_T = TypeVar("_T")
_R = TypeVar("_R")
_A = TypeVar("_A", bound=np.generic)


def threads() -> int:
    """Threads this process may use: the BLAS/OpenMP thread cap (the worker sets it per child, see
    ``workers.celery_app``), at most the CPUs it may run on; at least 1."""
    from threadpoolctl import threadpool_info

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    caps = [int(info["num_threads"]) for info in threadpool_info() if info.get("num_threads")]
    return max(1, min([cpus, *caps]))


def thread_map(fn: Callable[[_T], _R], items: Iterable[_T], workers: int | None = None) -> list[_R]:
    """``[fn(x) for x in items]``, on ``workers`` threads (default :func:`threads`) when more than one."""
    todo = list(items)
    n = min(workers or threads(), len(todo))
    if n <= 1:
        return [fn(x) for x in todo]
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(fn, todo))


def both(first: Callable[[], _T], second: Callable[[], _R]) -> tuple[_T, _R]:
    """``(first(), second())``, the two at once on two threads when :func:`threads` allows."""
    if threads() < 2:
        return first(), second()
    with ThreadPoolExecutor(max_workers=1) as pool:
        later = pool.submit(second)
        return first(), later.result()


def diamond(radius: int) -> BoolArray:
    """The 2-D footprint of ``radius`` iterated 4-neighbour (cross) steps."""
    jj, ii = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return np.asarray(np.abs(jj) + np.abs(ii) <= radius)


def _rectangles(footprint: BoolArray) -> list[tuple[int, int]]:
    """(half height, half width) of centred rectangles whose union is ``footprint`` (2-D, odd sides)."""
    rows, cols = footprint.shape
    if rows % 2 == 0 or cols % 2 == 0:
        raise ValueError(f"footprint sides must be odd, got {footprint.shape}")
    cj, ci = rows // 2, cols // 2
    widths = {}
    for dj in range(cj + 1):
        row = np.flatnonzero(footprint[cj + dj])
        if row.size == 0:
            break
        widths[dj] = int(ci - row[0])
    rects: list[tuple[int, int]] = []
    for dj, w in widths.items():  # keep the tallest rectangle of each width
        if dj + 1 not in widths or widths[dj + 1] != w:
            rects.append((dj, w))
    union = np.zeros_like(footprint)
    for hj, hi in rects:
        union[cj - hj : cj + hj + 1, ci - hi : ci + hi + 1] = True
    if not np.array_equal(union, footprint):
        raise ValueError("footprint is not a union of centred rectangles (rows must be centred, shrinking runs)")
    return rects


def run_filter(a: npt.NDArray[_A], length: int, axis: int, op: np.ufunc, outside: float | bool) -> npt.NDArray[_A]:
    """``op`` (``np.minimum``, ``np.maximum``, ``np.logical_and``, ``np.logical_or``) over the centred
    window of ``length`` (odd) along ``axis``; beyond the array the value is ``outside``.

    The window is built by doubling (log2(length) passes of ``op`` on shifted views), which numpy
    vectorises: several times faster than ``scipy.ndimage.minimum_filter1d`` for short windows.
    """
    half = length // 2
    if half == 0:
        return a.copy()
    axis %= a.ndim
    shape = list(a.shape)
    shape[axis] += 2 * half
    cur = np.full(shape, outside, dtype=a.dtype)
    cur[_along(axis, half, half + a.shape[axis])] = a
    width = 1
    while width < length:
        step = min(width, length - width)
        size = cur.shape[axis]
        cur = op(cur[_along(axis, 0, size - step)], cur[_along(axis, step, size)])
        width += step
    return cur


def _along(axis: int, start: int, stop: int) -> tuple[slice, ...]:
    return (slice(None),) * axis + (slice(start, stop),)


def _rect_filter(mask: BoolArray, hj: int, hi: int, op: np.ufunc) -> BoolArray:
    out = run_filter(mask, 2 * hi + 1, -1, op, False)
    return run_filter(out, 2 * hj + 1, -2, op, False)


def erode(mask: BoolArray, footprint: BoolArray) -> BoolArray:
    """In-plane (last two axes) binary erosion of ``mask`` by ``footprint``; outside is background."""
    parts = [_rect_filter(mask, hj, hi, np.logical_and) for hj, hi in _rectangles(footprint)]
    return functools.reduce(np.logical_and, parts[1:], parts[0])


def dilate(mask: BoolArray, footprint: BoolArray) -> BoolArray:
    """In-plane (last two axes) binary dilation of ``mask`` by a symmetric ``footprint``."""
    parts = [_rect_filter(mask, hj, hi, np.logical_or) for hj, hi in _rectangles(footprint)]
    return functools.reduce(np.logical_or, parts[1:], parts[0])

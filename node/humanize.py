"""Durations and sizes for people: one convention for the CLI tables and the dashboard."""

from __future__ import annotations


def duration(seconds: float | None, none: str = "-") -> str:
    """``850 ms``, ``12.3 s``, ``4 min 05 s``, ``2 h 10 min``, ``3 d 04 h``; ``none`` for None (a negative
    duration, from clocks of two hosts, shows as 0)."""
    if seconds is None:
        return none
    seconds = max(seconds, 0.0)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    if seconds < 86400:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    return f"{int(seconds // 86400)} d {int(seconds % 86400 // 3600):02d} h"


def size(n: float | None, none: str = "-") -> str:
    """Bytes in powers of 1000, like ``df -H`` and MB/s: ``512 B``, ``3.4 MB``; ``none`` for None."""
    if n is None:
        return none
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"  # unreachable: the loop returns at TB

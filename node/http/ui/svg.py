"""Charts drawn by the server as inline SVG (no chart library, no script): a line chart of one or more
hourly series with gaps where a value is missing. Only numbers and fixed labels go into the markup;
the labels are escaped anyway."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

WIDTH, HEIGHT = 640, 180
LEFT, RIGHT, TOP, BOTTOM = 48, 12, 12, 24
COLOURS = ("#2b6cb0", "#c05621", "#2f855a")


@dataclass(frozen=True)
class Line:
    label: str
    values: Sequence[float | None]


def _nice_max(top: float) -> float:
    """A round upper bound at or above ``top`` (1, 2, 5 x 10^n)."""
    if top <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(top))
    return next(m * exp for m in (1, 2, 5, 10) if m * exp >= top)


def _fmt(v: float) -> str:
    return f"{v:.0f}" if v >= 10 or v == int(v) else f"{v:.2g}"


def line_chart(title: str, starts: Sequence[float], lines: Sequence[Line], unit: str = "") -> Markup:
    """An SVG line chart: x = the hours ``starts`` (UNIX seconds), one polyline per :class:`Line`."""
    n = len(starts)
    top = _nice_max(max((v for line in lines for v in line.values if v is not None), default=0.0))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(i: int) -> float:
        return LEFT + (plot_w * i / (n - 1) if n > 1 else plot_w / 2)

    def y(v: float) -> float:
        return TOP + plot_h * (1 - v / top)

    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}">',
             f"<title>{escape(title)}</title>"]
    for frac in (0, 0.5, 1):
        gy = y(top * frac)
        parts.append(f'<line x1="{LEFT}" y1="{gy:.1f}" x2="{WIDTH - RIGHT}" y2="{gy:.1f}" class="grid"/>')
        parts.append(f'<text x="{LEFT - 4}" y="{gy + 4:.1f}" text-anchor="end">{_fmt(top * frac)}'
                     f"{escape(unit) if frac == 1 else ''}</text>")
    for i in range(0, n, max(1, n // 6)):
        label = time.strftime("%H:%M", time.localtime(starts[i]))
        parts.append(f'<text x="{x(i):.1f}" y="{HEIGHT - 6}" text-anchor="middle">{label}</text>')
    for k, line in enumerate(lines):
        colour = COLOURS[k % len(COLOURS)]
        segment: list[str] = []
        segments: list[list[str]] = []
        for i, v in enumerate(line.values):
            if v is None:
                if segment:
                    segments.append(segment)
                segment = []
                continue
            segment.append(f"{x(i):.1f},{y(v):.1f}")
            parts.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="2.5" fill="{colour}">'
                         f"<title>{escape(line.label)} {_fmt(v)}{escape(unit)}</title></circle>")
        if segment:
            segments.append(segment)
        for seg in segments:
            parts.append(f'<polyline points="{" ".join(seg)}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts.append(f'<text x="{LEFT + 8 + 110 * k}" y="{TOP + 12}" fill="{colour}" class="legend">'
                     f"{escape(line.label)}</text>")
    parts.append("</svg>")
    return Markup("".join(parts))

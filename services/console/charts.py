"""Line charts as inline SVG, rendered on the server: values in, markup out (pure, no I/O).

Pixel positions are computed in floating point; the numbers shown (axis labels, titles) are the
exact values formatted, so no rounding of the data reaches a reader.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from html import escape

from markupsafe import Markup

WIDTH, HEIGHT = 720, 220
LEFT, RIGHT, TOP, BOTTOM = 64, 12, 12, 28
#: Colours picked for contrast on white and from each other (Okabe-Ito palette).
COLOURS = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#d55e00", "#56b4e9", "#f0e442", "#000")


@dataclass(frozen=True, slots=True)
class Series:
    name: str
    points: Sequence[tuple[datetime, Decimal | int]]


def _label(value: Decimal | float) -> str:
    number = Decimal(str(value))
    for limit, suffix in ((Decimal(10**9), "G"), (Decimal(10**6), "M"), (Decimal(10**3), "k")):
        if abs(number) >= limit:
            return f"{(number / limit).quantize(Decimal('0.1')).normalize():f}{suffix}"
    if number == number.to_integral_value():
        return f"{number.quantize(Decimal(1)):f}"
    return f"{number.quantize(Decimal('0.01')).normalize():f}"


def line_chart(series: Sequence[Series], *, title: str, unit: str = "") -> Markup:
    """An accessible SVG line chart of one or more series over time (empty data: a note)."""
    points = [p for s in series for p in s.points]
    label = escape(title)
    if not points:
        return Markup(f'<p class="chart-empty">{label}: no data in this range.</p>')  # noqa: S704 - escaped
    times = [p[0].timestamp() for p in points]
    values = [float(p[1]) for p in points]
    t0, t1 = min(times), max(times)
    top = max(values) if max(values) > 0 else 1.0
    bottom = min(0.0, *values)
    span_t = (t1 - t0) or 1.0
    span_v = (top - bottom) or 1.0
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(t: float) -> float:
        return LEFT + (t - t0) / span_t * plot_w

    def y(v: float) -> float:
        return TOP + plot_h - (v - bottom) / span_v * plot_h

    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{label}" preserveAspectRatio="xMidYMid meet">',
        f"<title>{label}</title>",
    ]
    for fraction in (0.0, 0.5, 1.0):
        value = bottom + fraction * span_v
        parts.append(
            f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(value):.1f}" '
            f'y2="{y(value):.1f}"/><text class="axis" x="{LEFT - 6}" y="{y(value) + 4:.1f}" '
            f'text-anchor="end">{escape(_label(value))}{escape(unit)}</text>'
        )
    first, last = min(p[0] for p in points), max(p[0] for p in points)
    fmt = (
        "%H:%M:%S"
        if (t1 - t0) < 3600
        else "%Y-%m-%d %H:%M"
        if (t1 - t0) < 3 * 86400
        else "%Y-%m-%d"
    )
    parts.append(
        f'<text class="axis" x="{LEFT}" y="{HEIGHT - 8}">{first.strftime(fmt)}</text>'
        f'<text class="axis" x="{WIDTH - RIGHT}" y="{HEIGHT - 8}" text-anchor="end">'
        f"{last.strftime(fmt)}</text>"
    )
    for index, line in enumerate(series):
        colour = COLOURS[index % len(COLOURS)]
        ordered = sorted(line.points, key=lambda p: p[0])
        coords = " ".join(f"{x(p[0].timestamp()):.1f},{y(float(p[1])):.1f}" for p in ordered)
        if len(ordered) == 1:
            px, py = x(ordered[0][0].timestamp()), y(float(ordered[0][1]))
            parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{colour}"/>')
        else:
            parts.append(
                f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{coords}">'
                f"<title>{escape(line.name)}</title></polyline>"
            )
    parts.append("</svg>")
    legend = "".join(
        f'<li><svg class="swatch" viewBox="0 0 10 10" aria-hidden="true"><rect width="10" '
        f'height="10" fill="{COLOURS[i % len(COLOURS)]}"/></svg>{escape(s.name)}</li>'
        for i, s in enumerate(series)
    )
    # Every piece of text inside was escaped above; the rest is markup made here.
    return Markup(  # noqa: S704
        f'<figure class="chart-box">{"".join(parts)}'
        f'<figcaption>{label}<ul class="legend">{legend}</ul></figcaption></figure>'
    )

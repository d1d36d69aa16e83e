"""A fine-tuning job's loss curves as a standalone SVG line chart, with no dependencies.

`loss_chart_svg` draws `train_loss` and `valid_loss` as lines and `full_valid_loss` as dots
against `step`. The output is one self-contained SVG document (no scripts, fonts or links), so
it can be served as `image/svg+xml` or saved and opened in any browser. Long runs are
downsampled so the document stays small whatever the number of steps.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape

Row = Mapping[str, float | int | None]
_Projection = Callable[[float], float]

MIN_WIDTH = 240
MIN_HEIGHT = 160
# Each series keeps at most this many vertices (two per bucket: the bucket's min and max), so a
# spike or dip survives downsampling while a 100k-step run still renders as a few tens of KB.
MAX_POINTS_PER_SERIES = 1000
# A loss this large comes from a diverged run and is as unplottable as inf; dropping it also
# keeps range arithmetic (hi - lo, tick multiples) from overflowing.
MAX_MAGNITUDE = 1e100
TARGET_TICKS = 6

MARGIN_LEFT = 68
MARGIN_RIGHT = 24
MARGIN_TOP = 60
MARGIN_BOTTOM = 48

# Characters XML 1.0 forbids even when escaped; a model name containing one must not make the
# whole document unparseable.
_INVALID_XML_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


@dataclass(frozen=True)
class _Series:
    key: str
    label: str
    color: str
    as_markers: bool


SERIES = (
    _Series("train_loss", "train loss", "#1f77b4", as_markers=False),
    _Series("valid_loss", "valid loss", "#ff7f0e", as_markers=False),
    _Series("full_valid_loss", "full valid loss", "#2ca02c", as_markers=True),
)


@dataclass(frozen=True)
class _Axis:
    low: float
    high: float
    ticks: list[float]
    tick_step: float

    def fraction(self, value: float) -> float:
        return (value - self.low) / (self.high - self.low)


def loss_chart_svg(
    points: Sequence[Mapping[str, float | int | None]],
    *,
    title: str,
    width: int = 800,
    height: int = 420,
) -> str:
    """Render per-step metric rows as an SVG line chart of loss against step.

    Rows may arrive in any order and any key may be missing, None, NaN or infinite; such values
    are skipped. With nothing to plot the chart says "No metrics yet".
    """
    if width < MIN_WIDTH or height < MIN_HEIGHT:
        raise ValueError(f"chart must be at least {MIN_WIDTH}x{MIN_HEIGHT}, got {width}x{height}")

    series_points = {series.key: _collect(points, series.key) for series in SERIES}
    present = [series for series in SERIES if series_points[series.key]]

    parts = [_header(title, width, height)]
    if not present:
        parts.append(
            f'<text x="{width / 2:.1f}" y="{(MARGIN_TOP + height) / 2:.1f}" '
            'text-anchor="middle" font-size="14" fill="#666">No metrics yet</text>'
        )
        parts.append("</svg>")
        return "\n".join(parts)

    plotted = [point for series in present for point in series_points[series.key]]
    all_integer_steps = all(step.is_integer() for step, _ in plotted)
    x_axis = _nice_axis(
        min(step for step, _ in plotted),
        max(step for step, _ in plotted),
        integer=all_integer_steps,
    )
    y_axis = _nice_axis(
        min(value for _, value in plotted), max(value for _, value in plotted), integer=False
    )

    left, top = MARGIN_LEFT, MARGIN_TOP
    right, bottom = width - MARGIN_RIGHT, height - MARGIN_BOTTOM

    def to_x(step: float) -> float:
        return left + x_axis.fraction(step) * (right - left)

    def to_y(value: float) -> float:
        return bottom - y_axis.fraction(value) * (bottom - top)

    parts.append(_grid_and_axes(x_axis, y_axis, left, top, right, bottom, to_x, to_y))
    parts.append(_legend(present, left, top))
    for series in present:
        vertices = [
            (to_x(step), to_y(value))
            for step, value in _downsample(series_points[series.key], MAX_POINTS_PER_SERIES)
        ]
        parts.append(_draw_series(series, vertices))
    parts.append("</svg>")
    return "\n".join(parts)


def _collect(rows: Sequence[Row], key: str) -> list[tuple[float, float]]:
    """The (step, value) pairs of one metric that can be plotted, sorted by step."""
    collected = []
    for row in rows:
        step = _plottable(row.get("step"))
        value = _plottable(row.get(key))
        if step is not None and value is not None:
            collected.append((step, value))
    collected.sort(key=lambda pair: pair[0])
    return collected


def _plottable(raw: object) -> float | None:
    # numbers.Real also admits numpy scalars; bool is an int subclass but not a step or a loss.
    if isinstance(raw, bool) or not isinstance(raw, numbers.Real):
        return None
    try:
        value = float(raw)
    except OverflowError:  # an int too large for a float
        return None
    if not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
        return None
    return value


def _downsample(points: list[tuple[float, float]], limit: int) -> list[tuple[float, float]]:
    """At most `limit` points: each bucket of consecutive points keeps its min and max, in order."""
    if len(points) <= limit:
        return points
    buckets = limit // 2
    kept: list[tuple[float, float]] = []
    for bucket in range(buckets):
        start = bucket * len(points) // buckets
        end = (bucket + 1) * len(points) // buckets
        chunk = range(start, end)
        lowest = min(chunk, key=lambda index: points[index][1])
        highest = max(chunk, key=lambda index: points[index][1])
        for index in sorted({lowest, highest}):
            kept.append(points[index])
    return kept


def _nice_axis(low: float, high: float, *, integer: bool) -> _Axis:
    """An axis covering [low, high] whose ticks fall on 1, 2 or 5 times a power of ten."""
    magnitude = max(abs(low), abs(high))
    if high - low <= magnitude * 1e-9:
        # Constant (or constant up to float noise): widen around the value so it sits mid-chart.
        pad = magnitude * 0.1 if magnitude > 0 else 1.0
        if integer:
            pad = max(pad, 1.0)
        widened_low = low - pad
        if low >= 0:
            # Steps and losses are never negative: a lone step 0 or a constant 0.0 loss must not
            # get an axis running down to -1.
            widened_low = max(widened_low, 0.0)
        low, high = widened_low, high + pad
    step = _nice_step((high - low) / TARGET_TICKS)
    if integer:
        step = max(step, 1.0)
    first = math.floor(low / step + 1e-9)
    last = math.ceil(high / step - 1e-9)
    ticks = [index * step for index in range(first, last + 1)]
    return _Axis(low=first * step, high=last * step, ticks=ticks, tick_step=step)


def _nice_step(raw: float) -> float:
    exponent = math.floor(math.log10(raw))
    base = 10.0**exponent
    for multiple in (1.0, 2.0, 5.0):
        if raw <= multiple * base * (1 + 1e-9):
            return multiple * base
    return 10.0 * base


def _format_tick(value: float, step: float) -> str:
    if step >= 1e6:
        return f"{value:.6g}"  # "1.2e+07" fits the margin where "12000000" would not
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    text = f"{value:.{decimals}f}"
    return text.lstrip("-") if float(text) == 0 else text  # no "-0.0"


def _header(title: str, width: int, height: int) -> str:
    clean_title = _INVALID_XML_CHARS.sub("\ufffd", title)
    # SVG text never wraps; cut a long title to the width (at most ~9.5 px per 15 px bold glyph)
    # and keep the whole of it in <title>, which browsers show as a tooltip.
    max_chars = max(1, int((width - 32) / 9.5))
    shown = clean_title if len(clean_title) <= max_chars else clean_title[: max_chars - 1] + "…"
    return "\n".join(
        [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" '
            'font-family="system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif" '
            'font-size="12">',
            f"<title>{escape(clean_title)}</title>",
            f'<rect width="{width}" height="{height}" fill="#fff"/>',
            f'<text x="16" y="24" font-size="15" font-weight="bold" fill="#222">'
            f"{escape(shown)}</text>",
        ]
    )


def _grid_and_axes(
    x_axis: _Axis,
    y_axis: _Axis,
    left: float,
    top: float,
    right: float,
    bottom: float,
    to_x: _Projection,
    to_y: _Projection,
) -> str:
    grid: list[str] = []
    x_labels: list[str] = []
    y_labels: list[str] = []
    for tick in x_axis.ticks:
        x = to_x(tick)
        grid.append(f'<line x1="{x:.1f}" y1="{top:.1f}" x2="{x:.1f}" y2="{bottom:.1f}"/>')
        x_labels.append(
            f'<text x="{x:.1f}" y="{bottom + 18:.1f}">{_format_tick(tick, x_axis.tick_step)}</text>'
        )
    for tick in y_axis.ticks:
        y = to_y(tick)
        grid.append(f'<line x1="{left:.1f}" y1="{y:.1f}" x2="{right:.1f}" y2="{y:.1f}"/>')
        y_labels.append(
            f'<text x="{left - 8:.1f}" y="{y + 4:.1f}">'
            f"{_format_tick(tick, y_axis.tick_step)}</text>"
        )
    middle_y = (top + bottom) / 2
    return "\n".join(
        [
            '<g stroke="#e5e5e5" stroke-width="1">',
            *grid,
            "</g>",
            f'<path d="M{left:.1f},{top:.1f}V{bottom:.1f}H{right:.1f}" '
            'fill="none" stroke="#444" stroke-width="1"/>',
            '<g data-axis="x" text-anchor="middle" fill="#444">',
            *x_labels,
            "</g>",
            '<g data-axis="y" text-anchor="end" fill="#444">',
            *y_labels,
            "</g>",
            f'<text x="{(left + right) / 2:.1f}" y="{bottom + 38:.1f}" text-anchor="middle" '
            'fill="#222">step</text>',
            f'<text x="18" y="{middle_y:.1f}" text-anchor="middle" fill="#222" '
            f'transform="rotate(-90 18 {middle_y:.1f})">loss</text>',
        ]
    )


def _legend(present: list[_Series], left: float, top: float) -> str:
    items = ['<g data-legend="">']
    x = left
    y = top - 16
    for series in present:
        if series.as_markers:
            swatch = f'<circle cx="{x + 9:.1f}" cy="{y:.1f}" r="3.5" fill="{series.color}"/>'
        else:
            swatch = (
                f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{x + 18:.1f}" y2="{y:.1f}" '
                f'stroke="{series.color}" stroke-width="2.5"/>'
            )
        items.append(swatch)
        items.append(f'<text x="{x + 24:.1f}" y="{y + 4:.1f}" fill="#222">{series.label}</text>')
        # No font metrics without a renderer; 7 px per 12 px glyph is a safe overestimate.
        x += 24 + 7 * len(series.label) + 18
    items.append("</g>")
    return "\n".join(items)


def _draw_series(series: _Series, vertices: list[tuple[float, float]]) -> str:
    if series.as_markers:
        dots = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5"/>' for x, y in vertices)
        return f'<g data-series="{series.key}" fill="{series.color}">{dots}</g>'
    coordinates = " ".join(f"{x:.1f},{y:.1f}" for x, y in vertices)
    line = (
        f'<polyline data-series="{series.key}" points="{coordinates}" fill="none" '
        f'stroke="{series.color}" stroke-width="2" stroke-linejoin="round" '
        'stroke-linecap="round"/>'
    )
    if len(vertices) == 1:
        # A one-vertex polyline draws nothing; show the lone point as a dot.
        x, y = vertices[0]
        line += f'\n<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{series.color}"/>'
    return line

"""Charts as SVG markup, drawn on the server from the numbers alone: no script, no CDN, and
what a chart shows can be read back from it.

Every chart is an `<svg class="chart" role="img">` labelled by its `<title>`, and carries one
element per bar or point with `data-minute` (Unix seconds at the start of its minute or
bucket) and `data-value` (the number drawn), so a test or a screen reader gets the data the
picture shows. Colours come from the stylesheet (classes), never from inline styles, which
the console's Content-Security-Policy forbids.

Pure functions: numbers in, markup out (`Markup`: every text in it went through html.escape,
so a page inserts it as it is).
"""

from __future__ import annotations

import datetime
import html
from collections.abc import Mapping, Sequence

from markupsafe import Markup

WIDTH, HEIGHT = 640, 150
LEFT, RIGHT, TOP, BOTTOM = 44, 8, 10, 22  # room for the axis labels
Point = tuple[int, float]  # (minute or bucket start, value)


def buckets(
    points: Sequence[Point], *, since: int, until: int, step: int
) -> list[tuple[int, float]]:
    """One (start, sum) per `step` seconds from `since` to `until` (`since` aligned down to
    the step), zeros where no point falls; points outside are left out."""
    start = since - since % step
    count = max(1, -(-(until - start) // step))
    sums = [0.0] * count
    for minute, value in points:
        index = (minute - start) // step
        if 0 <= index < count:
            sums[index] += value
    return [(start + i * step, total) for i, total in enumerate(sums)]


def bars(
    points: Sequence[Point], *, name: str, label: str, since: int, until: int, step: int = 60
) -> Markup:
    """A bar per `step` seconds (a `<rect class="bar">` each, zero ones included)."""
    slots = buckets(points, since=since, until=until, step=step)
    peak = max((value for _, value in slots), default=0.0)
    total = sum(value for _, value in slots)
    scale = _scale(peak)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    width = plot_w / len(slots)
    shown = f"{label}: {_number(total)} in all, at most {_number(peak)} per {_step(step)}"
    parts = [_open(name, shown, f"chart bars series-{name}", step, total)]
    parts.append(_y_axis(scale or 1, "", plot_h))  # an empty chart still reads 0 to 1
    for index, (start, value) in enumerate(slots):
        height = plot_h * value / scale if scale else 0.0
        x = LEFT + index * width
        parts.append(
            f'<rect class="bar" x="{x:.2f}" y="{TOP + plot_h - height:.2f}" '
            f'width="{max(width - 1, 0.5):.2f}" height="{height:.2f}" '
            f'data-minute="{start}" data-value="{_number(value)}">'
            f"<title>{_clock(start)}: {_number(value)}</title></rect>"
        )
    parts.append(_x_axis(slots[0][0], slots[-1][0] + step))
    parts.append("</svg>")
    return _markup(parts)


def lines(
    series: Mapping[str, Sequence[tuple[int, float | None]]],
    *,
    name: str,
    label: str,
    since: int,
    until: int,
    step: int,
) -> Markup:
    """Shares in percent (0 to 100) over time, a line per key; a point per bucket with data
    (`<circle class="point" data-key=...>`), a gap where a bucket had none (value None)."""
    start = since - since % step
    count = max(1, -(-(until - start) // step))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    parts = [_open(name, label, f"chart lines series-{name}", step, None)]
    parts.append(_y_axis(100.0, " %", plot_h))
    for key, points in series.items():
        css = html.escape(key, quote=True)
        segments: list[list[str]] = [[]]
        dots = []
        for minute, value in points:
            index = (minute - start) // step
            if not 0 <= index < count:
                continue
            if value is None:
                segments.append([])
                continue
            x = LEFT + (index + 0.5) * plot_w / count
            y = TOP + plot_h * (1 - value / 100)
            segments[-1].append(f"{x:.2f},{y:.2f}")
            dots.append(
                f'<circle class="point key-{css}" cx="{x:.2f}" cy="{y:.2f}" r="2" '
                f'data-key="{css}" data-minute="{minute}" data-value="{value:.1f}">'
                f"<title>{css} {_clock(minute)}: {value:.1f} %</title></circle>"
            )
        for segment in segments:
            if len(segment) > 1:
                parts.append(f'<polyline class="line key-{css}" points="{" ".join(segment)}"/>')
        parts += dots
    parts.append(_x_axis(start, start + count * step))
    parts.append("</svg>")
    return _markup(parts)


def _markup(parts: list[str]) -> Markup:
    return Markup("".join(parts))  # noqa: S704 - the only text in parts went through html.escape


def _open(name: str, label: str, css: str, step: int, total: float | None) -> str:
    ident = f"chart-{html.escape(name, quote=True)}"
    total_attr = "" if total is None else f' data-total="{_number(total)}"'
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" id="{ident}" class="{css}" role="img" '
        f'aria-labelledby="{ident}-title" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'data-step="{step}"{total_attr}>'
        f'<title id="{ident}-title">{html.escape(label)}</title>'
    )


def _y_axis(top: float, unit: str, plot_h: float) -> str:
    y0 = TOP + plot_h
    return (
        f'<line class="axis" x1="{LEFT}" y1="{y0}" x2="{WIDTH - RIGHT}" y2="{y0}"/>'
        f'<line class="grid" x1="{LEFT}" y1="{TOP}" x2="{WIDTH - RIGHT}" y2="{TOP}"/>'
        f'<text class="label" x="{LEFT - 4}" y="{TOP + 4}" text-anchor="end">'
        f"{_number(top)}{unit}</text>"
        f'<text class="label" x="{LEFT - 4}" y="{y0}" text-anchor="end">0</text>'
    )


def _x_axis(first: int, end: int) -> str:
    y = HEIGHT - 6
    return (
        f'<text class="label" x="{LEFT}" y="{y}">{_clock(first)}</text>'
        f'<text class="label" x="{WIDTH - RIGHT}" y="{y}" text-anchor="end">'
        f"{_clock(end)} UTC</text>"
    )


def _scale(peak: float) -> float:
    """The y axis' top: the peak rounded up to 1, 2 or 5 times a power of ten."""
    if peak <= 0:
        return 0.0
    magnitude = 1.0
    while magnitude * 10 <= peak:
        magnitude *= 10
    for factor in (1, 2, 5, 10):
        if factor * magnitude >= peak:
            return factor * magnitude
    return 10 * magnitude


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def _step(seconds: int) -> str:
    return "minute" if seconds == 60 else f"{seconds // 60} minutes"


def _clock(seconds: int) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.strftime("%d %b %H:%M")

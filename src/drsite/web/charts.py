"""Server-side SVG plots (no JavaScript): the recovery-point timeline and the RPO chart.

Both take the recovery-point catalogue exactly as the API returns it (``GET
/items/{id}/points``: dicts with ``created_at``, ``consistency``, ``point_id``,
``bytes_written``), a time window and the current time, and return inline SVG (``Markup``) with
real axes: time ticks in UTC along x, and for the RPO chart RPO ticks along y and the policy's
threshold as a dashed line. Colours come from classes in ``static/style.css``; every text is
escaped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from markupsafe import Markup, escape

from drsite.web.fmt import duration, size, utc

W, H = 1200, 260         # RPO chart viewBox (both plots share the width, so they scale alike)
TL_H = 118               # timeline viewBox height
ML, MR, MT, MB = 64, 16, 14, 34  # margins: left (y labels), right, top, bottom (x labels)
# the narrow form, for phones: a viewBox close to the screen's width, so text keeps its size
NW, NH, NTL_H = 400, 220, 150

TIME_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200,
              86400, 2 * 86400, 7 * 86400)

WINDOWS: dict[str, float] = {"15m": 900.0, "1h": 3600.0, "6h": 6 * 3600.0, "24h": 86400.0,
                             "7d": 7 * 86400.0}
DEFAULT_WINDOW = "1h"
MAX_MARKS = 2000


@dataclass(frozen=True)
class Window:
    start: float
    end: float

    @property
    def span(self) -> float:
        return max(self.end - self.start, 1e-9)


def window_for(name: str | None, now: float, points: Sequence[dict[str, Any]]) -> tuple[str, Window]:
    """The window named ``name`` (default 1 h) ending now; shorter when every point is younger
    (at least 2 minutes, so a fresh item's first points are not squeezed into one pixel)."""
    key = name if name in WINDOWS else DEFAULT_WINDOW
    start = now - WINDOWS[key]
    times = [float(p["created_at"]) for p in points if p.get("created_at") is not None]
    if times:
        first = min(times)
        if first > start:
            start = max(start, min(first - 0.05 * (now - first), now - 120.0))
    else:
        start = max(start, now - 600.0)
    return key, Window(start, now)


def time_ticks(w: Window, max_ticks: int = 8) -> list[float]:
    """Round times to label the axis with (at most ``max_ticks``)."""
    step = next((s for s in TIME_STEPS if w.span / s <= max_ticks), TIME_STEPS[-1])
    first = math.ceil(w.start / step) * step
    return [first + i * step for i in range(int((w.end - first) // step) + 1)]


def time_label(t: float, w: Window) -> str:
    fmt = "%H:%M:%S" if w.span <= 600 else ("%H:%M" if w.span <= 2 * 86400 else "%d %b %H:%M")
    return time.strftime(fmt, time.gmtime(t))


def value_ticks(vmax: float, max_ticks: int = 5) -> tuple[float, list[float]]:
    """A nice upper bound and ticks 0..bound for values up to ``vmax`` (seconds)."""
    vmax = max(vmax, 1.0)
    raw = vmax / max_ticks
    mag = 10 ** math.floor(math.log10(raw))
    candidates = [m * mag for m in (1, 2, 5, 10)]
    # durations read better on minute/hour multiples
    candidates += [s for s in (60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400)
                   if raw <= s <= raw * 3]
    step = min(c for c in candidates if c >= raw)
    top = math.ceil(vmax / step) * step
    return top, [i * step for i in range(round(top / step) + 1)]


def _x(t: float, w: Window, left: float, width: float) -> float:
    return left + (t - w.start) / w.span * width


def _svg_open(vb_w: int, vb_h: int, label: str, cls: str, role: str = "img") -> str:
    """An SVG plot: an image, or (``role="group"``) a group of links (an image's children are
    presentational: it cannot hold links)."""
    return (f'<svg class="chart {cls}" viewBox="0 0 {vb_w} {vb_h}" width="100%" role="{role}" '
            f'preserveAspectRatio="xMidYMid meet" aria-label="{escape(label)}" '
            f'xmlns="http://www.w3.org/2000/svg"><title>{escape(label)}</title>')


def _time_axis(w: Window, y: float, left: float, width: float, top: float,
               max_ticks: int = 8) -> list[str]:
    out = [f'<line class="axis" x1="{left}" y1="{y}" x2="{left + width}" y2="{y}"/>']
    for t in time_ticks(w, max_ticks):
        x = _x(t, w, left, width)
        out.append(f'<line class="grid" x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{y}"/>')
        out.append(f'<line class="axis" x1="{x:.1f}" y1="{y}" x2="{x:.1f}" y2="{y + 4}"/>')
        out.append(f'<text class="tick" x="{x:.1f}" y="{y + 16}" text-anchor="middle">'
                   f'{escape(time_label(t, w))}</text>')
    out.append(f'<text class="axis-title" x="{left + width}" y="{y + 30}" text-anchor="end">'
               f'time (UTC)</text>')
    return out


def rpo_series(points: Sequence[dict[str, Any]], w: Window) -> list[tuple[float, float]]:
    """The measured RPO over ``w`` as a sawtooth: it grows by one second per second since the
    newest point, and drops to zero when the next point is committed."""
    times = sorted(float(p["created_at"]) for p in points if p.get("created_at") is not None)
    times = [t for t in times if t <= w.end]
    if not times:
        return []
    before = [t for t in times if t < w.start]
    inside = [t for t in times if t >= w.start]
    series: list[tuple[float, float]] = []
    last = before[-1] if before else None
    if last is not None:
        series.append((w.start, w.start - last))
    for t in inside:
        if last is not None:
            series.append((t, t - last))
        series.append((t, 0.0))
        last = t
    assert last is not None
    series.append((w.end, w.end - last))
    return series


def rpo_chart(points: Sequence[dict[str, Any]], w: Window, threshold_s: float | None, *,
              narrow: bool = False) -> Markup:
    """Measured RPO over time, with the policy's RPO threshold (``narrow``: the phone form)."""
    series = rpo_series(points, w)
    vb_w, vb_h = (NW, NH) if narrow else (W, H)
    left, width = ML, vb_w - ML - MR
    top, bottom = MT, vb_h - MB
    height = bottom - top
    vmax = max([v for _, v in series] + ([threshold_s * 1.1] if threshold_s else []) + [10.0])
    vtop, ticks = value_ticks(vmax * 1.05, 4 if narrow else 5)
    out = [_svg_open(vb_w, vb_h, "RPO over time", "rpo narrow" if narrow else "rpo wide")]
    for v in ticks:
        y = bottom - v / vtop * height
        out.append(f'<line class="grid" x1="{left}" y1="{y:.1f}" x2="{left + width}" y2="{y:.1f}"/>')
        out.append(f'<text class="tick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
                   f'{escape(duration(v))}</text>')
    out.append(f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{bottom}"/>')
    out.append(f'<text class="axis-title" x="12" y="{top + height / 2:.1f}" text-anchor="middle" '
               f'transform="rotate(-90 12 {top + height / 2:.1f})">RPO</text>')
    out += _time_axis(w, bottom, left, width, top, 3 if narrow else 8)
    if threshold_s:
        y = bottom - min(threshold_s, vtop) / vtop * height
        out.append(f'<line class="threshold" x1="{left}" y1="{y:.1f}" x2="{left + width}" y2="{y:.1f}"/>')
        out.append(f'<text class="threshold-label" x="{left + width - 4}" y="{y - 4:.1f}" '
                   f'text-anchor="end">threshold {escape(duration(threshold_s))}</text>')
    if series:
        pts = " ".join(f"{_x(t, w, left, width):.1f},{bottom - v / vtop * height:.1f}" for t, v in series)
        area = (f"{_x(series[0][0], w, left, width):.1f},{bottom} {pts} "
                f"{_x(series[-1][0], w, left, width):.1f},{bottom}")
        out.append(f'<polygon class="rpo-area" points="{area}"/>')
        out.append(f'<polyline class="rpo-line" points="{pts}"/>')
        now_v = series[-1][1]
        out.append(f'<circle class="rpo-now" cx="{left + width:.1f}" '
                   f'cy="{bottom - now_v / vtop * height:.1f}" r="3.5"><title>now: RPO '
                   f'{escape(duration(now_v))}</title></circle>')
    else:
        out.append(f'<text class="empty" x="{left + width / 2}" y="{top + height / 2}" '
                   f'text-anchor="middle">no recovery point yet</text>')
    out.append("</svg>")
    return Markup("".join(out))


def timeline(points: Sequence[dict[str, Any]], w: Window, *, link: str | None = None,
             narrow: bool = False) -> Markup:
    """Recovery points on a time axis: app-consistent (upper lane) and crash-consistent
    (lower). With ``link`` each mark is a link to ``link + point_id`` (the point picker: the
    point's page, from which it is failed over to); the marks are for pointers, the keyboard
    gets the same points as a list beside the plot. ``narrow``: the phone form (lane names
    above the lanes, fewer ticks)."""
    vb_w, vb_h = (NW, NTL_H) if narrow else (W, TL_H)
    left = 12 if narrow else ML + 56
    width = vb_w - left - MR
    top, axis_y = (22 if narrow else 10), vb_h - MB
    lanes = ({"app": (top + 4, top + 40), "crash": (top + 62, axis_y - 4)} if narrow
             else {"app": (top + 4, top + 36), "crash": (top + 44, axis_y - 4)})
    out = [_svg_open(vb_w, vb_h, "Recovery points", "timeline narrow" if narrow
                     else "timeline wide", "img" if link is None else "group")]
    for name, (y0, y1) in lanes.items():
        out.append(f'<rect class="lane lane-{name}" x="{left}" y="{y0}" width="{width}" '
                   f'height="{y1 - y0}"/>')
        label = "app-consistent" if name == "app" else "crash-consistent"
        if narrow:
            out.append(f'<text class="tick" x="{left}" y="{y0 - 5}" text-anchor="start">'
                       f'{label}</text>')
        else:
            out.append(f'<text class="tick" x="{left - 6}" y="{(y0 + y1) / 2 + 4:.1f}" '
                       f'text-anchor="end">{label}</text>')
    out += _time_axis(w, axis_y, left, width, top, 3 if narrow else 8)
    shown = [p for p in points if p.get("created_at") is not None
             and w.start <= float(p["created_at"]) <= w.end][-MAX_MARKS:]
    for p in shown:
        kind = "app" if p.get("consistency") == "app" else "crash"
        y0, y1 = lanes[kind]
        x = _x(float(p["created_at"]), w, left, width)
        tip = (f"{p.get('point_id', '')} · {kind}-consistent · {utc(float(p['created_at']))}"
               f" · {size(p.get('bytes_written'))} changed")
        mark = (f'<line class="mark mark-{kind}" x1="{x:.1f}" y1="{y0 + 2}" x2="{x:.1f}" '
                f'y2="{y1 - 2}"><title>{escape(tip)}</title></line>')
        if link is not None and p.get("point_id"):
            href = escape(f"{link}{p['point_id']}")
            hit = (f'<rect class="hit" x="{x - 4:.1f}" y="{y0}" width="8" height="{y1 - y0}"/>')
            mark = (f'<a href="{href}" class="point-link" tabindex="-1" '
                    f'aria-label="{escape(tip)}" data-point="{escape(p["point_id"])}">'
                    f'{hit}{mark}</a>')
        out.append(mark)
    if not shown:
        out.append(f'<text class="empty" x="{left + width / 2}" y="{(top + axis_y) / 2 + 4}" '
                   f'text-anchor="middle">no recovery point in this window</text>')
    out.append("</svg>")
    return Markup("".join(out))


def churn(points: Sequence[dict[str, Any]], now: float, over_s: float = 3600.0) -> float | None:
    """Changed bytes per second over the last ``over_s`` (delta points only), or None when
    fewer than two points fall in that span."""
    recent = sorted((float(p["created_at"]), int(p.get("bytes_written") or 0)) for p in points
                    if p.get("created_at") is not None and p.get("kind") != "initial"
                    and float(p["created_at"]) >= now - over_s)
    if len(recent) < 2:
        return None
    span = recent[-1][0] - recent[0][0]
    if span <= 0:
        return None
    return sum(b for _, b in recent[1:]) / span

"""Server-side SVG charts: geometry computed here, drawn by the ``chart`` macro in
templates/_chart.html. No chart library and no script: the SVG is part of the page."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

WIDTH, HEIGHT = 600, 180
LEFT, RIGHT, TOP, BOTTOM = 48, 8, 10, 24  # plot margins


@dataclass(frozen=True)
class Series:
    name: str
    values: list[float | None]


@dataclass
class Chart:
    title: str
    unit: str
    kind: str  # "bars" or "lines"
    labels: list[str]
    series: list[Series]
    summary: str
    width: int = WIDTH
    height: int = HEIGHT
    y_max: float = 0.0
    bars: list[dict[str, object]] = field(default_factory=list)
    lines: list[dict[str, object]] = field(default_factory=list)
    y_ticks: list[tuple[float, str]] = field(default_factory=list)
    x_ticks: list[tuple[float, str]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return all(v in (None, 0) for s in self.series for v in s.values)


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    step = 10 ** len(str(int(value))) / 10
    for factor in (1, 2, 2.5, 5, 10):
        if value <= step * factor:
            return step * factor
    return value


def _fmt(value: float) -> str:
    if value >= 1_000_000:
        return f"{value / 1_000_000:g}M"
    if value >= 1000:
        return f"{value / 1000:g}k"
    return f"{value:g}"


def build(title: str, unit: str, kind: str, starts: list[dt.datetime],
          series: list[Series], summary: str) -> Chart:
    span = (starts[-1] - starts[0]) if len(starts) > 1 else dt.timedelta(0)
    fmt = "%H:%M" if span <= dt.timedelta(days=1) else "%m-%d %H:%M"
    labels = [s.strftime(fmt) for s in starts]
    chart = Chart(title, unit, kind, labels, series, summary)
    peak = max((v for s in series for v in s.values if v is not None), default=0.0)
    chart.y_max = _nice_max(float(peak))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    n = max(1, len(labels))
    slot = plot_w / n

    def y(value: float) -> float:
        return round(TOP + plot_h * (1 - value / chart.y_max), 1)

    chart.y_ticks = [(y(chart.y_max * f), _fmt(chart.y_max * f)) for f in (0, 0.5, 1)]
    every = max(1, n // 6)
    chart.x_ticks = [(round(LEFT + slot * (i + 0.5), 1), labels[i]) for i in range(0, n, every)]
    if kind == "bars":
        values = series[0].values
        for i, value in enumerate(values):
            v = float(value or 0)
            chart.bars.append({"x": round(LEFT + slot * i + slot * 0.15, 1), "y": y(v),
                               "w": round(slot * 0.7, 1), "h": round(TOP + plot_h - y(v), 1),
                               "value": v, "label": labels[i]})
    else:
        for index, s in enumerate(series):
            points = [(round(LEFT + slot * (i + 0.5), 1), y(float(v)), float(v), labels[i])
                      for i, v in enumerate(s.values) if v is not None]
            chart.lines.append({"name": s.name, "index": index, "points": points,
                                "path": " ".join(f"{px},{py}" for px, py, _, _ in points)})
    return chart

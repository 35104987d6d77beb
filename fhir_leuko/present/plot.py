"""A patient's trend plot as SVG, drawn with matplotlib (Agg, offline, no pyplot state).

Each panel is one analyte: its values over the last months (the value that counted ringed and
labelled, values with a status the profile does not accept hollow), the lower limit as a dashed
line, and the grade bands of the profile that decided as shaded areas, deeper grades darker. Under
the time axis a bar shows each implicated drug's active period. The text is SVG text (small
files; the page's fonts draw it), and the output is byte-identical for the same data.
"""

from __future__ import annotations

import io
import threading
from datetime import datetime, timedelta

import matplotlib

matplotlib.use("Agg")

from matplotlib import dates as mdates
from matplotlib.figure import Figure

from .trend import Panel, TrendData, parse_time

__all__ = ["render_svg"]

# Deterministic SVG (ids and no date) with text as text; no mathtext: input text (drug names)
# may hold "$" and must be drawn as written.
matplotlib.rcParams.update(
    {
        "svg.hashsalt": "fhir-leuko",
        "svg.fonttype": "none",
        "text.parse_math": False,
        "font.family": "sans-serif",
        "font.sans-serif": ["DejaVu Sans", "Liberation Sans", "Arial"],
        "font.size": 9,
    }
)

_LOCK = threading.Lock()
"""matplotlib's global state (fonts, rcParams) is not made for threads: one plot at a time."""

_BAND_COLOURS = ["#fde7a9", "#fbc47d", "#f28e6b", "#d9534f", "#a12a2a"]
_SEVERITY_RANK = {"low": 0, "moderate": 1, "high": 2}
_LINE = "#2b5c8a"
_COUNTED = "#c0392b"
_DRUG = "#6c5ba7"


def _num(moment: datetime) -> float:
    """A time as matplotlib's date number (its dates module is untyped)."""
    return float(mdates.date2num(moment))  # type: ignore[no-untyped-call]


def _times(panel: Panel) -> list[float]:
    return [_num(parse_time(p.at)) for p in panel.points]


def _draw_panel(ax: object, panel: Panel, start: datetime, end: datetime) -> None:
    from matplotlib.axes import Axes

    assert isinstance(ax, Axes)
    values = [p.value for p in panel.points]
    top = max([*values, panel.lower_limit or 0.0]) * 1.25 or 1.0
    for index, band in enumerate(sorted(panel.bands, key=lambda b: -b.top)):
        colour = _BAND_COLOURS[min(index, len(_BAND_COLOURS) - 1)]
        ax.axhspan(band.bottom, min(band.top, top), color=colour, alpha=0.45, lw=0, zorder=0)
        middle = (band.bottom + min(band.top, top)) / 2
        ax.text(
            1.005,
            middle,
            f"G{band.grade}" if band.grade.isdigit() else band.grade,
            transform=ax.get_yaxis_transform(),
            va="center",
            ha="left",
            fontsize=7.5,
            color="#6b3b00",
            clip_on=False,
        )
    if panel.lower_limit is not None:
        ax.axhline(panel.lower_limit, color="#444444", ls=(0, (4, 3)), lw=1, zorder=1)
        ax.text(
            0.005,
            panel.lower_limit,
            f"lower limit {panel.lower_limit:g}",
            transform=ax.get_yaxis_transform(),
            va="bottom",
            ha="left",
            fontsize=7.5,
            color="#333333",
        )
    valid = [
        (t, p)
        for t, p in zip(_times(panel), panel.points, strict=True)
        if p.state != "not-accepted"
    ]
    if valid:
        ax.plot(
            [t for t, _ in valid],
            [p.value for _, p in valid],
            color=_LINE,
            lw=1.6,
            marker="o",
            ms=4,
            zorder=3,
        )
    hollow = [
        (t, p)
        for t, p in zip(_times(panel), panel.points, strict=True)
        if p.state == "not-accepted"
    ]
    if hollow:
        ax.plot(
            [t for t, _ in hollow],
            [p.value for _, p in hollow],
            ls="none",
            marker="o",
            ms=5,
            mfc="white",
            mec="#888888",
            zorder=3,
        )
    for moment, point in zip(_times(panel), panel.points, strict=True):
        if point.state != "counted":
            continue
        ax.plot(
            [moment],
            [point.value],
            ls="none",
            marker="o",
            ms=11,
            mfc="none",
            mec=_COUNTED,
            mew=2,
            zorder=4,
        )
        ax.annotate(
            f"{point.comparator}{point.value:g} counted",
            (moment, point.value),
            xytext=(-14, -4),
            textcoords="offset points",
            ha="right",
            va="top",
            fontsize=8,
            fontweight="bold",
            color=_COUNTED,
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.85},
            zorder=5,
        )
    if hollow:
        ax.text(
            0.005,
            0.97,
            "○ status not accepted by the profile",
            transform=ax.transAxes,
            va="top",
            ha="left",
            fontsize=7,
            color="#777777",
        )
    ax.set_ylim(0, top)
    ax.set_xlim(_num(start), _num(end))
    ax.set_ylabel("×10⁹/L", fontsize=8)
    title = panel.title + (f" — {panel.finding}" if panel.finding else "")
    ax.set_title(title, loc="left", fontsize=9, fontweight="bold" if panel.finding else "normal")
    ax.grid(axis="y", color="#dddddd", lw=0.6)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


_MIN_SPAN = timedelta(days=21)


def _span(data: TrendData) -> tuple[datetime, datetime]:
    """From a little before the first value (at most ``data.start``, at least three weeks) to
    as-of; a drug that started earlier is drawn from the left edge and says since when."""
    start, end = parse_time(data.start), parse_time(data.end)
    firsts = [parse_time(p.points[0].at) for p in data.panels if p.points]
    if firsts:
        first = min(firsts)
        margin = max((end - first) / 12, timedelta(days=2))
        start = max(start, min(first - margin, end - _MIN_SPAN))
    return start, end


def _drug_label(label: str, begin: datetime | None, end: datetime | None, left: datetime) -> str:
    when = []
    if begin is None:
        when.append("start unknown")
    elif begin < left:
        when.append(f"since {begin.date().isoformat()}")
    when.append("active" if end is None else f"to {end.date().isoformat()}")
    return f"  {label} ({', '.join(when)})"


def render_svg(data: TrendData) -> str:
    """The plot as an SVG document (text)."""
    start, end = _span(data)
    heights = [2.0] * len(data.panels)
    drug_rows = max(len(data.drugs), 1)
    heights.append(0.32 * drug_rows + 0.25)
    with _LOCK:
        figure = Figure(figsize=(8.6, sum(heights) + 0.6), layout="constrained")
        axes = figure.subplots(len(heights), 1, sharex=True, gridspec_kw={"height_ratios": heights})
        for ax, panel in zip(axes[:-1], data.panels, strict=True):
            _draw_panel(ax, panel, start, end)
        bar = axes[-1]
        for row, drug in enumerate(data.drugs):
            started = parse_time(drug.start) if drug.start else None
            stopped = parse_time(drug.end) if drug.end else None
            begin = max(started, start) if started is not None else start
            finish = min(stopped, end) if stopped is not None else end
            y = drug_rows - row - 1
            if finish > begin:
                bar.barh(
                    y,
                    _num(finish) - _num(begin),
                    left=_num(begin),
                    height=0.55,
                    color=_DRUG,
                    alpha=0.85,
                )
            bar.text(
                _num(begin),
                y,
                _drug_label(drug.label, started, stopped, start),
                va="center",
                ha="left",
                fontsize=8,
                color="white" if finish > begin else _DRUG,
                fontweight="bold",
                clip_on=True,
            )
        if not data.drugs:
            bar.text(
                0.5,
                0.5,
                "no implicated drug",
                transform=bar.transAxes,
                ha="center",
                va="center",
                fontsize=8,
                color="#777777",
            )
        bar.set_ylim(-0.5, drug_rows - 0.5)
        bar.set_yticks([])
        bar.set_ylabel("drugs", fontsize=8)
        for side in ("top", "right", "left"):
            bar.spines[side].set_visible(False)
        bar.set_xlim(_num(start), _num(end))
        locator = mdates.AutoDateLocator(minticks=4, maxticks=8)  # type: ignore[no-untyped-call]
        bar.xaxis.set_major_locator(locator)
        formatter = mdates.ConciseDateFormatter(locator)  # type: ignore[no-untyped-call]
        bar.xaxis.set_major_formatter(formatter)
        out = io.StringIO()
        figure.savefig(out, format="svg", metadata={"Date": None})
    return out.getvalue()

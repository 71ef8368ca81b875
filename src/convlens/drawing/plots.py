"""Line and bar charts drawn with matplotlib, written as a PNG and a vector SVG of the same name.

A chart is one or more panels side by side. Each panel fits its axes to its data with a margin, switches to a
log axis where the values span orders of magnitude, keeps its legend outside the data area and, where asked,
puts ticks on whole numbers only (epochs, steps). matplotlib is imported on first use only, through its
object-oriented API (a ``Figure`` on the Agg canvas; pyplot's global figures are never touched). The SVG keeps
its text as text, carries no date, and names its parts with fixed ids, so the same data gives the same bytes:

- ``chart-<key>``: a panel's axes; ``chart-<key>-area`` its plot area (the background rectangle);
- ``chart-<key>-series-<name>``: a line; ``chart-<key>-legend``: the legend.

``key`` is the panel's ``key``, or its title as a slug; ``name`` the series name as a slug.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import re
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convlens.drawing.charts import PALETTE
from convlens.runtime.run_records import naming_the_file

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from PIL import Image

PNG_DPI = 150
LOG_SPAN = 100.0  # a panel whose positive values span this ratio or more gets a log axis (unless told otherwise)
MARKED_POINTS = 40  # series with at most this many points show a marker on each
LEGEND_PER_CHARACTER = 0.06  # inches a legend widens its panel by, per character of its longest entry
TITLE_PER_CHARACTER = 0.085  # inches a title character takes: titles wrap to their panel's width
STYLE = {
    "font.size": 9.0,
    "axes.titlesize": 10.0,
    "axes.labelsize": 9.0,
    "legend.fontsize": 8.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e1e1e1",
    "grid.linewidth": 0.6,
    "axes.axisbelow": True,
    "axes.xmargin": 0.03,
    "axes.ymargin": 0.08,
    "lines.linewidth": 1.6,
    "lines.markersize": 3.5,
    "svg.fonttype": "none",
    "svg.hashsalt": "convlens",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class LinePanel:
    """Lines over a shared x axis; ``series`` maps a name to ``(xs, ys)``, non-finite points are left out.

    ``log_x``, ``log_y`` None: a log axis when its values are positive and span two orders of magnitude or more.
    ``integer_x``: ticks on whole numbers only. ``legend`` None: a legend when there is more than one line.
    ``key`` names the panel in the SVG (default: the title as a slug). ``faint`` maps a series to the series whose
    colour it takes (e.g. raw points beneath a smoothed curve): it is drawn thin and translucent, with no marker and
    no legend entry."""

    series: Mapping[str, tuple[Sequence[float], Sequence[float]]]
    title: str
    xlabel: str
    ylabel: str
    integer_x: bool = False
    log_x: bool | None = False
    log_y: bool | None = None
    legend: bool | None = None
    key: str = ""
    faint: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def finite_series(self) -> dict[str, tuple[list[float], list[float]]]:
        """Each series with its non-finite points left out; series with no point left are dropped."""
        kept = {}
        for name, (xs, ys) in self.series.items():
            points = [(float(x), float(y)) for x, y in zip(xs, ys) if _finite(x) and _finite(y)]
            if points:
                kept[name] = ([x for x, _ in points], [y for _, y in points])
        return kept


@dataclasses.dataclass(frozen=True, kw_only=True)
class BarPanel:
    """Horizontal bars, one per label from the top, each with its value printed at its end; the value axis
    starts at 0 and ends at ``maximum`` (default: just past the longest bar)."""

    labels: Sequence[str]
    values: Sequence[float]
    title: str
    xlabel: str
    colour: tuple[int, int, int] = PALETTE[0]
    maximum: float | None = None
    key: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class IntervalPanel:
    """One point per label from the top with its interval ``[low, high]`` as a whisker (an estimate and its
    confidence interval); the value axis fits the intervals."""

    labels: Sequence[str]
    values: Sequence[float]
    lows: Sequence[float]
    highs: Sequence[float]
    title: str
    xlabel: str
    colour: tuple[int, int, int] = PALETTE[0]
    key: str = ""


Panel = LinePanel | BarPanel | IntervalPanel


def save_chart(panels: Panel | Sequence[Panel], path: str | Path, columns: int | None = None) -> tuple[Path, Path]:
    """Draw ``panels`` side by side (``columns`` per row; default: all in one row) and write ``path`` (PNG) and the
    same name with ``.svg``, each through a temporary file and a rename; returns both paths."""
    png = Path(path).with_suffix(".png")
    svg = png.with_suffix(".svg")
    png.parent.mkdir(parents=True, exist_ok=True)
    with _styled():
        figure = draw(panels, columns)
        _write_atomic(svg, _render(figure, "svg"))
        _write_atomic(png, _render(figure, "png"))
    return png, svg


def chart_image(panels: Panel | Sequence[Panel], size: tuple[int, int] | None = None) -> Image.Image:
    """``panels`` drawn side by side as an RGB picture; ``size`` (pixels) overrides the size they ask for."""
    from PIL import Image

    with _styled():
        figure = draw(panels)
        if size is not None:
            figure.set_size_inches(size[0] / PNG_DPI, size[1] / PNG_DPI)
        return Image.open(io.BytesIO(_render(figure, "png"))).convert("RGB")


def line_chart(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    size: tuple[int, int] | None = None,
    integer_x: bool = False,
) -> Image.Image:
    """One :class:`LinePanel` as a picture (to write it as PNG and SVG, use :func:`save_chart`)."""
    return chart_image(LinePanel(series=series, title=title, xlabel=xlabel, ylabel=ylabel, integer_x=integer_x), size)


def bar_chart(
    labels: Sequence[str],
    values: Sequence[float],
    *,
    title: str,
    xlabel: str,
    colour: tuple[int, int, int] = PALETTE[0],
    size: tuple[int, int] | None = None,
    maximum: float | None = None,
) -> Image.Image:
    """One :class:`BarPanel` as a picture (to write it as PNG and SVG, use :func:`save_chart`)."""
    panel = BarPanel(labels=labels, values=values, title=title, xlabel=xlabel, colour=colour, maximum=maximum)
    return chart_image(panel, size)


def draw(panels: Panel | Sequence[Panel], columns: int | None = None) -> Figure:
    """A matplotlib figure of ``panels`` side by side, ``columns`` per row (default: one row); call inside
    :func:`_styled` for the chart style."""
    from matplotlib.figure import Figure

    panels = [panels] if isinstance(panels, (LinePanel, BarPanel, IntervalPanel)) else list(panels)
    if not panels:
        raise ValueError("a chart needs at least one panel")
    columns = min(columns or len(panels), len(panels))
    rows = -(-len(panels) // columns)
    sizes = [_panel_size(panel) for panel in panels]
    width = max(sum(w for w, _ in sizes[row * columns : (row + 1) * columns]) for row in range(rows))
    figure = Figure(figsize=(width, max(h for _, h in sizes) * rows), dpi=PNG_DPI, layout="constrained")
    ratios = [max(w for w, _ in sizes[column::columns]) for column in range(columns)]
    grid = figure.add_gridspec(rows, columns, width_ratios=ratios)
    for number, (panel, key) in enumerate(zip(panels, _unique_keys(panels))):
        axes = figure.add_subplot(grid[number // columns, number % columns], gid=f"chart-{key}")
        axes.patch.set_gid(f"chart-{key}-area")
        axes.set_title(textwrap.fill(panel.title, max(int(sizes[number][0] / TITLE_PER_CHARACTER), 20)))
        if isinstance(panel, LinePanel):
            _draw_lines(axes, panel, key)
        elif isinstance(panel, IntervalPanel):
            _draw_intervals(axes, panel)
        else:
            _draw_bars(axes, panel)
    return figure


def _draw_lines(axes: Axes, panel: LinePanel, key: str) -> None:
    from matplotlib.ticker import MaxNLocator

    series = panel.finite_series()
    solid = [name for name in series if name not in panel.faint]
    colours = {name: _hex(PALETTE[number % len(PALETTE)]) for number, name in enumerate(solid)}
    for name, (xs, ys) in series.items():
        gid = f"chart-{key}-series-{_slug(name)}"
        if name in panel.faint:
            colour = colours.get(panel.faint[name], "#888888")
            axes.plot(xs, ys, label=f"_{name}", color=colour, alpha=0.3, linewidth=0.9, zorder=1.5, gid=gid)
            continue
        axes.plot(xs, ys, label=name, color=colours[name], marker="o" if len(xs) <= MARKED_POINTS else None, gid=gid)
    if not series:
        axes.text(0.5, 0.5, "no finite values", transform=axes.transAxes, ha="center", va="center")
    xs_all = [x for xs, _ in series.values() for x in xs]
    ys_all = [y for _, ys in series.values() for y in ys]
    if panel.log_y if panel.log_y is not None else _spans_decades(ys_all):
        axes.set_yscale("log")
    if panel.log_x if panel.log_x is not None else _spans_decades(xs_all):
        axes.set_xscale("log")
    elif panel.integer_x:
        axes.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    axes.set_xlabel(panel.xlabel)
    axes.set_ylabel(panel.ylabel)
    if solid and (panel.legend if panel.legend is not None else len(solid) > 1):
        legend = axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fancybox=False)
        legend.set_gid(f"chart-{key}-legend")


def _draw_bars(axes: Axes, panel: BarPanel) -> None:
    from matplotlib.ticker import MaxNLocator

    values = [float(v) if _finite(v) else 0.0 for v in panel.values]
    labels = list(panel.labels)
    positions = range(len(labels))
    axes.barh(positions, [max(v, 0.0) for v in values], height=0.65, color=_hex(panel.colour))
    axes.set_yticks(list(positions), labels)
    axes.invert_yaxis()
    axes.grid(False, axis="y")
    longest = max([v for v in values if v > 0] + [1e-12])
    axes.set_xlim(0.0, panel.maximum if panel.maximum is not None else longest * 1.18)
    if all(float(v).is_integer() for v in values):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    for position, (shown, value) in enumerate(zip(values, panel.values)):
        text = f"{float(value):.3g}" if _finite(value) else "n/a"
        axes.annotate(text, (max(shown, 0.0), position), xytext=(3, 0), textcoords="offset points", va="center")
    axes.set_xlabel(panel.xlabel)


def _draw_intervals(axes: Axes, panel: IntervalPanel) -> None:
    points = [
        (label, float(value), float(low), float(high))
        for label, value, low, high in zip(panel.labels, panel.values, panel.lows, panel.highs)
        if _finite(value) and _finite(low) and _finite(high)
    ]
    if not points:
        axes.text(0.5, 0.5, "no finite values", transform=axes.transAxes, ha="center", va="center")
        return
    positions = list(range(len(points)))
    values = [value for _, value, _, _ in points]
    whiskers = [[value - low for _, value, low, _ in points], [high - value for _, value, _, high in points]]
    axes.errorbar(values, positions, xerr=whiskers, fmt="o", color=_hex(panel.colour), capsize=3)
    axes.set_yticks(positions, [label for label, _, _, _ in points])
    axes.invert_yaxis()
    axes.grid(False, axis="y")
    axes.set_xlabel(panel.xlabel)


def _panel_size(panel: Panel) -> tuple[float, float]:
    """(width, height) in inches: room for the plot, and for the legend or the bar labels beside it."""
    if isinstance(panel, (BarPanel, IntervalPanel)):
        longest_label = max([len(str(label)) for label in panel.labels] + [4])
        return 3.4 + LEGEND_PER_CHARACTER * longest_label, 1.1 + 0.26 * max(len(panel.labels), 1)
    names = [name for name in panel.finite_series() if name not in panel.faint]
    shown = names and (panel.legend if panel.legend is not None else len(names) > 1)
    legend = 0.45 + LEGEND_PER_CHARACTER * max(len(name) for name in names) if shown else 0.0
    return 4.4 + legend, 3.2


@contextmanager
def _styled() -> Iterator[None]:
    """matplotlib's defaults with the chart style, whatever the user's matplotlibrc says."""
    import matplotlib.style

    with matplotlib.style.context(["default", STYLE]):
        yield


def _render(figure: Figure, file_format: str) -> bytes:
    buffer = io.BytesIO()
    metadata: dict[str, Any] = {"Date": None} if file_format == "svg" else {}
    figure.savefig(buffer, format=file_format, dpi=PNG_DPI, metadata=metadata, facecolor="white")
    return buffer.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with naming_the_file(path):
        temporary.write_bytes(data)
        os.replace(temporary, path)


def _unique_keys(panels: Sequence[Panel]) -> list[str]:
    keys: list[str] = []
    for panel in panels:
        key = _slug(panel.key or panel.title) or "panel"
        keys.append(key if key not in keys else f"{key}-{len(keys) + 1}")
    return keys


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _spans_decades(values: Sequence[float]) -> bool:
    positive = [v for v in values if v > 0]
    return len(positive) == len(values) > 1 and max(positive) / min(positive) >= LOG_SPAN


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(float(value))


def _hex(colour: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*colour)

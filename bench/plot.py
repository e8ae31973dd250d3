"""Charts for load runs: per-class latency CDFs, and critical p99 across a load sweep.

The inputs are plain data: a scenario name mapped to latencies in milliseconds per
class (or to anything with ``latencies_by_class()``, such as a
:class:`bench.load.LoadResult`). Figures are drawn with matplotlib's Agg canvas
directly, so no display and no global pyplot state are involved.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeAlias

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

#: Latencies in milliseconds, per class.
ClassLatencies: TypeAlias = Mapping[str, Sequence[float]]


class HasLatencies(Protocol):
    def latencies_by_class(self) -> Mapping[str, Sequence[float]]: ...


def _latencies(source: HasLatencies | ClassLatencies) -> ClassLatencies:
    if isinstance(source, Mapping):
        return source
    return source.latencies_by_class()


def _cdf(values: Sequence[float]) -> tuple[list[float], list[float]]:
    ordered = sorted(values)
    n = len(ordered)
    return ordered, [(i + 1) / n for i in range(n)]


def _nearest_rank(ordered: Sequence[float], pct: float) -> float:
    return ordered[max(1, math.ceil(pct / 100.0 * len(ordered))) - 1]


def plot_latency(
    results: Mapping[str, HasLatencies | ClassLatencies],
    path: str | Path,
    *,
    title: str = "Latency per priority class",
) -> Path:
    """One panel per class, one CDF line per scenario (log-scale ms); writes a PNG.

    The legend gives each scenario's p50 and p99 and its sample count.
    """
    data = {name: _latencies(source) for name, source in results.items()}
    classes = list(dict.fromkeys(cls for lat in data.values() for cls in lat))
    fig = Figure(figsize=(5.0 * max(len(classes), 1), 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(len(classes), 1), squeeze=False)[0]
    for ax, cls in zip(axes, classes, strict=False):
        for scenario, latencies in data.items():
            values = [v for v in latencies.get(cls, ()) if v > 0 and math.isfinite(v)]
            if not values:
                continue
            xs, ys = _cdf(values)
            label = (
                f"{scenario}: p50 {_nearest_rank(xs, 50):.0f} ms,"
                f" p99 {_nearest_rank(xs, 99):.0f} ms (n={len(xs)})"
            )
            ax.step(xs, ys, where="post", label=label)
        ax.set_title(cls)
        ax.set_xscale("log")
        _plain_ticks(ax.xaxis)
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("fraction of successful requests")
        ax.set_ylim(0.0, 1.02)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small", loc="lower right")
        else:
            ax.text(0.5, 0.5, "no successful requests", ha="center", transform=ax.transAxes)
    fig.suptitle(title)
    return _save(fig, path)


def plot_sweep(
    sweep: Mapping[str, Mapping[float, float | None]],
    path: str | Path,
    *,
    title: str = "Critical p99 latency under rising load",
    xlabel: str = "load factor (offered / GPU capacity)",
    ylabel: str = "critical p99 (ms)",
) -> Path:
    """One line per scenario (e.g. inferlane vs baseline): load factor -> p99 ms.

    A None value (no successful request at that load) leaves a gap in the line.
    """
    fig = Figure(figsize=(6.5, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for scenario, points in sweep.items():
        xs = sorted(points)
        ys = [_or_nan(points[x]) for x in xs]
        ax.plot(xs, ys, marker="o", label=scenario)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    _plain_ticks(ax.yaxis)
    ax.grid(True, which="both", alpha=0.3)
    if sweep:
        ax.legend()
    return _save(fig, path)


def format_sweep(sweep: Mapping[str, Mapping[float, float | None]], unit: str = "ms") -> str:
    """The sweep as a text table: one row per load factor, one column per scenario."""
    scenarios = list(sweep)
    factors = sorted({x for points in sweep.values() for x in points})
    lines = [f"{'load':>6}" + "".join(f"{name:>14}" for name in scenarios)]
    for x in factors:
        cells = (sweep[name].get(x) for name in scenarios)
        lines.append(f"{x:>6g}" + "".join(f"{_cell(v, unit):>14}" for v in cells))
    return "\n".join(lines)


def _cell(value: float | None, unit: str) -> str:
    return "-" if value is None else f"{value:.1f} {unit}"


def _plain_ticks(axis: Any) -> None:
    """Log axes label 50, 100, 200 instead of 5x10^1; minor ticks only at 2x and 5x."""
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(_minor_label))


def _minor_label(value: float, _pos: object) -> str:
    if value <= 0:
        return ""
    leading = value / 10 ** math.floor(math.log10(value))
    return f"{value:g}" if any(math.isclose(leading, d) for d in (2.0, 5.0)) else ""


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value


def _save(fig: Figure, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
    return out

"""Charts for the benchmarks and the demo.

- :func:`plot_panels`: one panel per metric, one line per scenario across load factors.
- :func:`plot_outcomes`: what each class got in each scenario at one load, failures
  included: a CDF of time to first token over *all* requests (a failure drawn at the
  deadline, so a scenario that fails a third of its requests cannot look fast), the
  success rate per class, and the GPU pool's goodput.

The inputs are plain data. Figures are drawn with matplotlib's Agg canvas directly, so
no display and no global pyplot state are involved.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

#: A scenario name -> load factor -> value (None: no value at that load).
Series = Mapping[str, Mapping[float, float | None]]


@dataclass(frozen=True)
class Outcome:
    """One scenario at one load, as :func:`plot_outcomes` draws it."""

    #: Per class: time to first token in ms of each successful request.
    ttft_ms: Mapping[str, Sequence[float]]
    #: Per class: requests that failed (refused, cut, late, no answer).
    failures: Mapping[str, int]
    #: Goodput as a percentage of the GPU pool's capacity.
    goodput_pct: float


def plot_panels(
    panels: Mapping[str, Series],
    path: str | Path,
    *,
    title: str,
    xlabel: str = "load (offered / GPU pool capacity)",
    log_panels: Collection[int] = (),
) -> Path:
    """One panel per entry (its key is the y label), one line per scenario."""
    fig = Figure(figsize=(6.0 * max(len(panels), 1), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(len(panels), 1), squeeze=False)[0]
    for i, (ax, (ylabel, series)) in enumerate(zip(axes, panels.items(), strict=False)):
        for scenario, points in series.items():
            xs = sorted(points)
            ax.plot(xs, [_or_nan(points[x]) for x in xs], marker="o", label=scenario)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if i in log_panels:
            ax.set_yscale("log")
            _plain_ticks(ax.yaxis)
        ax.grid(True, which="both", alpha=0.3)
        if series:
            ax.legend(fontsize="small")
    fig.suptitle(title)
    return _save(fig, path)


def plot_outcomes(
    outcomes: Mapping[str, Outcome], path: str | Path, *, deadline_ms: float, title: str
) -> Path:
    """Per class a CDF of TTFT over every request, then success rates, then goodput."""
    classes = list(dict.fromkeys(c for o in outcomes.values() for c in o.ttft_ms))
    fig = Figure(figsize=(4.6 * (len(classes) + 2), 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(classes) + 2, squeeze=False)[0]
    for ax, cls in zip(axes, classes, strict=False):
        _cdf_panel(ax, cls, outcomes, deadline_ms)
    _success_panel(axes[len(classes)], classes, outcomes)
    _goodput_panel(axes[len(classes) + 1], outcomes)
    fig.suptitle(title)
    return _save(fig, path)


def _cdf_panel(ax: Any, cls: str, outcomes: Mapping[str, Outcome], deadline_ms: float) -> None:
    for name, outcome in outcomes.items():
        ok = sorted(v for v in outcome.ttft_ms.get(cls, ()) if v > 0 and math.isfinite(v))
        failed = outcome.failures.get(cls, 0)
        n = len(ok) + failed
        if not n:
            continue
        xs = ok + [deadline_ms] * failed
        ys = [(i + 1) / n for i in range(n)]
        p99 = xs[max(1, math.ceil(0.99 * n)) - 1]
        label = f"{name}: p99 {'>=deadline' if p99 >= deadline_ms else f'{p99:.0f} ms'}"
        label += f", {failed / n:.0%} failed" if failed else ""
        ax.step(xs, ys, where="post", label=label)
    ax.axvline(deadline_ms, color="grey", linestyle=":", linewidth=1)
    ax.set_title(f"{cls}: time to first token")
    ax.set_xscale("log")
    _plain_ticks(ax.xaxis)
    ax.set_xlabel("ms (a failure counts at the deadline, dotted)")
    ax.set_ylabel("fraction of all requests")
    ax.set_ylim(0.0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines[:-1]:
        ax.legend(fontsize="small", loc="lower right")


def _success_panel(ax: Any, classes: Sequence[str], outcomes: Mapping[str, Outcome]) -> None:
    width = 0.8 / max(len(outcomes), 1)
    for i, (name, outcome) in enumerate(outcomes.items()):
        rates = []
        for cls in classes:
            ok, failed = len(outcome.ttft_ms.get(cls, ())), outcome.failures.get(cls, 0)
            rates.append(100.0 * ok / (ok + failed) if ok + failed else math.nan)
        xs = [j + (i - (len(outcomes) - 1) / 2) * width for j in range(len(classes))]
        ax.bar(xs, rates, width=width, label=name)
    ax.set_xticks(range(len(classes)), classes)
    ax.set_ylim(0, 105)
    ax.set_ylabel("requests that succeeded (%)")
    ax.set_title("success rate")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small", loc="lower left")


def _goodput_panel(ax: Any, outcomes: Mapping[str, Outcome]) -> None:
    names = list(outcomes)
    ax.bar(range(len(names)), [outcomes[n].goodput_pct for n in names], color="tab:green")
    ax.set_xticks(range(len(names)), names, rotation=15)
    ax.axhline(100, color="grey", linestyle=":", linewidth=1)
    ax.set_ylabel("tokens delivered (% of the GPU pool's capacity)")
    ax.set_title("GPU pool goodput")
    ax.grid(True, axis="y", alpha=0.3)


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

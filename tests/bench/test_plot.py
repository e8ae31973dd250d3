"""The charts are written as valid PNG files."""

from __future__ import annotations

from pathlib import Path

from bench.plot import Outcome, plot_outcomes, plot_panels

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    data = path.read_bytes()
    return data.startswith(PNG_SIGNATURE) and data[12:16] == b"IHDR" and len(data) > 1000


def test_panels_with_gaps_and_a_log_axis(tmp_path: Path) -> None:
    ttft: dict[str, dict[float, float | None]] = {
        "inferlane": {0.5: 60.0, 1.0: 70.0, 2.0: 90.0},
        "baseline": {0.5: 65.0, 1.0: 400.0, 2.0: None},
    }
    goodput: dict[str, dict[float, float | None]] = {"inferlane": {0.5: 50.0, 2.0: 96.0}}
    out = plot_panels(
        {"critical TTFT p99 (ms)": ttft, "goodput (%)": goodput},
        tmp_path / "charts" / "sweep.png",
        title="sweep",
        log_panels=(0,),
    )
    assert out == tmp_path / "charts" / "sweep.png" and is_png(out)


def test_outcomes_draw_failures_success_rates_and_goodput(tmp_path: Path) -> None:
    outcomes = {
        "inferlane": Outcome(
            {"critical": [80.0, 90.0, 120.0], "sheddable": [300.0]},
            {"critical": 0, "sheddable": 3},
            97.0,
        ),
        "k8s-service": Outcome({"critical": [500.0]}, {"critical": 2, "sheddable": 4}, 88.0),
        "empty": Outcome({}, {}, 0.0),
    }
    out = plot_outcomes(outcomes, tmp_path / "demo.png", deadline_ms=10_000, title="demo")
    assert is_png(out)

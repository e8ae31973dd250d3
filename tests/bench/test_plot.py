"""The charts are written as valid PNG files."""

from __future__ import annotations

from pathlib import Path

from bench.load import LoadResult, LoadSpec, RequestRecord
from bench.plot import format_sweep, plot_latency, plot_sweep

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    data = path.read_bytes()
    return data.startswith(PNG_SIGNATURE) and data[12:16] == b"IHDR" and len(data) > 1000


def test_plot_latency_from_lists_and_from_a_load_result(tmp_path: Path) -> None:
    spec = LoadSpec(url="http://x", rate_rps=1.0, duration_s=1.0)
    records = tuple(
        RequestRecord(cls="critical", status=200, latency_ms=10.0 + i, served_by="g", started_s=0)
        for i in range(50)
    )
    result = LoadResult(spec=spec, records=records, elapsed_s=1.0)
    out = plot_latency(
        {
            "inferlane": result,
            "baseline": {"critical": [50.0, 80.0, 400.0], "sheddable": [90.0, 1200.0]},
        },
        tmp_path / "charts" / "latency.png",
    )
    assert out == tmp_path / "charts" / "latency.png"
    assert is_png(out)


def test_plot_latency_with_no_successes_still_draws(tmp_path: Path) -> None:
    assert is_png(plot_latency({"empty": {"critical": []}}, tmp_path / "empty.png"))


def test_plot_sweep_with_gaps(tmp_path: Path) -> None:
    sweep: dict[str, dict[float, float | None]] = {
        "inferlane": {0.5: 60.0, 1.0: 70.0, 2.0: 90.0},
        "baseline": {0.5: 65.0, 1.0: 400.0, 2.0: None},
    }
    assert is_png(plot_sweep(sweep, tmp_path / "sweep.png"))
    table = format_sweep(sweep).splitlines()
    assert table[0].split() == ["load", "inferlane", "baseline"]
    assert table[2].split() == ["1", "70.0", "ms", "400.0", "ms"]
    assert table[3].split() == ["2", "90.0", "ms", "-"]

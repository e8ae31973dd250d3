"""bench/rotation.py on a small scale: every synthetic proxy ACKs its new certificate."""

from __future__ import annotations

import json
from pathlib import Path

from bench.rotation import main


def test_rotation_bench_measures_every_round(tmp_path: Path) -> None:
    out = tmp_path / "rotation.json"
    flags = {"--streams": 20, "--identities": 5, "--rounds": 2, "--pause": 0.05}
    main([*(str(x) for pair in flags.items() for x in pair), "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["streams"] == 20 and result["met_goal"]
    assert set(result["modes"]) == {"worker", "loop"} and result["lag_p99_loop_over_worker"] > 0
    for mode in result["modes"].values():
        assert len(mode["rounds_s"]) == 2 and 0 < mode["median_s"] < 5
        assert 0 <= mode["lag_p50_ms"] <= mode["lag_p99_ms"] <= mode["lag_max_ms"]

"""The translation benchmark: every scenario on a small fleet, both paths, side by side."""

from __future__ import annotations

import pytest

from bench import translation


def test_a_short_run_reports_every_scenario_for_both_paths(
    capsys: pytest.CaptureFixture[str],
) -> None:
    rows = translation.main(["--fleet", "200", "--baseline-keys", "20"])
    assert [r.scenario for r in rows] == list(translation.SCENARIOS)
    for row in rows:
        assert row.keys > 20 and row.sampled == 20  # the baseline sampled, and scaled
        assert row.incremental_s > 0 and row.full_s > 0
    out = capsys.readouterr().out
    assert "KB per proxy" in out and "scaled" in out

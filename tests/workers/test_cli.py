"""``inferlane serve --workers``: the default is the cores the process may use; and
``--gc-threshold``, which every process of the control plane applies."""

from __future__ import annotations

import asyncio
import gc
import os
import weakref
from pathlib import Path

import pytest

from tests.support.wait import eventually
from xds_server.ads import collector
from xds_server.cli import build_parser
from xds_server.cli.serve import cgroup_cpu_limit, default_workers


def test_workers_default_to_the_usable_cores_and_must_be_positive() -> None:
    options = build_parser().parse_args(["serve", "--manifests", "x"])
    assert options.workers == default_workers()
    assert 1 <= default_workers() <= len(os.sched_getaffinity(0))
    assert build_parser().parse_args(["serve", "--manifests", "x", "--workers", "3"]).workers == 3
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--manifests", "x", "--workers", "0"])


def test_a_container_cpu_limit_lowers_the_default(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path) == 0.5
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(tmp_path) is None


async def test_the_collector_threshold_defaults_high_and_zero_keeps_pythons() -> None:
    parse = build_parser().parse_args
    assert parse(["serve", "--manifests", "x"]).gc_threshold == collector.DEFAULT_THRESHOLD
    assert parse(["serve", "--manifests", "x", "--gc-threshold", "0"]).gc_threshold == 0
    with pytest.raises(SystemExit):
        parse(["serve", "--manifests", "x", "--gc-threshold", "-1"])

    before = gc.get_threshold()
    try:
        async with collector.tuned(0):
            assert gc.get_threshold() == before
        async with collector.tuned(20_000):
            assert gc.get_threshold() == (
                20_000,
                collector.YOUNG_PER_MIDDLE,
                collector.MIDDLE_PER_FULL,
            )
        assert gc.get_threshold() == before
    finally:
        gc.set_threshold(*before)


class _Cycle:
    def __init__(self) -> None:
        self.me = self


async def test_full_collections_still_come_on_a_timer() -> None:
    """A cycle no threshold reaches (the collector is off here) is freed by the periodic
    full collection, as one that outlived its young collections would be."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        cycle = _Cycle()
        gone = weakref.ref(cycle)
        del cycle
        assert gone() is not None  # only a collection frees it
        task = asyncio.create_task(collector.collect_periodically(interval=0.01))
        try:
            await eventually(lambda: _is_none(gone), timeout=10, what="the cycle collected")
        finally:
            task.cancel()
    finally:
        if was_enabled:
            gc.enable()


async def _is_none(ref: weakref.ref[_Cycle]) -> bool:
    return ref() is None

"""``inferlane serve`` as a subprocess, and what it costs: CPU, memory, event-loop lag.

A benchmark that runs the control plane in its own process measures what a user runs:
the command, its workers, its sources; and the benchmark's own bookkeeping stays out of
the control plane's CPU and memory figures. CPU and memory are read from ``/proc`` for
the whole process tree (the workers of ``--workers N`` included); memory is proportional
set size (PSS), so pages the workers share are counted once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bench.wait import eventually

_TICKS = os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def cpu_seconds(pids: Iterable[int]) -> float:
    """User plus system CPU seconds the processes have used."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / _TICKS


def pss_bytes(pids: Iterable[int]) -> int:
    """Proportional set size of the processes: shared pages divided among their sharers."""
    total = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1]) * 1024
    return total


@dataclass(frozen=True)
class Histogram:
    """Cumulative bucket counts of one histogram, summed over its label sets."""

    buckets: tuple[tuple[float, float], ...]

    def minus(self, earlier: Histogram) -> Histogram:
        before = dict(earlier.buckets)
        return Histogram(tuple((le, n - before.get(le, 0.0)) for le, n in self.buckets))

    @property
    def count(self) -> float:
        return self.buckets[-1][1] if self.buckets else 0.0

    def quantile(self, q: float) -> float:
        """The upper bound of the bucket holding the q-quantile (an upper bound)."""
        want = q * self.count
        for le, n in self.buckets:
            if n >= want and n > 0:
                return le
        return 0.0

    def highest(self) -> float:
        """The upper bound of the highest bucket with an observation."""
        top, previous = 0.0, 0.0
        for le, n in self.buckets:
            if n > previous:
                top = le
            previous = n
        return top


def histogram(metrics_text: str, name: str) -> Histogram:
    sums: dict[float, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == name + "_bucket":
                le = float(sample.labels["le"])
                sums[le] = sums.get(le, 0.0) + sample.value
    return Histogram(tuple(sorted(sums.items())))


def counter(metrics_text: str, name: str) -> dict[str, float]:
    """A counter's samples by their ``type`` label (all label sets summed per type)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == name:
                key = sample.labels.get("type", "")
                out[key] = out.get(key, 0.0) + sample.value
    return out


class ServeProcess:
    """``python -m xds_server.cli serve ARGS`` with its ports read from ``--ports-file``."""

    def __init__(self, args: Sequence[str], workdir: Path) -> None:
        self.args = list(args)
        self.workdir = workdir
        self.proc: asyncio.subprocess.Process | None = None
        self.ports: dict[str, int] = {}

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.ports['admin']}"

    async def start(self, timeout: float = 120) -> ServeProcess:  # noqa: ASYNC109
        ports_file = self.workdir / "ports.json"
        ports_file.unlink(missing_ok=True)
        with (self.workdir / "serve.log").open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "xds_server.cli",
                "serve",
                *self.args,
                "--ports-file",
                str(ports_file),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

        async def started() -> bool:
            assert self.proc is not None
            if self.proc.returncode is not None:
                raise RuntimeError(f"inferlane serve exited {self.proc.returncode}: {self.log()}")
            return ports_file.exists() and bool(ports_file.read_text().strip())

        await eventually(started, timeout=timeout, what="inferlane serve's ports")
        self.ports = json.loads(ports_file.read_text())
        return self

    def log(self, lines: int = 30) -> str:
        text = (self.workdir / "serve.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def pids(self) -> list[int]:
        return descendants(self.proc.pid) if self.proc is not None else []

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def get(self, path: str) -> str:
        async with aiohttp.ClientSession() as session, session.get(self.admin + path) as resp:
            resp.raise_for_status()
            return await resp.text()

    async def kill(self) -> None:
        """SIGKILL the whole tree, as a crashed node would lose it."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), timeout=10)
        except TimeoutError:
            await self.kill()

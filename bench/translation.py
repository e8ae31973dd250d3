"""What a change costs to translate: incremental translation against a full one per key.

On the realistic fleet's world (``bench.fleet``), each scenario installs a generation and
translates and serializes every config key the fleet's proxies have, as the control
plane's cache does on its worker thread, and reports the CPU seconds that took:

* ``first``: the first generation (nothing to reuse);
* ``annotation``: one Service's ``inferlane.io/timeout`` changes;
* ``endpoint``: one model pod turns unready;
* ``reconnect``: every model pod's sidecar connects (their pods declare it, so nothing
  moves);
* ``certs``: nothing but the secrets changed.

Side by side, in the same process and on the same worlds, the baseline is what the
control plane did before translation was incremental: ``routing.generate`` once per
config key, its output kept only while the world and the connected sidecars stayed the
same (so a renewal cost serializing every message again, not translating). At 10,000
proxies a full generation takes minutes, so the baseline translates a sample of keys
(``--baseline-keys``) and scales by the keys it skipped; the report says so. Memory is
what the incremental translation's memos and the interned resources hold for one
generation of every key, measured with ``tracemalloc``.

    python -m bench.translation --fleet 1000,10000
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import random
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Hashable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from bench.fleet import Fleet, FleetShape, build_fleet, set_ready
from mesh.manifests import load_world
from mesh.model import World
from mesh.proxy import Proxy, proxy_from_node
from mtls.ca import CertificateAuthority
from mtls.secrets import SecretStore
from routing import generate
from routing.generator import MeshGenerator
from xds_server.ads.snapshot import ResourceInterner, build_snapshot

SCENARIOS = ("first", "annotation", "endpoint", "reconnect", "certs")


@dataclasses.dataclass(frozen=True)
class Row:
    proxies: int
    scenario: str
    keys: int
    incremental_s: float
    full_s: float
    #: Keys the baseline translated (it scales its time by keys / sampled).
    sampled: int

    def line(self) -> str:
        ratio = self.full_s / self.incremental_s if self.incremental_s > 0 else float("inf")
        note = "" if self.sampled == self.keys else f"  (full: {self.sampled} keys, scaled)"
        return (
            f"{self.proxies:>7} {self.scenario:<11} {self.keys:>6} {self.incremental_s:>10.3f} "
            f"{self.full_s:>10.2f} {ratio:>9.0f}x{note}"
        )


HEADER = (
    f"{'proxies':>7} {'scenario':<11} {'keys':>6} {'incr. s':>10} {'full s':>10} {'full/incr':>10}"
)


def _cpu(work: Callable[[], object]) -> float:
    started = time.process_time()
    work()
    return time.process_time() - started


class Fleetworld:
    """The fleet's manifests in a directory, re-read after each edit, and its proxies."""

    def __init__(self, fleet: Fleet, directory: Path) -> None:
        self.fleet = fleet
        self.directory = directory
        fleet.write(directory)
        self.world = load_world(directory)
        self.proxies = [proxy_from_node(p.node_id, dict(p.metadata)) for p in fleet.proxies]
        self.step = 0

    def edit(self, change: Callable[[], None]) -> World:
        self.step += 1
        change()
        self.fleet.write(self.directory)
        self.world = load_world(self.directory)
        return self.world

    def annotation(self) -> None:
        self.fleet.service(0)["metadata"]["annotations"]["inferlane.io/timeout"] = (
            f"critical=30s,sheddable={120 + self.step}s"
        )

    def endpoint(self) -> None:
        pods = self.fleet.model_pods(0)
        set_ready(pods[self.step % len(pods)], False)

    def model_sidecars(self) -> dict[tuple[str, str], Proxy]:
        return {
            (p.namespace, p.pod_name): p
            for p, fp in zip(self.proxies, self.fleet.proxies, strict=True)
            if fp.role == "model"
        }


class Incremental:
    """The control plane's path: one MeshGenerator per generation, each from the last."""

    def __init__(self, secrets: SecretStore, proxies: Sequence[Proxy]) -> None:
        self.secrets = secrets
        self.interner = ResourceInterner()
        self.generator: MeshGenerator | None = None
        self.generation = 0
        self.proxies = proxies

    def install(self, world: World, sidecars: dict[tuple[str, str], Proxy]) -> list[Proxy]:
        self.generation += 1
        self.generator = MeshGenerator(world, sidecars, self.secrets, previous=self.generator)
        keys: dict[Hashable, Proxy] = {}
        for proxy in self.proxies:
            keys.setdefault(self.generator.key(proxy), proxy)
        return list(keys.values())

    def translate(self, representatives: Sequence[Proxy]) -> None:
        assert self.generator is not None
        for proxy in representatives:
            build_snapshot(self.interner, self.generator.generate(proxy), self.generation)


class Full:
    """The baseline: a whole translation per key, every message serialized, the outputs
    kept while the world and the sidecars stay the same (a renewal costs serializing)."""

    def __init__(self) -> None:
        self.interner = ResourceInterner()
        self.last: tuple[World, dict[tuple[str, str], Proxy]] | None = None
        self.outputs: dict[int, tuple[Proxy, Any]] = {}

    def translate(
        self, world: World, sidecars: dict[tuple[str, str], Proxy], sample: Sequence[Proxy]
    ) -> None:
        same = self.last is not None and self.last[0] is world and self.last[1] == sidecars
        if not same:
            self.outputs = {}
        self.last = (world, dict(sidecars))
        for proxy in sample:
            output = self.outputs.get(id(proxy))
            if output is None:
                output = self.outputs[id(proxy)] = (proxy, generate(world, proxy, sidecars))
            build_snapshot(self.interner, output[1])


def run(proxies: int, baseline_keys: int, seed: int = 7) -> list[Row]:
    fleet = build_fleet(FleetShape.scaled(proxies))
    secrets = SecretStore(CertificateAuthority.generate())
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="inferlane-translation-") as tmp:
        fw = Fleetworld(fleet, Path(tmp))
        inc = Incremental(secrets, fw.proxies)
        full_path = Full()
        sidecars: dict[tuple[str, str], Proxy] = {}
        for scenario in SCENARIOS:
            world = fw.world
            if scenario == "annotation":
                world = fw.edit(fw.annotation)
            elif scenario == "endpoint":
                world = fw.edit(fw.endpoint)
            elif scenario == "reconnect":
                sidecars = fw.model_sidecars()
            representatives = inc.install(world, sidecars)
            # Certificates are issued outside the clock: both paths need them alike.
            assert inc.generator is not None
            for proxy in representatives:
                identity = inc.generator.identity(proxy)
                if identity is not None:
                    secrets.bundle(identity)
            gc.collect()
            incremental = _cpu(partial(inc.translate, representatives))
            sample = (
                representatives
                if len(representatives) <= baseline_keys
                else random.Random(seed).sample(representatives, baseline_keys)
            )
            full = _cpu(partial(full_path.translate, world, sidecars, sample))
            full *= len(representatives) / len(sample)
            row = Row(proxies, scenario, len(representatives), incremental, full, len(sample))
            rows.append(row)
            print(row.line(), flush=True)
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        fresh = Incremental(secrets, fw.proxies)
        reps = fresh.install(fw.world, sidecars)
        fresh.translate(reps)
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        held = sum(s.size_diff for s in after.compare_to(before, "filename"))
        print(
            f"{proxies:>7} memory      translation memos and interned resources: "
            f"{held / 1024 / 1024:.1f} MiB, {held / proxies / 1024:.1f} KB per proxy",
            flush=True,
        )
        del fresh
    return rows


def main(argv: Sequence[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--fleet", default="1000", help="comma-separated fleet sizes (proxies)")
    p.add_argument(
        "--baseline-keys",
        type=int,
        default=400,
        help="config keys the full translation translates at most per scenario",
    )
    a = p.parse_args(argv)
    print(HEADER, flush=True)
    rows: list[Row] = []
    for n in (int(x) for x in a.fleet.split(",") if x.strip()):
        rows += run(n, a.baseline_keys)
    return rows


if __name__ == "__main__":
    main()

"""What each proxy should have: the seam between translation and streaming.

The streaming layer knows nothing of where config comes from. Whoever wires inferlane
together hands the cache a :class:`Generator`: a pure function from a proxy to its
resources, plus a key that says which proxies get identical config. Each change installs
a new generator (a new generation); snapshots are computed lazily, once per key per
generation, when a stream asks for one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Protocol

from mesh.proxy import Proxy
from xds_server.ads.snapshot import ResourceInterner, Snapshot, SnapshotError, build_snapshot

log = logging.getLogger(__name__)


class Generator(Protocol):
    """Translates the world, frozen inside the generator, into one proxy's resources."""

    def key(self, proxy: Proxy) -> Hashable:
        """Proxies with equal keys get identical resources (so they are generated once)."""
        ...

    def generate(self, proxy: Proxy) -> Mapping[str, Sequence[Any]]:
        """Envoy protobuf messages grouped by type URL."""
        ...


class SnapshotSource(Protocol):
    """What the ADS server reads snapshots from: a :class:`ConfigCache`, or (in a worker of
    ``inferlane serve --workers N``) the snapshots its primary process shipped."""

    @property
    def ready(self) -> bool: ...

    @property
    def generation(self) -> int: ...

    @property
    def change_ts(self) -> float | None: ...

    def snapshot_for(self, proxy: Proxy) -> Snapshot | None:
        """The proxy's snapshot, or None while it is not known yet."""
        ...


class GenerationError(Exception):
    """The generator failed or produced an inconsistent snapshot for a proxy."""


class EmptyGenerator:
    """Serves nothing: the state before the first world is known."""

    def key(self, proxy: Proxy) -> Hashable:
        return None

    def generate(self, proxy: Proxy) -> Mapping[str, Sequence[Any]]:
        return {}


class ConfigCache:
    """Holds the current generator and memoizes snapshots per proxy key."""

    def __init__(self, generator: Generator | None = None) -> None:
        self.interner = ResourceInterner()
        self.generator: Generator = EmptyGenerator()
        #: 0 until a generator is installed: nothing is served before the first world.
        self.generation = 0
        #: Monotonic time of the first change folded into the current generation.
        self.change_ts: float | None = None
        self._memo: dict[Hashable, Snapshot] = {}
        self.failures = 0
        if generator is not None:
            self.update(generator)

    @property
    def ready(self) -> bool:
        """Whether a generator has been installed (a world is known)."""
        return self.generation > 0

    def update(self, generator: Generator, change_ts: float | None = None) -> int:
        """Install a new generation. Streams pick it up when the server pushes."""
        self.generator = generator
        self.generation += 1
        self.change_ts = time.monotonic() if change_ts is None else change_ts
        self._memo = {}
        return self.generation

    def snapshot_for(self, proxy: Proxy) -> Snapshot:
        """The proxy's snapshot for the current generation; GenerationError if it fails."""
        key = self.generator.key(proxy)
        found = self._memo.get(key)
        if found is not None:
            return found
        try:
            snapshot = build_snapshot(
                self.interner, self.generator.generate(proxy), self.generation
            )
            snapshot.check_consistent()
        except SnapshotError as exc:
            self.failures += 1
            raise GenerationError(f"{proxy.node_id}: {exc}") from exc
        except Exception as exc:
            self.failures += 1
            log.exception("config generation failed for %s", proxy.node_id)
            raise GenerationError(f"{proxy.node_id}: generation failed: {exc!r}") from exc
        self._memo[key] = snapshot
        return snapshot

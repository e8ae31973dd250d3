"""What each proxy should have: the seam between translation and streaming.

The streaming layer knows nothing of where config comes from. Whoever wires inferlane
together hands the cache a :class:`Generator`: a pure function from a proxy to its
resources, plus a key that says which proxies get identical config. Each change installs
a new generator (a new generation); snapshots are computed lazily, once per key per
generation, when a stream asks for one.

Off the event loop: translating and serializing a snapshot is pure CPU work, and so is
signing a certificate the generator may need. With an ``executor`` (the control plane
gives it one worker thread), each build runs there, so the event loop keeps reading ACKs,
writing pushes and answering health checks meanwhile. One thread, not several: builds run
one at a time, so a generator's memos and the resource interner are never touched by two
threads at once, and the same inputs still give the same bytes. Streams that ask for one
key while it builds wait for that one build.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import Executor
from typing import Any, Protocol

from mesh.proxy import Proxy
from xds_server.ads.snapshot import (
    ResourceInterner,
    Snapshot,
    SnapshotError,
    build_snapshot,
    lru_get,
    lru_put,
)

log = logging.getLogger(__name__)

#: Snapshots one generation keeps, by config key, least recently used dropped first.
#: Every connected proxy's key is asked for at each push, so this must exceed the distinct
#: configs connected at once (identities x port variants, plus each backend pod's own); a
#: client that reconnects with ever new metadata adds keys, and past the bound only the
#: stalest are dropped (a stream holds its snapshot itself, so nothing is lost but sharing).
MAX_SNAPSHOTS_PER_GENERATION = 16_384


class Generator(Protocol):
    """Translates the world, frozen inside the generator, into one proxy's resources."""

    def key(self, proxy: Proxy) -> Hashable:
        """Proxies with equal keys get identical resources (so they are generated once).

        Runs on the event loop: it must be cheap and must not block (no signing).
        """
        ...

    def generate(self, proxy: Proxy) -> Mapping[str, Sequence[Any]]:
        """Envoy protobuf messages grouped by type URL.

        May run on the cache's worker thread, one build at a time. A group given as a
        tuple is taken as immutable, like every message in it: handing out the same tuple
        or message again (to another proxy, or in a later generation) costs a lookup, not
        a serialization (:class:`~xds_server.ads.snapshot.ResourceInterner`).
        """
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

    async def snapshot_for(self, proxy: Proxy) -> Snapshot | None:
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
    """Holds the current generator and memoizes snapshots per proxy key.

    ``executor``: where builds run (None: on the event loop, in the asking coroutine).
    """

    def __init__(
        self,
        generator: Generator | None = None,
        *,
        executor: Executor | None = None,
        max_snapshots: int = MAX_SNAPSHOTS_PER_GENERATION,
    ) -> None:
        self.interner = ResourceInterner()
        self.executor = executor
        self.max_snapshots = max_snapshots
        self.generator: Generator = EmptyGenerator()
        #: 0 until a generator is installed: nothing is served before the first world.
        self.generation = 0
        #: Monotonic time of the first change folded into the current generation.
        self.change_ts: float | None = None
        #: Least recently used first (``snapshot.lru_get``: every stream asks at every push).
        self._memo: dict[Hashable, Snapshot | asyncio.Future[Snapshot]] = {}
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

    async def snapshot_for(self, proxy: Proxy) -> Snapshot:
        """The proxy's snapshot for the current generation; GenerationError if it fails.

        If the generation moves on while the build runs, this generation's snapshot is
        still returned (its ``generation`` says which); the push that installed the new
        generation wakes the stream again.
        """
        generator, generation, memo = self.generator, self.generation, self._memo
        try:
            key = generator.key(proxy)
        except Exception as exc:
            self.failures += 1
            log.exception("config key failed for %s", proxy.node_id)
            raise GenerationError(f"{proxy.node_id}: config key failed: {exc!r}") from exc
        found = lru_get(memo, key)
        if isinstance(found, Snapshot):
            return found
        if found is None:
            found = asyncio.ensure_future(self._build(generator, generation, proxy))
            # Its failure is read by whoever waits; should every waiter have gone, here.
            found.add_done_callback(lambda f: f.cancelled() or f.exception())
            lru_put(memo, key, found, self.max_snapshots)
        try:
            # Shielded: a stream that goes away does not cancel a build others wait for.
            snapshot = await asyncio.shield(found)
        except GenerationError:
            if memo.get(key) is found:
                del memo[key]  # the next stream that asks tries again
            raise
        if memo.get(key) is found:
            memo[key] = snapshot
        return snapshot

    async def _build(self, generator: Generator, generation: int, proxy: Proxy) -> Snapshot:
        if self.executor is None:
            return self._compute(generator, generation, proxy)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.executor, self._compute, generator, generation, proxy
        )

    def _compute(self, generator: Generator, generation: int, proxy: Proxy) -> Snapshot:
        try:
            snapshot = build_snapshot(self.interner, generator.generate(proxy), generation)
            snapshot.check_consistent()
        except SnapshotError as exc:
            self.failures += 1
            raise GenerationError(f"{proxy.node_id}: {exc}") from exc
        except Exception as exc:
            self.failures += 1
            log.exception("config generation failed for %s", proxy.node_id)
            raise GenerationError(f"{proxy.node_id}: generation failed: {exc!r}") from exc
        return snapshot

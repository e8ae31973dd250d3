"""The cyclic garbage collector, set for a control plane's heap.

At 10,000 proxies a control plane holds millions of long-lived objects: the world, the
snapshots and their resources, every stream's state. With CPython's default thresholds
(700, 10, 10) a young collection runs every 700 new container objects, and a full one
whenever the objects that survived since the last grew by a quarter: at that size a full
collection walks the whole heap, holds the GIL for 0.3 to 0.7 s, wherever it starts, and
frees next to nothing (``docs/performance.md``). Reference counting frees most of the
control plane's garbage, and a cycle that dies young is still found by a young
collection, however rare; with a larger first threshold full collections become rare.

Full collections still have a use: a cycle that outlived a few young collections is
freed by nothing else, and gRPC leaves one per call (five small objects, found with
``gc.DEBUG_SAVEALL``), so a fleet that keeps reconnecting would grow the heap between
them. As Go's runtime forces a collection every two minutes, :func:`collect_periodically`
makes a full one every :data:`FULL_EVERY_S`: one pause of a fraction of a second every
two minutes, where the default thresholds made several per change.

``inferlane serve --gc-threshold N`` sets the first threshold (0: Python's defaults, and
no periodic collection), in the primary and in every worker, as Go's ``GOGC`` does for
istiod.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator

log = logging.getLogger(__name__)

#: Container objects allocated (net of those freed) between young collections.
DEFAULT_THRESHOLD = 50_000
#: Young collections between middle ones, and middle ones between full ones (which
#: CPython further delays until the long-lived objects grew by a quarter).
YOUNG_PER_MIDDLE = 50
MIDDLE_PER_FULL = 100


#: Seconds between full collections, with the threshold raised.
FULL_EVERY_S = 120.0


@contextlib.asynccontextmanager
async def tuned(threshold: int) -> AsyncIterator[None]:
    """While inside: young objects collected every ``threshold`` allocations, and a full
    collection every :data:`FULL_EVERY_S`. On the way out, the thresholds as they were
    (they are the process's). 0 changes nothing."""
    if threshold <= 0:
        yield
        return
    before = gc.get_threshold()
    gc.set_threshold(threshold, YOUNG_PER_MIDDLE, MIDDLE_PER_FULL)
    collecting = asyncio.create_task(collect_periodically(), name="full-gc")
    try:
        yield
    finally:
        collecting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await collecting
        gc.set_threshold(*before)


async def collect_periodically(interval: float = FULL_EVERY_S) -> None:
    """Run as a task: a full collection every ``interval`` seconds, whatever the counts."""
    while True:
        await asyncio.sleep(interval)
        found = gc.collect()
        log.debug("full garbage collection: %d unreachable objects", found)

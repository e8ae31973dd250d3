"""The cyclic garbage collector, set for a control plane's heap.

At 10,000 proxies a control plane holds millions of long-lived objects: the world, the
snapshots and their resources, every stream's state. With CPython's default thresholds
(700, 10, 10) a young collection runs every 700 new container objects, and a full one
whenever the objects that survived since the last grew by a quarter: at that size a full
collection walks the whole heap, holds the GIL for 0.3 to 0.7 s, wherever it starts, and
frees next to nothing (``docs/performance.md``). The control plane's garbage is mostly
freed by reference counting; its cycles are young (a failed task's traceback), so a
larger first threshold still collects them, and full collections become rare.

``inferlane serve --gc-threshold N`` sets the first threshold (0: Python's defaults), in
the primary and in every worker, as Go's ``GOGC`` does for istiod.
"""

from __future__ import annotations

import gc

#: Container objects allocated (net of those freed) between young collections.
DEFAULT_THRESHOLD = 50_000
#: Young collections between middle ones, and middle ones between full ones (which
#: CPython further delays until the long-lived objects grew by a quarter).
YOUNG_PER_MIDDLE = 50
MIDDLE_PER_FULL = 100


def tune(threshold: int) -> None:
    """Collect young objects every ``threshold`` allocations; 0 keeps Python's defaults."""
    if threshold > 0:
        gc.set_threshold(threshold, YOUNG_PER_MIDDLE, MIDDLE_PER_FULL)

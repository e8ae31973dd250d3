"""The push queue: at most one pending push per connection, a cap on pushes in progress."""

from __future__ import annotations

import collections
from typing import Protocol


class Pushable(Protocol):
    """What the queue needs of a connection: a stable id and a way to wake its stream."""

    @property
    def id(self) -> int: ...

    def wake(self) -> None: ...


class PushQueue:
    """At most one pending push per connection, and at most ``limit`` in progress.

    As Istio's ``pushqueue.go``: a connection already waiting is not queued twice (it
    takes the newest snapshot when its turn comes), one being pushed is queued again
    when it finishes. A finishing push hands its slot to the next connection directly,
    so a push to ten thousand streams wakes each stream once and creates no waiters.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._order: collections.deque[Pushable] = collections.deque()
        self._pending: set[int] = set()
        self._active: set[int] = set()
        self._again: set[int] = set()

    def __len__(self) -> int:
        return len(self._pending)

    def enqueue(self, conn: Pushable) -> None:
        if conn.id in self._active:
            self._again.add(conn.id)
        else:
            self._add(conn)
        self._dispatch()

    def done(self, conn: Pushable) -> None:
        self._active.discard(conn.id)
        if conn.id in self._again:
            self._again.discard(conn.id)
            self._add(conn)
        self._dispatch()

    def forget(self, conn: Pushable) -> None:
        self._pending.discard(conn.id)  # its entry in the order is skipped when reached
        self._again.discard(conn.id)
        if conn.id in self._active:
            self.done(conn)

    def _add(self, conn: Pushable) -> None:
        if conn.id not in self._pending:
            self._pending.add(conn.id)
            self._order.append(conn)

    def _dispatch(self) -> None:
        while self._order and len(self._active) < self.limit:
            conn = self._order.popleft()
            if conn.id not in self._pending:
                continue
            self._pending.discard(conn.id)
            self._active.add(conn.id)
            conn.wake()

"""The push queue: one pending push per connection, a cap on pushes in progress."""

from __future__ import annotations

from dataclasses import dataclass, field

from xds_server.ads.pushqueue import PushQueue


@dataclass(eq=False)
class FakeConn:
    id: int
    woken: list[int] = field(default_factory=list)

    def wake(self) -> None:
        self.woken.append(self.id)


def test_cap_dedup_and_requeue() -> None:
    q = PushQueue(limit=2)
    conns = [FakeConn(i) for i in range(4)]
    for c in conns:
        q.enqueue(c)
    q.enqueue(conns[3])  # already pending: not queued twice
    assert [len(c.woken) for c in conns] == [1, 1, 0, 0]
    assert len(q) == 2
    q.enqueue(conns[0])  # in progress: pushed again after
    q.done(conns[0])
    assert [len(c.woken) for c in conns] == [1, 1, 1, 0]
    q.forget(conns[3])  # closed while pending: never woken
    q.done(conns[1])
    q.done(conns[2])
    assert [len(c.woken) for c in conns] == [2, 1, 1, 0]
    q.done(conns[0])
    assert len(q) == 0

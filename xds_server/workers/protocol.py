"""The primary and a worker speak over a socket pair: length-prefixed pickles.

Both ends are the same program started by the same user, so pickle is safe here; nothing
read from the network is ever unpickled. Messages are tuples whose first item names them:

worker -> primary
  ("ready", port)                        serving on the shared port
  ("admit", request_id, proxy, peer)     may this stream be served, as what?
  ("opened", stream_id, proxy)           an admitted stream
  ("closed", stream_id)
  ("reply", request_id, data)            an answer to "request"
  ("log", record)                        a log record's fields, for the primary's log

primary -> worker
  ("admitted", request_id, proxy_or_refusal)
  ("push", Shipment)                     snapshots and which stream gets which
  ("request", request_id, what)          "syncz", "connections" or "metrics"
"""

from __future__ import annotations

import asyncio
import copyreg
import pickle
import struct
import types
from dataclasses import dataclass, field
from typing import Any

from xds_server.ads.snapshot import Resource


def _frozen(items: dict[Any, Any]) -> types.MappingProxyType[Any, Any]:
    return types.MappingProxyType(items)


# The model's frozen mappings (a proxy's labels) travel as what they wrap.
copyreg.pickle(types.MappingProxyType, lambda m: (_frozen, (dict(m),)))

_HEADER = struct.Struct("!I")
#: Largest message accepted: a full fleet's first shipment is tens of megabytes.
MAX_MESSAGE_BYTES = 1 << 30


@dataclass(frozen=True)
class Shipment:
    """One generation's snapshots for one worker, as what the worker lacks plus ids.

    Resources, per-type groups and snapshots are numbered by the primary and sent once per
    worker; ``assign`` names every stream's snapshot. The worker keeps exactly what the
    current assignments reference, and so does the primary's record of what it holds.
    """

    generation: int
    change_ts: float | None
    resources: dict[int, Resource] = field(default_factory=dict)
    #: Group id -> (type URL, resource ids).
    groups: dict[int, tuple[str, tuple[int, ...]]] = field(default_factory=dict)
    #: Snapshot id -> group ids.
    snapshots: dict[int, tuple[int, ...]] = field(default_factory=dict)
    #: Stream id -> snapshot id; only streams whose snapshot is known.
    assign: dict[int, int] = field(default_factory=dict)
    #: Whether every stream of the worker is listed (a generation), or only some (opens).
    complete: bool = True


class Channel:
    """One end of the socket pair."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, message: tuple[Any, ...]) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self.writer.write(_HEADER.pack(len(data)) + data)
        await self.writer.drain()

    async def receive(self) -> tuple[Any, ...] | None:
        """The next message, or None when the other end has gone."""
        try:
            (size,) = _HEADER.unpack(await self.reader.readexactly(_HEADER.size))
            if size > MAX_MESSAGE_BYTES:
                raise ConnectionError(f"message of {size} bytes")
            message: tuple[Any, ...] = pickle.loads(await self.reader.readexactly(size))
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        return message

    def close(self) -> None:
        self.writer.close()

"""Room events across nodes: one Redis stream per room, one inbox stream per node.

Why streams and not pub/sub: a stream gives every event one server-assigned id and one
order that every node reads alike (chat must arrive "in the same order everywhere"), and a
node that lost its Redis connection for a moment resumes from the last id it saw instead
of silently missing what was published meanwhile.

Each node runs one reader over its inbox and the streams of the rooms that have local
sessions; when that set changes it writes a `wake` entry to its own inbox so the blocking
read picks up the new streams at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from node.state import keys
from node.state.connect import is_cluster, slot_of
from node.state.sessions import Membership

log = logging.getLogger(__name__)

INBOX_MAXLEN = 1000
ROOM_MAXLEN = 2000
BLOCK_MS = 2000

# (room slug or None for the inbox, event id, event type, event data)
Deliver = Callable[[str | None, str, str, dict[str, Any]], Awaitable[None]]


#: the type of the event a resync delivers (never in a stream)
PRESENCE = "presence"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def stream_id_key(event_id: str) -> tuple[int, int]:
    millis, _, seq = event_id.partition("-")
    return int(millis), int(seq or 0)


# KEYS[1] the room's events, KEYS[2] its members. ARGV: type, data, maxlen, TTL ms. An event
# (a chat, say) added to a room nobody is in keeps the stream expiring, as the room does.
_PUBLISH = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'type', ARGV[1],
  'data', ARGV[2])
if redis.call('EXISTS', KEYS[2]) == 0 then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
return id
"""


class EventPump:
    def __init__(
        self, redis: Redis, node: str, deliver: Deliver, empty_ttl_s: float = 24 * 3600.0
    ) -> None:
        self._redis = redis
        self._publish = redis.register_script(_PUBLISH)
        self._empty_ttl_ms = int(empty_ttl_s * 1000)
        self._node = node
        self._deliver = deliver
        self._inbox = keys.node_inbox(node)
        self._positions: dict[str, str] = {self._inbox: f"{int(time.time() * 1000)}-0"}
        self._rooms: dict[str, str] = {}  # stream key -> slug
        self._cluster = is_cluster(redis)
        # cluster only: the reader of each hash slot, and the flag that makes it re-read
        self._readers: dict[int, asyncio.Task[None]] = {}
        self._changed: dict[int, asyncio.Event] = {}
        self._running = False
        self.healthy = asyncio.Event()
        # room streams whose members are to be re-read before the next read (`resync`)
        self._resync: set[str] = set()

    async def watch(self, slug: str, after_id: str) -> None:
        stream = keys.room_events(slug)
        if stream in self._positions:
            if stream_id_key(after_id) < stream_id_key(self._positions[stream]):
                self._positions[stream] = after_id
            return
        self._positions[stream] = after_id
        self._rooms[stream] = slug
        if self._cluster:
            self._spawn(self._slot(stream))
        else:
            await self.send_to_node(self._node, "wake", {})

    async def events_after(self, slug: str, after_id: str) -> list[tuple[str, str, dict[str, Any]]]:
        """The room's events after `after_id`, oldest first (a joining connection's backlog)."""
        entries: Any = await self._redis.xrange(keys.room_events(slug), min=f"({after_id}")
        backlog = []
        for raw_id, fields in entries:
            event_type = fields.get(b"type", b"").decode()
            try:
                data = json.loads(fields.get(b"data", b"{}"))
            except ValueError:
                continue
            event_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            backlog.append((event_id, event_type, data))
        return backlog

    async def resync(self) -> None:
        """Re-read every watched room's members and deliver them as a `presence` event
        (data: the active members' public records) in stream order: after a failover the
        promoted replica may lack the last events the nodes read (or never read) from the
        old primary, and what each client was told must be brought back to what Redis
        holds. Done by the readers themselves, before their next read."""
        self._resync.update(self._rooms)
        if self._cluster:
            for slot in {self._slot(stream) for stream in self._resync}:
                self._spawn(slot)
        else:
            await self.send_to_node(self._node, "wake", {})

    def _resync_due(self, slot: int | None) -> list[str]:
        return [s for s in self._resync if slot is None or self._slot(s) == slot]

    async def _resync_rooms(self, slot: int | None) -> None:
        for stream in self._resync_due(slot):
            await self._resync_room(stream)
            # (only once done: a read that failed is tried again with the next read)
            self._resync.discard(stream)

    async def _resync_room(self, stream: str) -> None:
        slug = self._rooms.get(stream)
        if slug is None:
            return  # unwatched meanwhile
        # The members and the stream's newest id in one transaction (one slot): the
        # members as of that event.
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(keys.room_members(slug))
            pipe.xrevrange(stream, count=1)
            raw_members, newest = await pipe.execute()
        last = _text(newest[0][0]) if newest else "0-0"
        position = self._positions.get(stream, "0-0")
        if stream_id_key(last) > stream_id_key(position):
            # Events before the snapshot not read yet: delivered first, in order.
            entries: Any = await self._redis.xrange(stream, min=f"({position}", max=last)
            for raw_id, fields in entries:
                if self._rooms.get(stream) != slug:
                    break
                self._positions[stream] = _text(raw_id)
                await self._dispatch(slug, _text(raw_id), fields)
            position = last
        if self._rooms.get(stream) != slug:
            return
        # (lost events may have left `position` past the stream's end: the snapshot
        # stands at the newest id this node delivered)
        members = [Membership.decode(raw) for raw in raw_members.values()]
        participants = [m.public() for m in members if m.state == "active"]
        try:
            await self._deliver(slug, position, PRESENCE, {"participants": participants})
        except Exception:
            log.exception("events.deliver_failed", extra={"event": PRESENCE, "room": slug})

    def unwatch(self, slug: str) -> None:
        stream = keys.room_events(slug)
        self._positions.pop(stream, None)
        self._rooms.pop(stream, None)

    async def publish(self, slug: str, event_type: str, data: dict[str, Any]) -> str:
        event_id = await self._publish(
            keys=[keys.room_events(slug), keys.room_members(slug)],
            args=[
                event_type,
                json.dumps(data, separators=(",", ":")),
                ROOM_MAXLEN,
                self._empty_ttl_ms,
            ],
        )
        return event_id.decode() if isinstance(event_id, bytes) else str(event_id)

    async def send_to_node(self, node: str, event_type: str, data: dict[str, Any]) -> None:
        await self._redis.xadd(
            keys.node_inbox(node),
            {"type": event_type, "data": json.dumps(data, separators=(",", ":"))},
            maxlen=INBOX_MAXLEN,
            approximate=True,
        )

    async def run(self) -> None:
        """Read and deliver until cancelled; reconnects with backoff when Redis is away.

        On one server (or a Sentinel-managed primary) one blocking XREAD covers every stream.
        A cluster serves a multi-stream XREAD only within one hash slot, so there each slot
        with watched streams (a room's, the inbox) gets a reader of its own."""
        if not self._cluster:
            await self._read(None)
            return
        self._running = True
        try:
            for slot in {self._slot(stream) for stream in self._positions}:
                self._spawn(slot)
            await asyncio.Event().wait()
        finally:
            self._running = False
            readers = list(self._readers.values())
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            self._readers.clear()

    def _slot(self, stream: str) -> int:
        return slot_of(self._redis, stream)

    def _spawn(self, slot: int) -> None:
        if not self._running:
            return  # run() starts a reader for every watched slot
        if slot in self._readers:
            self._changed.setdefault(slot, asyncio.Event()).set()
            return
        self._changed[slot] = asyncio.Event()
        reader = asyncio.create_task(self._read(slot), name=f"events-slot-{slot}")
        self._readers[slot] = reader
        reader.add_done_callback(lambda _: self._reader_done(slot, reader))

    def _reader_done(self, slot: int, reader: asyncio.Task[None]) -> None:
        if self._readers.get(slot) is reader:
            del self._readers[slot]
            self._changed.pop(slot, None)

    async def _read(self, slot: int | None) -> None:
        """Read the watched streams (of `slot`, or all of them) and deliver, in a loop."""
        backoff = 0.1
        while True:
            streams: dict[Any, Any] = {
                stream: position
                for stream, position in self._positions.items()
                if slot is None or self._slot(stream) == slot
            }
            if not streams:
                return  # its rooms were all unwatched; a watch starts a new reader
            try:
                if self._resync_due(slot):
                    await self._resync_rooms(slot)
                    continue  # (it may have read on: the positions are new)
                batches = await self._xread(streams, slot)
                self.healthy.set()
                backoff = 0.1
            except (RedisError, OSError) as error:
                self.healthy.clear()
                log.warning("events.read_failed", extra={"error": str(error), "retry_s": backoff})
                await asyncio.sleep(backoff * (1 + random.random() / 2))  # noqa: S311
                backoff = min(backoff * 2, 2.0)
                continue
            for raw_stream, entries in batches or []:
                stream = raw_stream.decode() if isinstance(raw_stream, bytes) else raw_stream
                for raw_id, fields in entries:
                    event_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
                    if stream in self._positions:
                        self._positions[stream] = event_id
                    slug = None if stream == self._inbox else self._rooms.get(stream)
                    if stream != self._inbox and slug is None:
                        continue  # unwatched meanwhile
                    await self._dispatch(slug, event_id, fields)

    async def _xread(self, streams: dict[Any, Any], slot: int | None) -> Any:
        """One blocking XREAD; a cluster slot's read is cut short (nothing read, positions
        unchanged) when a stream of that slot is newly watched, so the next read has it."""
        changed = None if slot is None else self._changed.get(slot)
        if changed is None:
            return await self._redis.xread(streams, count=200, block=BLOCK_MS)
        changed.clear()
        read = asyncio.ensure_future(self._redis.xread(streams, count=200, block=BLOCK_MS))
        woken = asyncio.ensure_future(changed.wait())
        cut = False
        try:
            await asyncio.wait({read, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            if not read.done():
                cut = True
                read.cancel()
                # Cancel only asks: its end is awaited (reading `read` before raised
                # InvalidStateError and the slot's reader died). Whatever it returned is
                # read again: the positions did not move.
                await asyncio.gather(read, return_exceptions=True)
        return [] if cut else read.result()

    async def _dispatch(self, slug: str | None, event_id: str, fields: dict[bytes, bytes]) -> None:
        event_type = fields.get(b"type", b"").decode()
        try:
            data = json.loads(fields.get(b"data", b"{}"))
        except ValueError:
            log.error("events.undecodable", extra={"event_id": event_id})
            return
        if event_type == "wake":
            return
        try:
            await self._deliver(slug, event_id, event_type, data)
        except Exception:
            log.exception("events.deliver_failed", extra={"event_id": event_id, "room": slug})

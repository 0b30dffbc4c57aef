"""The live half of a node: sessions, rooms and events, with their background loops.

Owns the node's registry record (heartbeat), the reaper of dead nodes' sessions, the event
reader, and the drain on shutdown (S5). Redis outages are retried with backoff; when Redis
answers again, the node re-asserts its live sessions (item 9 of the Sessions issue).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from node.config import Settings
from node.media import adapter
from node.media.session import MediaHub
from node.runtime.metrics import NodeMetrics
from node.state import keys
from node.state.connect import on_primary_moved, server_id
from node.state.events import PRESENCE, EventPump
from node.state.hub import CLOSE_DRAINING, Connection, Hub
from node.state.limits import WindowLimiter
from node.state.lock import DistributedLock, LockError
from node.state.registry import NodeInfo, Registry
from node.state.sessions import Membership, SessionRecord, SessionStore, participant_state

log = logging.getLogger(__name__)

#: room events that say (or end) a participant's screen share
_STATE_EVENTS = ("participant-joined", "participant-state", "participant-left")


class Live:
    def __init__(self, settings: Settings, redis: Redis, lock_redis: list[Redis]) -> None:
        live = settings.live
        self.settings = settings
        self.redis = redis
        self.lock_redis = lock_redis
        sentinel = settings.redis.mode == "sentinel"
        self.lock = DistributedLock(
            [redis, *lock_redis],
            redis,
            ttl_s=live.lock_ttl_s,
            wait_s=live.lock_wait_s,
            fence_replicas=settings.redis.wait_replicas if sentinel else 0,
            fence_wait_ms=settings.redis.wait_timeout_ms,
        )
        self.sessions = SessionStore(
            redis,
            self.lock,
            settings.node_name,
            settings.region,
            # A seat is never held longer than its room token could still be used.
            pending_ttl_s=min(live.pending_seat_ttl_s, settings.tokens.room_ttl_s),
            session_ttl_s=settings.tokens.session_ttl_s,
            kick_ttl_s=settings.rooms.removed_for_s,
            seat_grace_s=live.seat_grace_s,
            empty_ttl_s=settings.rooms.empty_ttl_s,
        )
        self.hub = Hub()
        self.limits = WindowLimiter(redis)
        self.events = EventPump(
            redis, settings.node_name, self._deliver, empty_ttl_s=settings.rooms.empty_ttl_s
        )
        # told the slug of a room whose membership changed (the relay re-plans)
        self.on_room_changed: Callable[[str], None] | None = None
        self.hub.on_room_empty = self.events.unwatch
        self.media = MediaHub(settings.media, self.media_failed)
        self.media.members = lambda slug: set(self.hub.rooms.get(slug, ()))
        self.hub.on_leave = self.media.left
        self.registry = Registry(
            redis,
            NodeInfo(settings.node_name, settings.region, settings.base_url, time.time()),
            live.node_ttl_s,
            live.node_url_memory_s,
        )
        self.metrics: NodeMetrics | None = None
        self.draining = False
        self.redis_ok = False
        self._registered = False
        # Heartbeats, monotonic: when the last one succeeded, and since when they have come
        # without a gap. After a gap (Redis away, or a Sentinel failover that held commands
        # in retries) other nodes' records may have run out for the same reason, not because
        # those nodes died: the reaper waits one node TTL of steady beats before reaping.
        self._beat_ok_at: float | None = None
        self._beat_failed = False
        self._steady_since = float("-inf")
        self._tasks: list[asyncio.Task[None]] = []
        self._cleanups: set[asyncio.Task[Any]] = set()
        # The Redis server that answered the last beat (its run_id): another one means a
        # failover or restart, which may have lost the last writes (`_server_changed`).
        self._server: str | None = None
        # Lost writes to make good (`_make_good`), and the task doing it.
        self._repair_due = False
        self._repair: asyncio.Task[None] | None = None
        # Set when a connection found the primary moved (Sentinel): beat at once.
        self._beat_now = asyncio.Event()
        on_primary_moved(redis, self._beat_now.set)

    @property
    def name(self) -> str:
        return self.settings.node_name

    async def start(self) -> None:
        """Start the loops; the first registration happens in the heartbeat, which keeps
        trying while Redis is away (the node reports not-ready until then).

        Refuses to start (RuntimeError) when the installed aiortc lacks what the media core
        relies on."""
        adapter.check_aiortc()
        if self.settings.media.host_addresses:
            adapter.set_host_addresses(self.settings.media.host_addresses)
        await self._beat()
        self._tasks = [
            asyncio.create_task(self.events.run(), name="events"),
            asyncio.create_task(self._heartbeat(), name="heartbeat"),
            asyncio.create_task(self._reaper(), name="reaper"),
        ]

    async def _deliver(
        self, slug: str | None, event_id: str, event_type: str, data: dict[str, Any]
    ) -> None:
        await self.hub.deliver(slug, event_id, event_type, data)
        if slug is not None and event_type in _STATE_EVENTS:
            # the screen share comes first in each subscriber's layer allocation
            raw = data.get("state") if event_type == "participant-state" else data.get("flags")
            screen = participant_state(raw).get("screen_mid")
            if event_type == "participant-left" or not isinstance(screen, str):
                screen = None
            self.media.set_screen(str(data.get("session_id", "")), screen)
        if slug is not None and (event_type.startswith("participant-") or event_type == PRESENCE):
            if self.on_room_changed is not None:
                self.on_room_changed(slug)

    def run_cleanup(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run state cleanup as its own task: a cancelled request must not cut it short."""
        task = asyncio.create_task(work)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        return task

    async def end_connection(self, conn: Connection, reason: str) -> None:
        self.hub.leave_room(conn)
        if self.metrics is not None:
            self.metrics.sessions_ended.labels(reason).inc()
        if conn.superseded:
            return
        for attempt in range(5):
            try:
                await self.sessions.end_session(conn.session_id, conn.generation, reason)
                return
            except (RedisError, OSError, LockError) as error:
                log.warning(
                    "session.end_retry", extra={"session_id": conn.session_id, "error": str(error)}
                )
                await asyncio.sleep(0.2 * 2**attempt)
        # Left for the reaper: this node's record stays, but a restart reaps its own leftovers.
        log.error("session.end_failed", extra={"session_id": conn.session_id})

    async def media_failed(self, session_id: str, generation: int) -> None:
        """The hook the media layer calls when a session's WebRTC connection fails or closes:
        the same idempotent, generation-guarded leave as every other way out (S3)."""
        conn = self.hub.connections.get(session_id)
        if conn is None or conn.generation != generation or conn.room is None:
            return
        slug = conn.room
        await self.sessions.leave(slug, session_id, generation, "media-failed")
        self.hub.leave_room(conn)
        conn.send({"type": "left", "room": slug, "reason": "media-failed"})

    async def drain(self) -> None:
        """S5: tell clients where to go, end every local session, leave the registry."""
        self.draining = True
        try:
            others = [n for n in await self.registry.live() if n.name != self.name]
        except (RedisError, OSError):
            others = []
        target = random.choice(others) if others else None  # noqa: S311
        notice: dict[str, Any] = {"type": "reconnect", "node": target.name if target else None}
        if target is not None:
            notice["url"] = target.url
        connections = list(self.hub.connections.values())
        for conn in connections:
            conn.close(CLOSE_DRAINING, notice, reason="node-draining")
        await asyncio.gather(
            *(self.end_connection(conn, "node-draining") for conn in connections),
            return_exceptions=True,
        )
        log.info("node.drained", extra={"sessions": len(connections), "to": notice["node"]})

    async def stop(self) -> None:
        tasks = [*self._tasks, *([self._repair] if self._repair is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._cleanups:
            await asyncio.wait(list(self._cleanups), timeout=10)
        await self.media.close()
        if self.settings.media.host_addresses:
            adapter.set_host_addresses(None)
        try:
            await self.registry.deregister()
        except (RedisError, OSError) as error:
            log.warning("node.deregister_failed", extra={"error": str(error)})

    async def _heartbeat(self) -> None:
        period = self.settings.live.node_ttl_s / 3
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._beat_now.wait(), period if self.redis_ok else min(period, 0.5)
                )
            self._beat_now.clear()
            await self._beat()

    async def _beat(self) -> None:
        try:
            if not self._registered:
                # Sessions left in Redis by an earlier life of this node (a crash) are dead.
                reaped = await self.sessions.reap_node(self.name)
                self._server = await server_id(self.redis)
                await self.registry.register()
                self._registered = True
                log.info("node.registered", extra={"reaped_own_sessions": reaped})
            else:
                server = await server_id(self.redis)
                moved = server != self._server and None not in (server, self._server)
                if not await self.registry.is_registered():
                    # Our record should outlive several beats: its absence means Redis lost
                    # its data (restart, failover), however short the outage was. Sessions
                    # go back first, so that being registered again means being whole again.
                    log.warning("redis.state_lost")
                    await self._reassert()
                    self._repair_due = True
                elif moved:
                    # Another server (a promoted replica): replication is asynchronous, so
                    # the last writes before the failover may be gone though the rest is
                    # there (seen: a join announced from the old primary, missing on the
                    # new one, and one person missing on the other pages for good).
                    log.warning("redis.server_changed")
                    self._repair_due = True
                elif not self.redis_ok:
                    log.info("redis.back")
                self._server = server
                await self.registry.register()
                if self._repair_due and (self._repair is None or self._repair.done()):
                    # Beside the beats, never in their way: the room locks it takes may wait
                    # for a replica for seconds, and a beat held that long let this node's
                    # record run out (the other nodes then reaped its sessions).
                    self._repair = asyncio.create_task(self._make_good(), name="redis-repair")
            self.redis_ok = True
            self._beat_done()
        except (RedisError, OSError, LockError) as error:
            self._beat_failed = True
            if self.redis_ok or not self._registered:
                log.warning("redis.unreachable", extra={"error": str(error)})
            self.redis_ok = False

    async def _make_good(self) -> None:
        """After Redis lost (or may have lost) writes: the live sessions and memberships go
        back, then every local page's presence is brought back to what Redis holds."""
        self._repair_due = False
        try:
            await self._reassert()
            await self._end_ghosts()
            # The other nodes put theirs back at their next beat: compared any sooner, their
            # people would vanish from the pages here for a moment.
            await asyncio.sleep(self.settings.live.node_ttl_s / 3)
            await self.events.resync()
        except (RedisError, OSError, LockError) as error:
            self._repair_due = True  # again after the next beat
            log.warning("redis.repair_failed", extra={"error": str(error)})

    def _beat_done(self) -> None:
        now = time.monotonic()
        # A beat is due every node_ttl_s / 3: one that came two periods late broke the run.
        late = self._beat_ok_at is not None and now - self._beat_ok_at > (
            self.settings.live.node_ttl_s * 2 / 3
        )
        if late or self._beat_failed:
            self._steady_since = now
        self._beat_failed = False
        self._beat_ok_at = now

    def steady(self) -> bool:
        """Whether this node's heartbeats have run without a gap for a node TTL: only then
        does a missing record of another node mean that node is dead."""
        return time.monotonic() - self._steady_since >= self.settings.live.node_ttl_s

    async def _end_ghosts(self) -> None:
        """End what Redis says this node holds though no connection here has it: the end
        of those sessions (a page refreshed, a tab closed) was among the writes the failover
        lost, and nothing else would ever end them (this node is alive, so nobody reaps it):
        every page of the room would show a ghost. An active membership of this node is
        only made by a connection here, so one without a connection is a ghost; a pending
        one (a join under way) is left alone, and so is a session that connects meanwhile."""
        ended = 0
        for raw_slug in await self.redis.smembers(keys.ROOMS_LIVE):
            slug = raw_slug.decode() if isinstance(raw_slug, bytes) else str(raw_slug)
            for member in await self.sessions.members(slug):
                if (
                    member.node == self.name
                    and member.state == "active"
                    and member.session_id not in self.hub.connections
                ):
                    left = await self.sessions.leave(
                        slug, member.session_id, member.generation, "resync"
                    )
                    ended += left is not None
        for raw_id in await self.redis.smembers(keys.node_sessions(self.name)):
            session_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            record = await self.sessions.get(session_id)
            if (
                record is not None
                and record.node == self.name
                and record.room
                and session_id not in self.hub.connections
            ):
                ended += await self.sessions.end_session(session_id, record.generation, "resync")
        if ended:
            log.warning("sessions.ghosts_ended", extra={"ended": ended})

    async def _reassert(self) -> None:
        for conn in list(self.hub.connections.values()):
            record = SessionRecord(
                conn.session_id,
                conn.user_id,
                self.name,
                self.settings.region,
                time.time(),
                conn.generation,
                conn.room or "",
            )
            membership = None
            if conn.room:
                membership = Membership(
                    conn.session_id,
                    conn.user_id,
                    conn.display_name,
                    self.name,
                    conn.generation,
                    "active",
                    time.time(),
                )
            await self.sessions.reassert(
                record, membership, partial(self._still_live, conn, conn.room)
            )
        log.info("sessions.reasserted", extra={"sessions": len(self.hub.connections)})

    def _still_live(self, conn: Connection, room: str | None) -> bool:
        """Whether `conn` is still this node's connection of its session, in `room`."""
        return (
            self.hub.connections.get(conn.session_id) is conn
            and conn.close_code is None
            and conn.room == room
        )

    async def _reaper(self) -> None:
        period = self.settings.live.reaper_period_s
        while True:
            await asyncio.sleep(period * (0.8 + random.random() * 0.4))  # noqa: S311
            if not self.steady():
                log.info("reaper.waiting", extra={"reason": "heartbeat gap, records may lag"})
                continue
            try:
                for name in await self.registry.expired():
                    if name == self.name:
                        continue
                    ended = await self.sessions.reap_node(name)
                    await self.registry.forget(name)
                    log.info("node.reaped", extra={"dead_node": name, "sessions": ended})
            except (RedisError, OSError, LockError) as error:
                log.warning("reaper.failed", extra={"error": str(error)})

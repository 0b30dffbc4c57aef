"""The cluster as one node sees it: Serf members, their tags, coordinates and status.

Built from `members` at start, kept current by the `member-*` event stream, and resynced
from `members` every `resync_s` (a stream misses what happens while its connection is
down). Each alive member's Vivaldi coordinate is refreshed every `coordinates_s`. Tags are
validated: a member with a malformed tag is kept, with the bad tag dropped and logged once.

`on_failed(name)` runs when Serf declares a member failed (not when it leaves gracefully).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from mesh.serf import Event, Member, SerfClient, SerfError
from mesh.vivaldi import Coordinate, CoordinateError

log = logging.getLogger(__name__)

MEMBER_EVENTS = "member-join,member-leave,member-failed,member-update,member-reap"
_REGION = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_URL = re.compile(r"^https?://[^\s/]+(/[^\s]*)?$")
_VERSION = re.compile(r"^[0-9A-Za-z.+-]{1,32}$")
#: host:port of a node's own /metrics listener (a name, IPv4, or [IPv6])
_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]{1,253}):[0-9]{1,5}$")


@dataclass(frozen=True)
class Load:
    """What a node publishes about its load in the `load` tag (JSON `{"s": n, "c": pct}`)."""

    sessions: int = 0
    cpu_percent: float = 0.0

    def tag(self) -> str:
        return json.dumps({"s": self.sessions, "c": round(self.cpu_percent, 1)})

    @classmethod
    def parse(cls, raw: str) -> Load:
        value = json.loads(raw)
        if not isinstance(value, dict):
            raise ValueError("load must be an object")
        sessions, cpu = value.get("s", 0), value.get("c", 0.0)
        if not isinstance(sessions, int) or isinstance(sessions, bool) or sessions < 0:
            raise ValueError("load.s must be a count")
        if not isinstance(cpu, int | float) or isinstance(cpu, bool) or not 0 <= cpu <= 10_000:
            raise ValueError("load.c must be a percentage")
        return cls(sessions, float(cpu))


@dataclass(frozen=True)
class NodeMember:
    """One member of the cluster with its validated tags."""

    name: str
    addr: str
    port: int
    status: str  # alive, leaving, left, failed
    region: str = ""
    http: str = ""  # public base URL of the node's HTTP API and web client
    media: tuple[str, ...] = ()  # addresses its media (ICE) uses
    version: str = ""
    #: host:port of the node's /metrics when it has a listener of its own (`metrics.listen`);
    #: "" = /metrics is on `http`
    metrics: str = ""
    load: Load = field(default_factory=Load)
    coordinate: Coordinate | None = None

    @property
    def alive(self) -> bool:
        return self.status == "alive"

    @property
    def ws_url(self) -> str:
        return self.http.replace("http", "ws", 1) + "/ws" if self.http else ""


def member_from_serf(member: Member, warn: Callable[[str, str], None] | None = None) -> NodeMember:
    """A `NodeMember` from Serf's record; each malformed tag is dropped (and reported)."""
    tags = member.tags
    fields: dict[str, Any] = {}

    def bad(tag: str) -> str:
        if warn is not None:
            warn(member.name, tag)
        return ""

    region = tags.get("region", "")
    if region:
        fields["region"] = region if _REGION.match(region) else bad("region")
    http = tags.get("http", "")
    if http:
        fields["http"] = http.rstrip("/") if _URL.match(http) else bad("http")
    media = tags.get("media", "")
    if media:
        addresses = tuple(a for a in media.split(",") if a)
        if all(re.fullmatch(r"[0-9a-fA-F:.]{2,45}", a) for a in addresses):
            fields["media"] = addresses
        else:
            bad("media")
    version = tags.get("version", "")
    if version:
        fields["version"] = version if _VERSION.match(version) else bad("version")
    metrics = tags.get("metrics", "")
    if metrics:
        fields["metrics"] = metrics if _HOST_PORT.match(metrics) else bad("metrics")
    load = tags.get("load", "")
    if load:
        try:
            fields["load"] = Load.parse(load)
        except (ValueError, TypeError):
            bad("load")
    return NodeMember(member.name, member.addr, member.port, member.status, **fields)


class MembershipView:
    """This node's live view of the Serf cluster (see the module docstring)."""

    def __init__(
        self,
        serf: SerfClient,
        *,
        on_failed: Callable[[str], Coroutine[Any, Any, None]] | None = None,
        resync_s: float = 30.0,
        coordinates_s: float = 5.0,
    ) -> None:
        self.serf = serf
        self.on_failed = on_failed
        self.resync_s = resync_s
        self.coordinates_s = coordinates_s
        self.members: dict[str, NodeMember] = {}
        #: monotonic time of the last successful resync (None before the first)
        self.synced_at: float | None = None
        self._warned: set[tuple[str, str]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._callbacks: set[asyncio.Task[None]] = set()

    def alive(self) -> list[NodeMember]:
        return sorted((m for m in self.members.values() if m.alive), key=lambda m: m.name)

    def coordinates(self) -> dict[str, Coordinate]:
        return {
            m.name: m.coordinate
            for m in self.members.values()
            if m.alive and m.coordinate is not None
        }

    async def start(self) -> None:
        await self.resync()
        self._tasks = [
            asyncio.create_task(self._stream_loop(), name="serf-members"),
            asyncio.create_task(self._resync_loop(), name="serf-resync"),
        ]

    async def stop(self) -> None:
        for task in [*self._tasks, *self._callbacks]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._callbacks, return_exceptions=True)
        self._tasks = []

    def _warn(self, node: str, tag: str) -> None:
        if (node, tag) not in self._warned:
            self._warned.add((node, tag))
            log.warning("serf.bad_tag", extra={"member": node, "tag": tag})

    def _put(self, member: Member) -> NodeMember:
        known = self.members.get(member.name)
        view = member_from_serf(member, self._warn)
        if known is not None and known.coordinate is not None:
            view = replace(view, coordinate=known.coordinate)
        self.members[member.name] = view
        return view

    async def resync(self) -> None:
        members = await self.serf.members()
        seen = {m.name for m in members}
        for member in members:
            self._put(member)
        for name in list(self.members):
            if name not in seen:
                del self.members[name]
        await self.refresh_coordinates()
        self.synced_at = time.monotonic()

    async def refresh_coordinates(self) -> None:
        for member in list(self.members.values()):
            if not member.alive:
                continue
            raw = await self.serf.get_coordinate(member.name)
            if raw is None:
                continue
            try:
                coordinate = Coordinate.from_rpc(raw)
            except CoordinateError:
                self._warn(member.name, "coordinate")
                continue
            current = self.members.get(member.name)
            if current is not None:
                self.members[member.name] = replace(current, coordinate=coordinate)

    def apply(self, event: Event) -> None:
        """Apply one `member-*` event to the view."""
        for member in event.members:
            if event.event == "member-reap":
                self.members.pop(member.name, None)
                continue
            previous = self.members.get(member.name)
            view = self._put(member)
            log.info(
                "serf.member",
                extra={"event": event.event, "member": member.name, "status": member.status},
            )
            if (
                event.event == "member-failed"
                and self.on_failed is not None
                and (previous is None or previous.status != "failed")
                and view.status == "failed"
            ):
                task = asyncio.create_task(self.on_failed(member.name))
                self._callbacks.add(task)
                task.add_done_callback(self._callbacks.discard)

    async def _stream_loop(self) -> None:
        while True:
            try:
                async with self.serf.stream(MEMBER_EVENTS) as events:
                    async for event in events:
                        self.apply(event)
            except (SerfError, OSError) as error:
                log.warning("serf.stream_lost", extra={"error": str(error)})
            await asyncio.sleep(1.0)

    async def _resync_loop(self) -> None:
        next_resync = time.monotonic() + self.resync_s
        while True:
            await asyncio.sleep(self.coordinates_s)
            with contextlib.suppress(SerfError, OSError):
                if time.monotonic() >= next_resync:
                    next_resync = time.monotonic() + self.resync_s
                    await self.resync()
                else:
                    await self.refresh_coordinates()


class LoadPublisher:
    """Publishes this node's load in its `load` tag, at most once per `period_s`, and only
    when it changed (every tag change is gossiped to the whole cluster)."""

    def __init__(
        self, serf: SerfClient, measure: Callable[[], Load], period_s: float = 10.0
    ) -> None:
        self.serf = serf
        self.measure = measure
        self.period_s = period_s
        self.published: Load | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="serf-load")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def publish(self) -> None:
        load = self.measure()
        if load != self.published:
            await self.serf.tags(set={"load": load.tag()})
            self.published = load

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(SerfError, OSError):
                await self.publish()
            await asyncio.sleep(self.period_s)


def node_tags(
    region: str,
    http: str,
    media: list[str],
    version: str,
    load: Load | None = None,
    metrics: str = "",
) -> Mapping[str, str]:
    """The tags a node's agent starts with (`metrics`: its own /metrics listener, if any)."""
    tags = {"region": region, "http": http, "version": version, "load": (load or Load()).tag()}
    if media:
        tags["media"] = ",".join(media)
    if metrics:
        tags["metrics"] = metrics
    return tags

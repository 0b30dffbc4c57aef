"""The node's place in the Serf mesh: its agent, its membership view, its load tag, and the
reaping of nodes Serf declares failed.

Modes (`[serf] mode`): "own" starts `serf agent` as a child (config from `serf.json` plus
this node's settings; gossip encryption required), "attach" uses an operator's agent at
`rpc_addr` with `rpc_auth`, "off" runs without a mesh. When a member fails, every node
hears it; the one that gets the reap lock ends the dead node's sessions at once (instead of
waiting for its Redis record to expire) and drops its registry record.

With the mesh on, the node also runs the relay manager (`node.relay.manager`): media between nodes
for rooms that span them, signalled over the same agent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from urllib.parse import urlsplit

from redis.exceptions import RedisError

from mesh.agent import SerfAgent, SerfAgentConfig
from mesh.membership import Load, LoadPublisher, MembershipView, NodeMember, node_tags
from mesh.serf import SerfClient, SerfError
from mesh.vivaldi import Coordinate, CoordinateError, estimate_rtt
from node.config import Settings
from node.relay.manager import RelayManager
from node.runtime.live import Live
from node.state import keys
from node.state.lock import LockError, LockUnavailable

log = logging.getLogger(__name__)


def node_version() -> str:
    try:
        return version("sfumesh")
    except PackageNotFoundError:
        return "0"


class CpuMeter:
    """This process's CPU use (percent of one core) since the previous reading."""

    def __init__(self) -> None:
        self._last = (time.monotonic(), self._cpu())

    @staticmethod
    def _cpu() -> float:
        times = os.times()
        return times.user + times.system

    def percent(self) -> float:
        now, cpu = time.monotonic(), self._cpu()
        then, before = self._last
        self._last = (now, cpu)
        return 100.0 * (cpu - before) / (now - then) if now > then else 0.0


class Cluster:
    def __init__(self, settings: Settings, live: Live) -> None:
        self.settings = settings
        self.live = live
        self.serf_settings = settings.serf
        self.agent: SerfAgent | None = None
        self.client: SerfClient | None = None
        self.view: MembershipView | None = None
        self.load: LoadPublisher | None = None
        self.relay: RelayManager | None = None
        self._cpu = CpuMeter()
        self._join_task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.serf_settings.mode != "off"

    def ready(self) -> str:
        """ "ok", or why the mesh is not usable now."""
        if not self.enabled:
            return "ok"
        if self.agent is not None and not self.agent.ready:
            return "serf agent not running" + (" (gave up)" if self.agent.gave_up else "")
        if self.client is None or not self.client.connected:
            return "serf RPC not connected"
        return "ok"

    def tags(self) -> dict[str, str]:
        """The tags this node gossips: region, public URL, media addresses, version, load."""
        settings = self.settings
        media = settings.media.announced_addresses or settings.media.host_addresses
        return dict(
            node_tags(
                settings.region,
                settings.base_url,
                media,
                node_version(),
                metrics=metrics_address(settings.metrics.listen, settings.base_url),
            )
        )

    def agent_config(self) -> SerfAgentConfig:
        serf = self.serf_settings
        settings = self.settings
        snapshot = serf.snapshot_path or str(
            settings.data_dir / "serf" / f"{settings.node_name}.snapshot"
        )
        return SerfAgentConfig(
            node_name=settings.node_name,
            bind=serf.bind,
            advertise=serf.advertise,
            rpc_addr=serf.rpc_addr,
            rpc_auth=serf.rpc_auth,
            encrypt_key=serf.encrypt_key,
            require_encryption=True,
            tags=self.tags(),
            snapshot_path=Path(snapshot),
            retry_join=list(serf.join) or None,
        )

    async def start(self) -> None:
        serf = self.serf_settings
        if serf.mode == "off":
            return
        self.settings.check_mesh()
        if serf.mode == "own":
            self.agent = SerfAgent(self.agent_config(), self.settings.data_dir / "serf")
            await self.agent.start()
            self.client = self.agent.client()
        else:
            self.client = SerfClient(serf.rpc_addr, serf.rpc_auth.get_secret_value())
        await self.client.connect()
        if serf.mode == "attach":
            await self.client.tags(set=self.tags())
        if serf.join:
            self._join_task = asyncio.create_task(self._join(list(serf.join)), name="serf-join")
        self.view = MembershipView(
            self.client, on_failed=self.node_failed, resync_s=serf.resync_period_s
        )
        await self.view.start()
        self.load = LoadPublisher(self.client, self.measure_load, serf.load_tag_period_s)
        self.load.start()
        live = self.live
        self.relay = RelayManager(
            self.settings.node_name,
            self.settings.relay,
            self.client,
            live.redis,
            live.media,
            live.sessions,
            alive=self.is_alive,
            estimate_rtt_s=self.estimate_rtt_s,
        )
        live.media.on_tracks_changed = self.relay.changed
        live.on_room_changed = self.relay.changed
        await self.relay.start()
        log.info("serf.started", extra={"mode": serf.mode, "members": len(self.view.members)})

    async def _join(self, addresses: list[str]) -> None:
        """Join the given agents, retrying with backoff until one answers: nodes of a new
        cluster start side by side, and the first may not be listening yet."""
        delay = 0.5
        while self.client is not None:
            try:
                joined = await self.client.join(addresses, replay=False)
                if joined:
                    log.info("serf.joined", extra={"joined": joined})
                    return
            except (SerfError, OSError) as error:
                log.info("serf.join_retry", extra={"error": str(error), "in_s": delay})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    def measure_load(self) -> Load:
        return Load(len(self.live.hub.connections), self._cpu.percent())

    def coordinates(self) -> dict[str, Coordinate]:
        """Alive members' Vivaldi coordinates ({} without the mesh)."""
        return self.view.coordinates() if self.view is not None else {}

    def members(self) -> list[NodeMember]:
        return list(self.view.members.values()) if self.view is not None else []

    def is_alive(self, name: str) -> bool:
        """Whether Serf sees `name` alive now."""
        member = self.view.members.get(name) if self.view is not None else None
        return member is not None and member.alive

    def estimate_rtt_s(self, name: str) -> float | None:
        """The Vivaldi estimate of the RTT from this node to `name` (seconds)."""
        coordinates = self.coordinates()
        mine, theirs = coordinates.get(self.settings.node_name), coordinates.get(name)
        if mine is None or theirs is None:
            return None
        try:
            return estimate_rtt(mine, theirs)
        except CoordinateError:
            return None

    async def node_failed(self, name: str) -> None:
        """Serf declared `name` failed: reap its sessions now (one node does it)."""
        if name == self.settings.node_name:
            return
        if self.relay is not None:
            await self.relay.peer_gone(name)
        live = self.live
        try:
            async with live.lock.hold(keys.node_reap_lock(name), keys.node_reap_fence(name)):
                removed = await live.registry.remove(name)
                ended = await live.sessions.reap_node(name)
        except LockUnavailable:
            return  # another node is reaping it
        except (RedisError, OSError, LockError) as error:
            log.warning("node.reap_failed", extra={"dead_node": name, "error": str(error)})
            return
        if removed or ended:
            log.info("node.reaped", extra={"dead_node": name, "sessions": ended, "via": "serf"})

    async def stop(self, leave: bool = True) -> None:
        """Stop; our own agent leaves the cluster gracefully first (an operator's stays)."""
        if self._join_task is not None:
            self._join_task.cancel()
        if self.relay is not None:
            await self.relay.stop()
            self.live.media.on_tracks_changed = None
            self.live.on_room_changed = None
        if self.load is not None:
            await self.load.stop()
        if self.view is not None:
            await self.view.stop()
        if self.client is not None:
            await self.client.close()
        if self.agent is not None:
            await self.agent.stop(leave=leave)


def metrics_address(listen: str, base_url: str) -> str:
    """Where a scraper finds this node's own /metrics listener ("" = on the public URL): its
    `metrics.listen`, with an unspecified host (0.0.0.0, ::) replaced by the public URL's."""
    if not listen:
        return ""
    host, _, port = listen.rpartition(":")
    if host.strip("[]") in ("0.0.0.0", "::", ""):  # noqa: S104 (read, not bound)
        host = urlsplit(base_url).hostname or "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
    return f"{host}:{port}"

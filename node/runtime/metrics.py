"""Prometheus metrics of one node (E1), each app with its own registry.

Labels are bounded: HTTP routes are the rule templates (`/api/rooms/<slug>`), never the
paths themselves, so a crawler cannot grow the series without end. Media metrics (bitrate,
packets, loss, jitter, RTT, summed per direction and kind, or per track with session ids
when `metrics.per_session` is on; node totals) come from `node.media.stats`, read from live
media state at scrape time; relay figures (per peer node) come from `node.relay.manager`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from node.media.stats import MediaCollector
from node.relay.manager import RelayCollector
from node.runtime.gc_pauses import GcCollector, gc_pauses

if TYPE_CHECKING:
    from node.media.session import MediaHub
    from node.relay.manager import RelayManager

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class NodeMetrics:
    def __init__(self, node: str, region: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        Gauge("sfumesh_node_info", "This node", ["node", "region"], registry=self.registry).labels(
            node, region
        ).set(1)
        self.http_requests = Counter(
            "sfumesh_http_requests",
            "HTTP requests answered",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_seconds = Histogram(
            "sfumesh_http_request_seconds",
            "Time to answer an HTTP request",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.ws_frames = Counter(
            "sfumesh_ws_frames",
            "WebSocket frames received, by message type (invalid frames as 'invalid')",
            ["type"],
            registry=self.registry,
        )
        self.ws_errors = Counter(
            "sfumesh_ws_errors",
            "WebSocket error replies, by code",
            ["code"],
            registry=self.registry,
        )
        self.sessions_ended = Counter(
            "sfumesh_sessions_ended",
            "WebSocket sessions that ended here, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.chat_messages = Counter(
            "sfumesh_chat_messages", "Chat messages accepted", registry=self.registry
        )
        self.registry.register(GcCollector(gc_pauses()))
        #: awaited before each render: figures read from Redis or the store (a collector
        #: cannot await); each keeps its own pace, so a scrape flood costs no more reads
        self.refreshers: list[Callable[[], Awaitable[None]]] = []

    async def refresh(self) -> None:
        for refresher in self.refreshers:
            await refresher()

    def watch(
        self,
        connections: Callable[[], int],
        rooms: Callable[[], int],
        redis_ok: Callable[[], bool],
    ) -> None:
        """Gauges read from live state when scraped."""
        Gauge(
            "sfumesh_ws_connections", "Open WebSocket connections", registry=self.registry
        ).set_function(lambda: float(connections()))
        Gauge(
            "sfumesh_rooms_local", "Rooms with a session on this node", registry=self.registry
        ).set_function(lambda: float(rooms()))
        Gauge(
            "sfumesh_redis_ok", "1 when this node is registered in Redis", registry=self.registry
        ).set_function(lambda: float(redis_ok()))

    def watch_media(self, hub: MediaHub, per_session: bool = False) -> None:
        """Media metrics (summed, or per track with `per_session`) and node-wide ones, read
        from `hub` when scraped."""
        self.registry.register(MediaCollector(hub, per_session))

    def watch_relays(self, manager: RelayManager) -> None:
        """The relays' figures and counters (node.relay.manager), read when scraped."""
        self.registry.register(RelayCollector(manager))

    def render(self) -> bytes:
        return generate_latest(self.registry)

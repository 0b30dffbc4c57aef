"""The relay manager: media between nodes for rooms that span them (N5, N6, N7).

One `RelayManager` per node. It works out what this node must send (`mesh.span.plan` over the
rooms with a local published track, from the rooms' memberships in Redis): one copy of each
local track to every other node of the room with at least one subscriber. Tracks travel over
one `node.relay.link.RelayLink` per node pair, shared by all rooms and both directions.

Signalling (`mesh.relay_signal`) goes over Serf queries addressed to the peer node, each
message under 1 KB; the query's response is the reply.

* **Trust.** Serf does not say who sent a query, and anyone with the gossip key or RPC access
  to any agent can send one. Every message is sealed with the cluster's relay key
  (`relay.key`: an HMAC bound to the recipient, with the time it was sealed). A request is
  refused, unanswered and changing nothing, unless its seal is good and within
  `relay.signal_window_s`, its request id was not accepted before (`_admit`), and its sender
  is a member Serf sees alive. Each attempt of a request is a new request (a fresh id, time
  and MAC); the receiver answers repeats from the link id and sequence numbers. Seen ids are
  kept in Redis (`SET NX` with a TTL of twice the window) rather than in memory: they
  outlive a restart of the node, whose previous run's messages are still within the window,
  and the one atomic write needs no pruning. A relayed track is taken only when its session
  is the peer's (the session's `node` in Redis): a node relays media of its own
  participants, never of another node's.

* **Open.** The node that first has something to send offers (a new link id and request
  id); the peer answers with its own description. An attempt that gets no reply within
  `relay.attempt_timeout_s`, plus twice the peer's estimated RTT (`attempt_timeout`), is
  sent again (same link, a fresh request id: see Trust); a
  receiver that already answered that link answers again with the same answer (duplicates
  change nothing).
* **Glare.** Both nodes offering at once: the offer of the node whose name sorts first wins.
  The other node drops its own offer and answers; the winner refuses the loser's offer with
  "glare". An offer that names the link it replaces (`k`), or comes from a restarted peer
  (a new boot id), always replaces the old link.
* **Tracks.** Added and removed as demand changes, as numbered `tracks` deltas (split to stay
  under the bound), one in flight per link; the receiver applies them in order and ignores
  repeats. Packets are forwarded raw (`Published.on_rtp` on both sides, nothing decoded); a
  relayed track becomes a `Published` on the receiving node, fanned out to its local
  subscribers like a local one, and their keyframe requests travel back as PLI over the link.
* **Simulcast layers.** Each layer of a simulcast track is a stream of its own on the link
  ("<track id>~L", its own SSRC in the description's `t`: its own sequence numbers, RTP
  history and keyframe requests, as the publisher's encodings have; the link needs nothing
  new and no renegotiation). The receiving node makes one layered `Published` of them and
  reports its subscribers' tiles (`needs`, one value per distinct tile); the sending node
  sends the layers those tiles select (`MediaHub.relay_wants`) and pauses the others (their
  packets stop; one wanted again resumes from a keyframe asked of the publisher). The
  receiving node's subscribers each choose among the layers carried, as for a local
  simulcast publisher.
* **Close.** A link with no track either way lingers `relay.linger_s`, then closes (and tells
  the peer). ICE or DTLS failure, the peer's `close`, or Serf declaring the peer failed ends
  the link at once: its relayed tracks end at the local subscribers; if demand remains, a
  fresh link is offered (after a short backoff). Nothing is persisted: a restarted node
  starts with no relays and a new boot id.

Each node writes its relays' figures to Redis (`sfumesh:relays:<node>`, short TTL) for
`sfumesh cluster relays`; /metrics has the same figures (`RelayCollector`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.asyncio import Redis
from redis.exceptions import RedisError

from mesh import relay_signal as signal
from mesh.relay_description import TrackInfo, is_controlling, parse_description
from mesh.relay_signal import Message, Unauthentic
from mesh.serf import EventStream, SerfClient, SerfError
from mesh.span import RoomView, TrackRef, node_pair, plan
from node.config import ConfigError, RelaySettings
from node.media.adapter import SenderTap
from node.media.forward import Forwarder
from node.media.session import (
    LAYER_SELECT_S,
    MediaHub,
    Published,
    RelayedOwner,
    relay_need,
)
from node.relay.link import CODECS, RelayLink, RemoteTrack
from node.state import keys
from node.state.sessions import SessionStore, read_session
from node.tasks import TaskSet

log = logging.getLogger(__name__)


def attempt_timeout(configured_s: float, rtt_s: float | None) -> float:
    """How long one signalling attempt waits for its reply: `relay.attempt_timeout_s` plus
    twice the peer's estimated RTT (Serf's coordinates; nothing when unknown). A reply
    needs the query's gossip out and the answer back, and a late reply is lost with the
    closed query: between nodes 300 ms apart the signalling took 0.82 s of a 1 s attempt
    in the WAN lab, so a little more delay or load would have doubled every relay's setup."""
    if rtt_s is None or not math.isfinite(rtt_s) or rtt_s < 0:
        return configured_s
    return configured_s + 2.0 * rtt_s


#: payload type per codec on relay links (any fixed choice works: both ends read it from `t`)
PAYLOAD_TYPES: Final = {"VP8": 96, "H264": 102, "opus": 111, "PCMU": 0, "PCMA": 8, "G722": 9}
#: how long a pointer message (the "redis" carrier) lives
POINTER_TTL_MS: Final = 30_000
#: waiting before offering again to a peer after a failed attempt (doubles, up to the max)
RETRY_BACKOFF_S: Final = 0.5
RETRY_BACKOFF_MAX_S: Final = 8.0
STOP_WAIT_S: Final = 5.0
#: the longest first retransmission time of a link's setup (OpenSSL's own DTLS timer)
SETUP_RTO_MAX_S: Final = 1.0
#: distinct tile needs reported per relayed track (more tiles than layers change nothing)
MAX_NEEDS: Final = 4


def _unbound(packet: Any) -> None:
    """The handler of a received relay track no longer published here: packets dropped."""


def _unbind(published: Published) -> Published:
    """`published` (a relayed track being removed) no longer gets its link's packets."""
    for tap in published.taps:
        tap.handler = _unbound
    return published


def relay_track_id(published: Published) -> str:
    """The mesh-wide id of a track on a relay: "<publisher session id>:<mid>"."""
    return f"{published.owner.session_id}:{published.mid}"


#: a simulcast track's layer L travels on the link as its own stream "<track id>~L"
LAYER_MARK: Final = "~"


def link_streams(track_id: str, published: Published) -> list[tuple[str, int | None]]:
    """The link streams a track takes: itself, or one per layer of a simulcast track
    (each its own SSRC in the description's `t`, so each has its own sequence numbers,
    RTP history for NACKs and keyframe requests, as the publisher's encodings have)."""
    if not published.simulcast:
        return [(track_id, None)]
    return [(f"{track_id}{LAYER_MARK}{layer}", layer) for layer in range(len(published.rids))]


def split_stream(stream_id: str) -> tuple[str, int | None]:
    """(track id, layer) of a link stream's id ("<track id>~L"; layer None: the whole track)."""
    base, mark, layer = stream_id.rpartition(LAYER_MARK)
    if mark and layer.isdigit() and len(layer) <= 2 and ":" in base:
        return base, int(layer)
    return stream_id, None


def codec_name(mime_type: str) -> str | None:
    """The relay description's codec name for a MIME type, or None if it cannot be relayed."""
    wanted = mime_type.lower()
    return next((name for name, c in CODECS.items() if c.mime_type.lower() == wanted), None)


@dataclass(eq=False)
class Outgoing:
    """A local track (or one layer of a simulcast track) this node sends to the peer."""

    published: Published
    tap: SenderTap
    forwarder: Forwarder[SenderTap] | None = None
    attach: asyncio.Task[None] | None = None
    #: the track's id (`relay_track_id`), and the layer this stream carries (None: all)
    track_id: str = ""
    layer: int | None = None


@dataclass(eq=False)
class Relay:
    """This node's end of the link to one peer node."""

    peer: str
    link_id: str
    link: RelayLink
    offered_by_me: bool
    state: str = "opening"  # opening (offering or answering) | up | closed
    peer_boot: str = ""
    up: asyncio.Event = field(default_factory=asyncio.Event)
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    answer: Message | None = None
    sends: dict[str, Outgoing] = field(default_factory=dict)
    #: ids of `sends` the peer has been told about (in the offer/answer or a delta)
    announced: set[str] = field(default_factory=set)
    #: the peer's tracks, by id, and the local sources made from them
    remote: dict[str, TrackInfo] = field(default_factory=dict)
    received: dict[str, Published] = field(default_factory=dict)
    in_seq: int = 0
    out_seq: int = 0
    updating: asyncio.Lock = field(default_factory=asyncio.Lock)
    receiving: asyncio.Lock = field(default_factory=asyncio.Lock)
    idle_since: float | None = None
    opened_at: float = field(default_factory=time.monotonic)
    up_at: float | None = None
    signalling_bytes: int = 0
    messages: int = 0
    #: the sends the plan wants next, not yet applied (`_apply_later`), and the task at it
    wanted: dict[str, Published] | None = None
    applying: asyncio.Task[None] | None = None
    #: what this node last told the peer its subscribers need of the tracks it receives
    #: (`needs`), and the task telling it
    needs_told: dict[str, tuple[int, ...]] = field(default_factory=dict)
    needs_task: asyncio.Task[None] | None = None


@dataclass
class RelayTotals:
    """Counters since start, ended relays included."""

    opened: int = 0
    failed: int = 0
    closed: int = 0
    messages_sent: int = 0
    message_bytes_max: int = 0
    attempts_retried: int = 0
    glare_refused: int = 0
    packets_out: int = 0
    packets_in: int = 0
    #: requests refused before they reached the protocol, by reason ("unsealed", "bad-mac",
    #: "stale", "replay", "not-member", "bad"), and relayed tracks of another node's session
    refused: dict[str, int] = field(default_factory=dict)


Spawn = Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]]


class RelayManager:
    def __init__(
        self,
        name: str,
        settings: RelaySettings,
        serf: SerfClient,
        redis: Redis,
        media: MediaHub,
        sessions: SessionStore,
        *,
        alive: Callable[[str], bool] | None = None,
        estimate_rtt_s: Callable[[str], float | None] = lambda node: None,
    ) -> None:
        """`alive`: whether Serf sees a node alive now (the node's membership view); without
        it, the agent is asked (`serf.members`) when a request comes in."""
        key = settings.key.get_secret_value().encode()
        try:
            self._key = signal.check_key(key)
        except ValueError as error:
            raise ConfigError(f"relay.key (SFUMESH_RELAY_KEY): {error}") from None
        self.name = name
        self.settings = settings
        self.serf = serf
        self.redis = redis
        self.media = media
        self.sessions = sessions
        self.alive = alive
        self.estimate_rtt_s = estimate_rtt_s
        self.boot = signal.new_id()
        self.relays: dict[str, Relay] = {}
        self.totals = RelayTotals()
        #: the last link id used with each peer (an offer names the link it replaces)
        self._last_link: dict[str, str] = {}
        self._retry_at: dict[str, float] = {}
        self._backoff: dict[str, float] = {}
        self._opening: set[str] = set()
        #: what the last plan wanted sent to each peer (an answer carries it at once)
        self._wanted: dict[str, dict[str, Published]] = {}
        self._dirty = asyncio.Event()
        self._tasks = TaskSet("relay.task_failed")
        self._loops: list[asyncio.Task[None]] = []
        #: the latest figures per peer (what `report` wrote), for /metrics
        self.report: list[dict[str, Any]] = []
        self._marks: dict[tuple[str, str], tuple[float, int, int]] = {}
        self._layer_marks: dict[tuple[str, str], tuple[dict[int, int], float]] = {}

    # ----------------------------------------------------------------- life

    async def start(self) -> None:
        self._loops = [
            asyncio.create_task(self._serve(), name="relay-serve"),
            asyncio.create_task(self._run(), name="relay-plan"),
            asyncio.create_task(self._report_loop(), name="relay-report"),
            asyncio.create_task(self._needs_loop(), name="relay-needs"),
        ]
        self.changed()

    async def stop(self) -> None:
        for task in self._loops:
            task.cancel()
        if self._loops:
            # the query stream's unsubscribe waits on the agent: never let it hold a shutdown
            await asyncio.wait(self._loops, timeout=STOP_WAIT_S)
        relays = list(self.relays.values())
        await asyncio.gather(
            *(self._tell_closed(relay) for relay in relays if relay.state == "up"),
            return_exceptions=True,
        )
        await asyncio.gather(*(self._end(r, "node-stopping") for r in relays))
        await self._tasks.cancel_all()
        with contextlib.suppress(RedisError, OSError):
            await self.redis.delete(keys.node_relays(self.name))

    def spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        return self._tasks.spawn(work)

    def changed(self, slug: str | None = None) -> None:
        """Something that may change the plan happened (membership, tracks, nodes)."""
        self._dirty.set()

    async def open(self, peer: str) -> None:
        """Offer a relay to `peer` now, with no track yet (the planner opens relays when
        demand appears; benches and tests open them directly). Returns once it is up or
        failed; `relays[peer].state` says which."""
        if peer in self.relays or peer in self._opening:
            return
        self._opening.add(peer)
        await self._open(peer, {})

    async def peer_gone(self, peer: str) -> None:
        """Serf says `peer` failed or left: its relay ends now."""
        relay = self.relays.get(peer)
        if relay is not None:
            await self._end(relay, "peer-gone")

    # ----------------------------------------------------------------- planning

    async def _run(self) -> None:
        while True:
            timeout = self._next_wake()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), timeout)
            self._dirty.clear()
            try:
                await self._reconcile()
            except (RedisError, OSError) as error:
                log.warning("relay.plan_failed", extra={"error": str(error)})
                await asyncio.sleep(0.5)
                self._dirty.set()

    def _next_wake(self) -> float:
        now = time.monotonic()
        wake = now + self.settings.report_period_s  # a periodic re-plan catches missed events
        for relay in self.relays.values():
            if relay.idle_since is not None:
                wake = min(wake, relay.idle_since + self.settings.linger_s)
        for at in self._retry_at.values():
            wake = min(wake, at)
        return max(0.01, wake - now)

    async def _desired(self) -> dict[str, dict[str, Published]]:
        """Peer node -> the local tracks it must get (by relay track id)."""
        rooms: list[RoomView] = []
        by_id: dict[str, Published] = {}
        for slug in list(self.media.rooms):
            tracks = [
                p for p in self.media.local_tracks(slug) if codec_name(p.mime_type) is not None
            ]
            if not tracks:
                continue
            members = await self.sessions.members(slug)
            refs = set()
            for published in tracks:
                track_id = relay_track_id(published)
                by_id[track_id] = published
                refs.add(TrackRef(published.owner.session_id, track_id, published.kind, self.name))
            rooms.append(RoomView.from_members(slug, members, refs))
        desired: dict[str, dict[str, Published]] = {}
        for copy in plan(rooms, self.name).sends:
            if self.alive is None or self.alive(copy.target):
                desired.setdefault(copy.target, {})[copy.track.track_id] = by_id[
                    copy.track.track_id
                ]
        return desired

    async def _reconcile(self) -> None:
        desired = await self._desired()
        self._wanted = desired
        now = time.monotonic()
        for peer, tracks in desired.items():
            relay = self.relays.get(peer)
            if relay is None:
                if peer not in self._opening and self._retry_at.get(peer, 0.0) <= now:
                    self._opening.add(peer)
                    self.spawn(self._open(peer, tracks))
            elif relay.state == "up":
                self._apply_later(relay, tracks)
        for peer, relay in list(self.relays.items()):
            if peer not in desired and relay.state == "up" and relay.sends:
                self._apply_later(relay, {})
        for relay in list(self.relays.values()):
            if relay.state != "up":
                continue
            if relay.sends or relay.remote:
                relay.idle_since = None
                continue
            if relay.idle_since is None:
                relay.idle_since = now
            if now - relay.idle_since >= self.settings.linger_s:
                log.info("relay.idle_close", extra={"peer": relay.peer, "link": relay.link_id})
                await self._tell_closed(relay)
                await self._end(relay, "idle")

    # ----------------------------------------------------------------- sending tracks

    async def _add_send(self, relay: Relay, track_id: str, published: Published) -> None:
        name = codec_name(published.mime_type)
        if name is None:
            return
        for stream_id, layer in link_streams(track_id, published):
            if stream_id in relay.sends:
                continue
            tap = await relay.link.add_track(stream_id, published.kind, name, PAYLOAD_TYPES[name])
            out = Outgoing(published, tap, published.forwarder, None, track_id, layer)
            relay.sends[stream_id] = out
            out.attach = self.spawn(self._attach(relay, stream_id, out))

    async def _attach(self, relay: Relay, stream_id: str, out: Outgoing) -> None:
        """Once the link's sender runs, the track's forwarder feeds it (from a keyframe);
        a layer stream starts only if the peer's subscribers select that layer."""
        await out.tap.wait_ready()
        published = out.published
        if relay.sends.get(stream_id) is not out or published.forwarder is not out.forwarder:
            return
        if out.layer is None:
            if published.attach(out.tap):
                published.relays[relay.peer] = out.tap
            return
        if not published.attach(out.tap, out.layer):
            return
        published.relay_layers.setdefault(relay.peer, {})[out.layer] = out.tap
        wanted = self.media.relay_wants(published, relay.peer, time.monotonic())
        rewriter = out.forwarder.layer_rewriter(out.tap) if out.forwarder is not None else None
        if rewriter is not None and out.layer not in wanted:
            rewriter.set_target(None)

    def _detach(self, relay: Relay, out: Outgoing) -> None:
        if out.attach is not None:
            out.attach.cancel()
        if out.forwarder is not None:
            out.forwarder.remove(out.tap)
        published = out.published
        if published.relays.get(relay.peer) is out.tap:
            del published.relays[relay.peer]
        layers = published.relay_layers.get(relay.peer)
        if layers is not None and out.layer is not None and layers.get(out.layer) is out.tap:
            del layers[out.layer]
            if not layers:
                del published.relay_layers[relay.peer]
        if relay.peer not in published.relays and relay.peer not in published.relay_layers:
            published.relay_needs.pop(relay.peer, None)
            published.relay_picks.pop(relay.peer, None)
            published.relay_estimates.pop(relay.peer, None)
        self.totals.packets_out += out.tap.packets_sent

    def _apply_later(self, relay: Relay, wanted: dict[str, Published]) -> None:
        """Bring a relay's sends to `wanted` in a task of its own, the latest plan winning.
        A peer that stopped answering (killed, not yet declared failed by Serf) then holds
        up only its own relay's update (its attempts take seconds), never the plan of the
        others: the relay a failed-over client's new node needs opens meanwhile."""
        relay.wanted = wanted
        if relay.applying is None or relay.applying.done():
            relay.applying = self.spawn(self._apply_wanted(relay))

    async def _apply_wanted(self, relay: Relay) -> None:
        while relay.wanted is not None:
            wanted, relay.wanted = relay.wanted, None
            await self._apply_sends(relay, wanted)

    async def _apply_sends(self, relay: Relay, wanted: dict[str, Published]) -> None:
        async with relay.updating:
            if relay.state != "up":
                return
            streams = {
                stream_id: published
                for track_id, published in wanted.items()
                for stream_id, _ in link_streams(track_id, published)
            }
            removed = [
                stream_id
                for stream_id, out in relay.sends.items()
                if streams.get(stream_id) is not out.published
                or out.forwarder is not out.published.forwarder
            ]
            for track_id in removed:
                out = relay.sends.pop(track_id)
                self._detach(relay, out)
                await relay.link.remove_track(track_id)
            for track_id, published in wanted.items():
                if any(s not in relay.sends for s, _ in link_streams(track_id, published)):
                    await self._add_send(relay, track_id, published)
            tell_removed = [t for t in removed if t in relay.announced]
            tell_added = [
                relay.link.local_tracks[t].info
                for t in relay.sends
                if t not in relay.announced or t in removed
            ]
            if not tell_removed and not tell_added:
                return
            header = Message("tracks", "", self.name, self.boot, relay.link_id)
            updates = signal.track_updates(header, relay.out_seq + 1, tell_added, tell_removed)
            for update in updates:
                reply = await self._ask(relay, update)
                if relay.state != "up":
                    return
                if reply is None or reply.kind != "ok":
                    reason = reply.reason if reply is not None else "no-reply"
                    log.warning(
                        "relay.update_refused", extra={"peer": relay.peer, "reason": reason}
                    )
                    self.spawn(self._end(relay, f"update-{reason}"))
                    return
                relay.out_seq = update.seq
                relay.announced -= set(update.removed)
                relay.announced |= {track.track_id for track in update.added}

    # ----------------------------------------------------------------- opening

    def _new_link(self, peer: str) -> tuple[RelayLink, list[Relay]]:
        holder: list[Relay] = []

        def on_rtp(remote: RemoteTrack, packet: Any) -> None:
            track_id = split_stream(remote.track_id)[0]
            published = holder[0].received.get(track_id) if holder else None
            if published is not None:
                published.on_rtp(packet)

        def on_ended(reason: str) -> None:
            if holder and holder[0].state != "closed":
                self.spawn(self._end(holder[0], reason))

        link = RelayLink(
            is_controlling(self.name, peer), on_rtp, on_ended, setup_rto_s=self._setup_rto(peer)
        )
        return link, holder

    def _setup_rto(self, peer: str) -> float | None:
        """The link's first ICE/DTLS retransmission time: the setting, or 3x the estimated
        RTT of a far peer (capped at OpenSSL's own 1 s); None when the setting is 0."""
        floor = self.settings.setup_rto_s
        if not floor:
            return None
        rtt = self.estimate_rtt_s(peer)
        return min(SETUP_RTO_MAX_S, max(floor, 3 * rtt)) if rtt else floor

    def _relay(self, peer: str, link_id: str, offered_by_me: bool, boot: str = "") -> Relay:
        link, holder = self._new_link(peer)
        relay = Relay(peer, link_id, link, offered_by_me, peer_boot=boot)
        holder.append(relay)
        self.relays[peer] = relay
        self._last_link[peer] = link_id
        return relay

    async def _open(self, peer: str, tracks: dict[str, Published]) -> None:
        try:
            await self._offer(peer, tracks)
        finally:
            self._opening.discard(peer)

    async def _offer(self, peer: str, tracks: dict[str, Published]) -> None:
        known = self._last_link.get(peer, "")
        relay = self._relay(peer, signal.new_id(), True)
        self.totals.opened += 1
        log.info("relay.offering", extra={"peer": peer, "link": relay.link_id})
        for track_id, published in tracks.items():
            await self._add_send(relay, track_id, published)
        description = await relay.link.local_description()
        offer, _left = signal.fit_description(
            Message(
                "offer",
                signal.new_id(),
                self.name,
                self.boot,
                relay.link_id,
                description,
                known_link=known,
            )
        )
        relay.announced = {track[1] for track in (offer.description or {}).get("t", [])}
        reply = await self._ask(relay, offer)
        if reply is not None and reply.kind == "refuse" and reply.reason == "glare":
            # (counted whether the winning offer arrived here before this refusal or after)
            self.totals.glare_refused += 1
        if self.relays.get(peer) is not relay:
            await relay.link.close()  # superseded (glare lost, or the peer's newer offer)
            return
        if reply is None or reply.kind != "answer" or reply.description is None:
            reason = "no-answer" if reply is None else reply.reason or reply.kind
            # glare too waits a little: the winning offer is on its way here
            await self._end(relay, f"offer-{reason}", retry=True)
            return
        relay.peer_boot = reply.boot
        await self._connect(relay, reply.description)

    async def _connect(self, relay: Relay, description: dict[str, Any]) -> None:
        try:
            await relay.link.connect(description)
        except (ConnectionError, ValueError, RuntimeError) as error:
            log.warning("relay.connect_failed", extra={"peer": relay.peer, "error": str(error)})
            await self._end(relay, "connect-failed", retry=True)
            return
        if self.relays.get(relay.peer) is not relay or relay.state == "closed":
            await relay.link.close()
            return
        relay.remote = {track.track_id: track for track in parse_description(description).tracks}
        await self._received_changed(relay)
        relay.state = "up"
        relay.up_at = time.monotonic()
        relay.up.set()
        setup_ms = (relay.up_at - relay.opened_at) * 1000
        self._backoff.pop(relay.peer, None)
        log.info(
            "relay.up",
            extra={
                "peer": relay.peer,
                "link": relay.link_id,
                "setup_ms": round(setup_ms, 1),
                "phases_ms": relay.link.setup_phases_ms(relay.opened_at),
            },
        )
        self.changed()

    # ----------------------------------------------------------------- receiving tracks

    async def _received_changed(self, relay: Relay) -> None:
        """Make local sources for the peer's new tracks; end those it no longer sends. The
        layer streams of a simulcast track ("<track id>~L") make one layered source."""
        current: dict[str, list[tuple[int | None, RemoteTrack]]] = {}
        for remote in relay.link.remote_tracks.values():
            track_id, layer = split_stream(remote.track_id)
            current.setdefault(track_id, []).append((layer, remote))
        for track_id in [t for t in relay.received if t not in current]:
            self.media.remove_relayed(_unbind(relay.received.pop(track_id)))
        for track_id, streams in current.items():
            streams.sort(key=lambda stream: -1 if stream[0] is None else stream[0])
            taps = [remote.tap for _, remote in streams]
            known = relay.received.get(track_id)
            if known is not None and known.taps == taps:
                continue
            if known is not None:  # the same track again, on new senders
                self.media.remove_relayed(_unbind(relay.received.pop(track_id)))
            session_id = track_id.rsplit(":", 1)[0]
            record = await read_session(self.redis, session_id)
            if record is None or not record.room:
                log.info("relay.track_without_room", extra={"track": track_id})
                continue
            if record.node != relay.peer:
                # a node relays its own participants' media: a track claiming a session of
                # another node would let it speak (or be heard) as that participant
                refused = self.totals.refused
                refused["foreign-session"] = refused.get("foreign-session", 0) + 1
                log.warning(
                    "relay.track_refused",
                    extra={"track": track_id, "peer": relay.peer, "session_node": record.node},
                )
                continue
            if relay.state == "closed" or any(
                relay.link.remote_tracks.get(remote.ssrc) is not remote for _, remote in streams
            ):
                return
            first = streams[0][1]
            owner = RelayedOwner(self.media, session_id, record.user_id, record.room, relay.peer)
            published = Published(owner, track_id, first.info.kind, tap=first.tap)
            for layer, remote in streams:
                if layer is not None:
                    published.add_layer_tap(remote.tap, remote.ssrc, layer)
                    remote.tap.share_estimator(first.tap)
            relay.received[track_id] = published
            spec = CODECS[first.info.codec]
            self.media.add_relayed(published, spec.capability())
            # from now on the link's taps hand packets straight to the track, without
            # the per-packet lookup by track id
            for tap in taps:
                tap.handler = published.on_rtp

    # ----------------------------------------------------------------- ending

    async def _end(self, relay: Relay, reason: str, *, retry: bool = False) -> None:
        """End a relay on this side: its sent tracks stop, its received tracks end."""
        if relay.state == "closed":
            return
        was_up = relay.state == "up"
        relay.state = "closed"
        relay.up.set()  # wake waiters; they check the state
        relay.answered.set()
        if self.relays.get(relay.peer) is relay:
            del self.relays[relay.peer]
        if was_up:
            self.totals.closed += 1
        else:
            self.totals.failed += 1
        for out in relay.sends.values():
            self._detach(relay, out)
        relay.sends.clear()
        for published in relay.received.values():
            self.totals.packets_in += published.packets_in
            self.media.remove_relayed(_unbind(published))
        relay.received.clear()
        log.info("relay.ended", extra={"peer": relay.peer, "link": relay.link_id, "reason": reason})
        if retry:
            delay = self._backoff.get(relay.peer, RETRY_BACKOFF_S)
            self._backoff[relay.peer] = min(delay * 2, RETRY_BACKOFF_MAX_S)
            self._retry_at[relay.peer] = time.monotonic() + delay
        else:
            self._retry_at.pop(relay.peer, None)
        try:
            await relay.link.close()
        except Exception:
            log.exception("relay.close_failed")
        self.changed()

    async def _tell_closed(self, relay: Relay) -> None:
        message = Message("close", signal.new_id(), self.name, self.boot, relay.link_id)
        await self._ask(relay, message, attempts=1)

    # ----------------------------------------------------------------- messages out

    async def _carry(self, data: bytes) -> bytes:
        if self.settings.carrier != "redis":
            return data
        key = keys.relay_message(signal.new_id() + signal.new_id())
        await self.redis.set(key, data, px=POINTER_TTL_MS)
        return json.dumps({"ptr": key}, separators=(",", ":")).encode()

    async def _uncarry(self, payload: bytes) -> bytes:
        if not payload.startswith(b'{"ptr":'):
            return payload
        try:
            pointer = json.loads(payload).get("ptr")
        except (ValueError, AttributeError) as exc:
            raise ValueError("relay message: bad pointer") from exc
        if not signal.is_pointer(pointer):
            raise ValueError("relay message: bad pointer")
        data = await self.redis.get(pointer)
        if data is None:
            raise ValueError("relay message: the pointer's key is gone")
        return data.encode() if isinstance(data, str) else bytes(data)

    def _count(self, relay: Relay | None, payload: bytes) -> None:
        self.totals.messages_sent += 1
        self.totals.message_bytes_max = max(self.totals.message_bytes_max, len(payload))
        if relay is not None:
            relay.messages += 1
            relay.signalling_bytes += len(payload)

    def _seal(self, message: Message, to: str) -> bytes:
        return signal.seal(message, self._key, to=to, now=time.time())

    def _unseal(self, data: bytes) -> Message:
        return signal.unseal(
            data, self._key, me=self.name, now=time.time(), window_s=self.settings.signal_window_s
        )

    def _attempt_timeout(self, peer: str) -> float:
        return attempt_timeout(self.settings.attempt_timeout_s, self.estimate_rtt_s(peer))

    async def _ask(self, relay: Relay, message: Message, attempts: int = 0) -> Message | None:
        """Send a request to the relay's peer; its reply, or None after every attempt
        timed out (or the relay was replaced meanwhile). Each attempt is sealed afresh under
        a new request id (a receiver refuses an id it has seen); a reply to any of them
        counts (a repeated offer is answered with the first answer)."""
        sent: set[str] = set()
        for attempt in range(attempts or self.settings.attempts):
            if attempt:
                self.totals.attempts_retried += 1
                log.info(
                    "relay.retry",
                    extra={"peer": relay.peer, "kind": message.kind, "attempt": attempt + 1},
                )
                message = replace(message, request=signal.new_id())
            if self.relays.get(relay.peer) is not relay and message.kind != "close":
                return None
            sent.add(message.request)
            payload = await self._carry(self._seal(message, relay.peer))
            self._count(relay, payload)
            try:
                async with self.serf.query(
                    signal.QUERY_NAME,
                    payload,
                    filter_nodes=[relay.peer],
                    timeout=self._attempt_timeout(relay.peer),
                ) as replies:
                    async for reply in replies:
                        if reply.type != "response" or reply.node != relay.peer:
                            continue
                        try:
                            answer = self._unseal(await self._uncarry(reply.payload))
                        except (ValueError, RedisError) as error:
                            log.warning("relay.bad_reply", extra={"error": str(error)})
                            continue
                        if answer.request in sent and answer.kind not in signal.REQUESTS:
                            return answer
            except (SerfError, OSError) as error:
                log.warning("relay.query_failed", extra={"peer": relay.peer, "error": str(error)})
                await asyncio.sleep(self._attempt_timeout(relay.peer))
        return None

    # ----------------------------------------------------------------- messages in

    async def _serve(self) -> None:
        delay = 0.2
        while True:
            try:
                async with self.serf.stream("query") as events:
                    delay = 0.2
                    async for event in events:
                        if event.name == signal.QUERY_NAME:
                            self.spawn(self._answer_query(events, event.id, event.payload))
            except (SerfError, OSError) as error:
                log.warning("relay.stream_lost", extra={"error": str(error)})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _answer_query(self, events: EventStream, query_id: int, payload: bytes) -> None:
        message = await self._admit(payload)
        if message is None:
            return  # no reply at all: a forger learns nothing, and gets nothing signed
        reply = await self.handle(message)
        if reply is None:
            return
        data = await self._carry(self._seal(reply, message.node))
        relay = self.relays.get(message.node)
        self._count(relay, data)
        try:
            await events.respond(query_id, data)
        except (SerfError, OSError) as error:
            log.warning("relay.respond_failed", extra={"error": str(error)})

    async def _admit(self, payload: bytes) -> Message | None:
        """The request in a query's payload if it may reach the protocol: sealed for this
        node with the relay key, within the window, a request id not seen before, from a
        member Serf sees alive. None (logged and counted) otherwise."""
        reason = ""
        message: Message | None = None
        try:
            message = self._unseal(await self._uncarry(payload))
        except Unauthentic as error:
            reason, detail = error.reason, str(error)
        except (ValueError, RedisError) as error:
            reason, detail = "bad", str(error)
        else:
            detail = ""
            if message.kind not in signal.REQUESTS or message.node == self.name:
                reason = "bad"
            elif not await self._is_member(message.node):
                reason = "not-member"
            elif not await self._first_time(message.request):
                reason = "replay"
        if not reason:
            return message
        self.totals.refused[reason] = self.totals.refused.get(reason, 0) + 1
        log.warning(
            "relay.refused",
            extra={
                "reason": reason,
                "error": detail,
                "claimed_node": message.node if message else "",
                "kind": message.kind if message else "",
            },
        )
        return None

    async def _is_member(self, node: str) -> bool:
        """Whether Serf sees `node` alive: the membership view first, the agent itself when
        the view has not caught up (a node that has just joined)."""
        if self.alive is not None and self.alive(node):
            return True
        try:
            members = await self.serf.members()
        except (SerfError, OSError) as error:
            log.warning("relay.members_failed", extra={"error": str(error)})
            return False
        return any(m.name == node and m.status == "alive" for m in members)

    async def _first_time(self, request_id: str) -> bool:
        """Remember `request_id` (NX, for twice the window: a message sealed at the window's
        far edge is valid that long); False if it was already there, or on no Redis (a
        request that cannot be checked is refused)."""
        ttl_ms = int(self.settings.signal_window_s * 2000)
        try:
            first = await self.redis.set(
                keys.relay_seen(self.name, request_id), "1", nx=True, px=ttl_ms
            )
        except (RedisError, OSError) as error:
            log.warning("relay.seen_failed", extra={"error": str(error)})
            return False
        return bool(first)

    async def handle(self, message: Message) -> Message | None:
        """The reply to one admitted request from another node (None: no reply at all)."""
        if message.node == self.name:
            return Message("refuse", message.request, reason="bad")
        if message.kind == "offer":
            return await self._on_offer(message)
        if message.kind == "tracks":
            return await self._on_tracks(message)
        if message.kind == "needs":
            return self._on_needs(message)
        if message.kind == "close":
            relay = self.relays.get(message.node)
            if relay is not None and relay.link_id == message.link:
                await self._end(relay, "peer-closed")
            return Message("ok", message.request)
        return Message("refuse", message.request, reason="bad")

    async def _on_offer(self, offer: Message) -> Message | None:
        peer = offer.node
        existing = self.relays.get(peer)
        if existing is not None:
            if existing.link_id == offer.link:
                # a repeat (the answer was lost or late): the same answer again
                await existing.answered.wait()
                return existing.answer or Message("refuse", offer.request, reason="busy")
            replaces = (
                (existing.peer_boot and existing.peer_boot != offer.boot)
                or offer.known_link == existing.link_id
                or not existing.offered_by_me
                or self.name > peer
            )
            if not replaces:
                log.info("relay.glare_refused", extra={"peer": peer, "link": offer.link})
                return Message("refuse", offer.request, reason="glare")
            self.spawn(self._end(existing, "replaced"))
        relay = self._relay(peer, offer.link, False, offer.boot)
        self.totals.opened += 1
        # What this node already wants to send there goes in the answer (saves a round trip
        # when both nodes wanted the relay: the glare loser's tracks).
        for track_id, published in self._wanted.get(peer, {}).items():
            if published.forwarder is not None:
                await self._add_send(relay, track_id, published)
        try:
            description = await relay.link.local_description()
        except RuntimeError as error:
            log.error("relay.no_description", extra={"error": str(error)})
            await self._end(relay, "no-description")
            return Message("refuse", offer.request, reason="busy")
        answer, _left = signal.fit_description(
            Message("answer", offer.request, self.name, self.boot, relay.link_id, description)
        )
        relay.answer = answer
        relay.announced = {track[1] for track in (answer.description or {}).get("t", [])}
        relay.answered.set()
        assert offer.description is not None  # decode() guarantees it for offers
        self.spawn(self._connect(relay, offer.description))
        log.info("relay.answering", extra={"peer": peer, "link": relay.link_id})
        return answer

    async def _on_tracks(self, update: Message) -> Message:
        relay = self.relays.get(update.node)
        if relay is None or relay.link_id != update.link:
            return Message("refuse", update.request, reason="unknown-link")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(relay.up.wait(), 15)
        if relay.state != "up":
            return Message("refuse", update.request, reason="unknown-link")
        async with relay.receiving:
            if update.seq <= relay.in_seq:
                return Message("ok", update.request)  # a repeat
            if update.seq != relay.in_seq + 1:
                return Message("refuse", update.request, reason="gap")
            for track_id in update.removed:
                relay.remote.pop(track_id, None)
            for track in update.added:
                relay.remote[track.track_id] = track
            relay.in_seq = update.seq
            await relay.link.set_remote_tracks(relay.remote.values())
            await self._received_changed(relay)
        self.changed()
        return Message("ok", update.request)

    # ----------------------------------------------------------------- layer needs

    def _on_needs(self, message: Message) -> Message:
        """The peer's subscribers' needs of tracks this node sends it (a track's pairs in
        one message are its whole set): the relay's layers follow them at once
        (`MediaHub.select_layers`)."""
        relay = self.relays.get(message.node)
        if relay is None or relay.link_id != message.link:
            return Message("refuse", message.request, reason="unknown-link")
        sets: dict[str, list[int]] = {}
        for track_id, need in message.needs:
            sets.setdefault(track_id, []).append(need)
        sent = {out.track_id: out.published for out in relay.sends.values()}
        changed = False
        for track_id, values in sets.items():
            published = sent.get(track_id)
            needs = tuple(sorted(set(values)))
            if published is not None and published.relay_needs.get(relay.peer) != needs:
                published.relay_needs[relay.peer] = needs
                changed = True
        if changed:
            self.media.select_layers()
        return Message("ok", message.request)

    def needs(self, relay: Relay) -> dict[str, tuple[int, ...]]:
        """What this node's subscribers need of each video track received over `relay`:
        each one's `relay_need` (the height of its visible tile, or of the layer its own
        bandwidth holds it to), distinct, at most `MAX_NEEDS` (the smallest and the largest
        kept); (0,) when nobody shows it."""
        out: dict[str, tuple[int, ...]] = {}
        for track_id, published in relay.received.items():
            if published.kind != "video" or published.forwarder is None:
                continue
            values: set[int] = set()
            heights = published.heights()
            for subscription in list(published.subscriptions.values()):
                mid = subscription.transceiver.mid
                view = subscription.subscriber.views.get(mid) if mid is not None else None
                need = relay_need(view, subscription.choice, heights, signal.NEED_MAX)
                if need is not None:
                    values.add(need)
            ordered = sorted(values)
            if len(ordered) > MAX_NEEDS:
                ordered = [*ordered[: MAX_NEEDS - 1], ordered[-1]]
            out[track_id] = tuple(ordered) or (0,)
        return out

    async def _needs_loop(self) -> None:
        while True:
            await asyncio.sleep(LAYER_SELECT_S)
            for relay in list(self.relays.values()):
                if relay.state != "up" or (relay.needs_task and not relay.needs_task.done()):
                    continue
                needs = self.needs(relay)
                changed = [
                    (t, need)
                    for t, values in needs.items()
                    if relay.needs_told.get(t) != values
                    for need in values
                ]
                for track_id in [t for t in relay.needs_told if t not in needs]:
                    del relay.needs_told[track_id]
                if changed:
                    relay.needs_task = self.spawn(self._tell_needs(relay, changed))

    async def _tell_needs(self, relay: Relay, changed: list[tuple[str, int]]) -> None:
        """Tell the peer what changed (one request in flight per relay, so in order); what
        is not acknowledged is told again next round."""
        header = Message("needs", "", self.name, self.boot, relay.link_id)
        for update in signal.needs_updates(header, changed):
            reply = await self._ask(relay, update)
            if reply is None or reply.kind != "ok" or relay.state != "up":
                return
            told: dict[str, list[int]] = {}
            for track_id, need in update.needs:
                told.setdefault(track_id, []).append(need)
            relay.needs_told.update({t: tuple(values) for t, values in told.items()})

    # ----------------------------------------------------------------- figures

    async def _report_loop(self) -> None:
        period = self.settings.report_period_s
        while True:
            self.report = self.figures()
            try:
                await self.redis.set(
                    keys.node_relays(self.name),
                    json.dumps({"node": self.name, "at": time.time(), "relays": self.report}),
                    px=int(period * 3000),
                )
            except (RedisError, OSError) as error:
                log.warning("relay.report_failed", extra={"error": str(error)})
            await asyncio.sleep(period)

    def figures(self) -> list[dict[str, Any]]:
        """One entry per relay: pair, rooms, tracks, bitrate, RTT, loss, jitter."""
        now = time.monotonic()
        out: list[dict[str, Any]] = []
        for peer, relay in sorted(self.relays.items()):
            sent = sum(o.tap.bytes_sent for o in relay.sends.values())
            got = sum(p.bytes_in for p in relay.received.values())
            at, sent_before, got_before = self._marks.get((peer, relay.link_id), (now, sent, got))
            elapsed = now - at
            self._marks[(peer, relay.link_id)] = (now, sent, got)
            receptions = [r for o in relay.sends.values() if (r := o.tap.reception()) is not None]
            rtts = [r.rtt_s for r in receptions if r.rtt_s is not None]
            incoming = [t.reception() for p in relay.received.values() for t in p.taps]
            estimate = self.estimate_rtt_s(peer)
            rooms = {o.published.owner.slug for o in relay.sends.values()}
            rooms |= {p.owner.slug for p in relay.received.values()}
            out.append(
                {
                    "pair": list(node_pair(self.name, peer)),
                    "node": self.name,
                    "peer": peer,
                    "link": relay.link_id,
                    "state": relay.state,
                    "rooms": sorted(rooms),
                    "tracks_out": len({o.track_id for o in relay.sends.values()}),
                    "layers_out_bps": self._layer_rates(peer, relay, now),
                    "tracks_in": len(relay.received),
                    "bitrate_out_bps": round((sent - sent_before) * 8 / elapsed) if elapsed else 0,
                    "bitrate_in_bps": round((got - got_before) * 8 / elapsed) if elapsed else 0,
                    "rtt_ms": round(sum(rtts) / len(rtts) * 1000, 2) if rtts else None,
                    "rtt_estimated_ms": None if estimate is None else round(estimate * 1000, 2),
                    "packets_lost_in": sum(r.packets_lost for r in incoming),
                    "jitter_in_ms": round(max((r.jitter_s for r in incoming), default=0) * 1000, 2),
                    "setup_ms": None
                    if relay.up_at is None
                    else round((relay.up_at - relay.opened_at) * 1000, 1),
                    "setup_phases_ms": relay.link.setup_phases_ms(relay.opened_at),
                    "signalling_messages": relay.messages,
                    "signalling_bytes": relay.signalling_bytes,
                }
            )
        live = {(peer, relay.link_id) for peer, relay in self.relays.items()}
        for mark in [m for m in self._marks if m not in live]:
            del self._marks[mark]
        for mark in [m for m in self._layer_marks if m not in live]:
            del self._layer_marks[mark]
        return out

    def _layer_rates(self, peer: str, relay: Relay, now: float) -> dict[str, int]:
        """Bit/s sent per simulcast layer index over the link since the last figures (all
        tracks summed): which layers the link carries."""
        sent: dict[int, int] = {}
        for out in relay.sends.values():
            if out.layer is not None:
                sent[out.layer] = sent.get(out.layer, 0) + out.tap.bytes_sent
        before, at = self._layer_marks.get((peer, relay.link_id), ({}, now))
        self._layer_marks[(peer, relay.link_id)] = (sent, now)
        elapsed = now - at
        return {
            str(layer): round((total - before.get(layer, total)) * 8 / elapsed) if elapsed else 0
            for layer, total in sorted(sent.items())
        }

    def packets(self) -> tuple[int, int]:
        """Relayed packets (out, in) since start, ended relays included."""
        out = self.totals.packets_out + sum(
            o.tap.packets_sent for r in self.relays.values() for o in r.sends.values()
        )
        got = self.totals.packets_in + sum(
            p.packets_in for r in self.relays.values() for p in r.received.values()
        )
        return out, got


async def read_relays(redis: Redis, node: str) -> dict[str, dict[str, Any]]:
    """What `node` last reported of its relays (`RelayManager.figures`), by peer node;
    {} when it reports none (or has not for three periods)."""
    raw = await redis.get(keys.node_relays(node))
    return {} if raw is None else {e["peer"]: e for e in json.loads(raw)["relays"]}


class RelayCollector(Collector):
    """/metrics: the relays' latest figures, per peer, and the manager's counters."""

    def __init__(self, manager: RelayManager) -> None:
        self.manager = manager

    def collect(self) -> Iterator[Metric]:
        manager = self.manager
        tracks = GaugeMetricFamily(
            "sfumesh_relay_tracks", "Tracks on a relay", labels=["peer", "direction"]
        )
        bitrate = GaugeMetricFamily(
            "sfumesh_relay_bitrate_bps", "Relay bitrate (bit/s)", labels=["peer", "direction"]
        )
        rtt = GaugeMetricFamily(
            "sfumesh_relay_rtt_seconds",
            "Relay round-trip time: measured (RTCP) or estimated (Vivaldi)",
            labels=["peer", "source"],
        )
        lost = GaugeMetricFamily(
            "sfumesh_relay_packets_lost", "Packets lost on relayed tracks in", labels=["peer"]
        )
        jitter = GaugeMetricFamily(
            "sfumesh_relay_jitter_seconds", "Jitter of relayed tracks in", labels=["peer"]
        )
        layers = GaugeMetricFamily(
            "sfumesh_relay_layer_bitrate_bps",
            "Bit/s a relay sends of each simulcast layer (all tracks)",
            labels=["peer", "layer"],
        )
        for entry in manager.report:
            peer = entry["peer"]
            for layer, bps in entry.get("layers_out_bps", {}).items():
                layers.add_metric([peer, layer], bps)
            tracks.add_metric([peer, "out"], entry["tracks_out"])
            tracks.add_metric([peer, "in"], entry["tracks_in"])
            bitrate.add_metric([peer, "out"], entry["bitrate_out_bps"])
            bitrate.add_metric([peer, "in"], entry["bitrate_in_bps"])
            if entry["rtt_ms"] is not None:
                rtt.add_metric([peer, "measured"], entry["rtt_ms"] / 1000)
            if entry["rtt_estimated_ms"] is not None:
                rtt.add_metric([peer, "estimated"], entry["rtt_estimated_ms"] / 1000)
            lost.add_metric([peer], entry["packets_lost_in"])
            jitter.add_metric([peer], entry["jitter_in_ms"] / 1000)
        yield from (tracks, bitrate, rtt, lost, jitter, layers)
        relays = GaugeMetricFamily("sfumesh_relays", "Relays open now")
        relays.add_metric([], len(manager.relays))
        yield relays
        totals = manager.totals
        events = CounterMetricFamily(
            "sfumesh_relay_events", "Relays opened, failed and closed", labels=["event"]
        )
        for event, value in (
            ("opened", totals.opened),
            ("failed", totals.failed),
            ("closed", totals.closed),
            ("retried", totals.attempts_retried),
            ("glare", totals.glare_refused),
            ("refused", sum(totals.refused.values())),
        ):
            events.add_metric([event], value)
        yield events
        out, got = manager.packets()
        packets = CounterMetricFamily(
            "sfumesh_relay_packets", "Packets relayed", labels=["direction"]
        )
        packets.add_metric(["out"], out)
        packets.add_metric(["in"], got)
        yield packets
        messages = CounterMetricFamily("sfumesh_relay_signalling_messages", "Messages sent")
        messages.add_metric([], totals.messages_sent)
        yield messages
        largest = GaugeMetricFamily(
            "sfumesh_relay_signalling_message_bytes_max", "Largest signalling message sent"
        )
        largest.add_metric([], totals.message_bytes_max)
        yield largest

"""Span detection (N5): what one node must relay, worked out from the rooms it takes part in.

Pure functions, no I/O. The relay manager builds one `RoomView` per live room from the room's
membership in Redis (`sfumesh:{room:<slug>}:members`, session -> node) and the published tracks,
calls `plan(rooms, me)` whenever any of it changes, and makes the relays carry the plan's
`sends` (each node sends only what it publishes: what it receives, its peers decide).

The rules:

* A **copy** is one track sent from the node it is published on to one other node. There is
  one copy of a track per node that has at least one session subscribing to it, however
  many subscribers that node has (the receiving node fans out locally). A node with no
  subscriber of a track gets no copy of it (demand-driven).
* By default every session subscribes to every track of every other session of its room;
  `RoomView.subscriptions` overrides that per session. A session never subscribes to its own
  tracks.
* A track counts only while its publisher is a member of the room; it travels from
  `TrackRef.node`, the node it is published on (the node that receives its media).
* Relays are per **node pair**, not per room: one connection carries every copy between the
  two nodes in either direction, for every room they have in common. A pair is spelled
  with the smaller name first (`node_pair`), so both ends name it alike.
* A pair is *needed* while it carries at least one copy (optionally also while the two nodes
  merely share a room: `prewarm`, which trades an idle connection for a faster first frame).
  A pair no longer needed is *idle*; the relay manager lets it linger `relay.linger_s`
  before it closes (judged from what the link carries both ways, which only the link knows),
  so a brief dip in demand does not cost a new handshake.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Protocol

#: A relay's two nodes, the smaller name first (see `node_pair`).
NodePair = tuple[str, str]
#: A track's identity within its room: (publisher session id, track id).
TrackKey = tuple[str, str]


def node_pair(a: str, b: str) -> NodePair:
    """The canonical name of the relay between nodes `a` and `b` (order-independent)."""
    if a == b:
        raise ValueError(f"a relay joins two different nodes, not {a!r} with itself")
    return (a, b) if a < b else (b, a)


def peer_of(pair: NodePair, me: str) -> str:
    """The other end of `pair`, seen from `me` (which must be one of its ends)."""
    if me == pair[0]:
        return pair[1]
    if me == pair[1]:
        return pair[0]
    raise ValueError(f"{me!r} is not an end of {pair!r}")


@dataclass(frozen=True, order=True)
class TrackRef:
    """One published track and the node it is published on (where its media enters)."""

    publisher_session: str
    track_id: str
    kind: str
    node: str

    @property
    def key(self) -> TrackKey:
        return (self.publisher_session, self.track_id)


@dataclass(frozen=True, order=True)
class Copy:
    """One track sent from `source` (the node it is published on) to `target`."""

    track: TrackRef
    target: str

    @property
    def source(self) -> str:
        return self.track.node

    @property
    def pair(self) -> NodePair:
        return node_pair(self.track.node, self.target)


class MemberLike(Protocol):
    """What `RoomView.from_members` reads of a membership (`node.state.sessions.Membership`)."""

    @property
    def session_id(self) -> str: ...
    @property
    def node(self) -> str: ...
    @property
    def state(self) -> str: ...


@dataclass(frozen=True)
class RoomView:
    """One room as the planner needs it.

    `members`: session id -> the node its WebSocket (and media) is on.
    `tracks`: the tracks published in the room (those of non-members are ignored).
    `subscriptions`: session id -> the keys of the tracks it subscribes to; a session not
    listed subscribes to every track of every other member (the default).
    """

    slug: str
    members: Mapping[str, str]
    tracks: AbstractSet[TrackRef] = frozenset()
    subscriptions: Mapping[str, AbstractSet[TrackKey]] = field(default_factory=dict)

    @classmethod
    def from_members(
        cls,
        slug: str,
        memberships: Iterable[MemberLike],
        tracks: Iterable[TrackRef] = (),
        subscriptions: Mapping[str, AbstractSet[TrackKey]] | None = None,
        *,
        active_only: bool = True,
    ) -> RoomView:
        """A view from the room's Redis memberships; pending ones are left out by default
        (a pending member has no media yet)."""
        members = {
            m.session_id: m.node for m in memberships if not active_only or m.state == "active"
        }
        return cls(slug, members, frozenset(tracks), dict(subscriptions or {}))

    @property
    def nodes(self) -> frozenset[str]:
        return frozenset(self.members.values())

    def live_tracks(self) -> list[TrackRef]:
        """The tracks whose publisher is a member, in a stable order."""
        return sorted(t for t in self.tracks if t.publisher_session in self.members)

    def subscribes(self, session_id: str, track: TrackRef) -> bool:
        """Whether `session_id` (a member) wants `track`."""
        if session_id == track.publisher_session:
            return False
        chosen = self.subscriptions.get(session_id)
        return chosen is None or track.key in chosen

    def demand(self) -> dict[TrackRef, frozenset[str]]:
        """Per live track, the nodes other than its own with at least one subscriber."""
        wanted: dict[TrackRef, frozenset[str]] = {}
        for track in self.live_tracks():
            nodes = frozenset(
                node
                for session, node in self.members.items()
                if node != track.node and self.subscribes(session, track)
            )
            if nodes:
                wanted[track] = nodes
        return wanted


def all_copies(rooms: Iterable[RoomView]) -> frozenset[Copy]:
    """Every copy the whole cluster must make for these rooms (each exactly once)."""
    return frozenset(
        Copy(track, target)
        for room in rooms
        for track, targets in room.demand().items()
        for target in targets
    )


@dataclass(frozen=True)
class RelayPlan:
    """What node `me` must relay.

    `sends`: copies of tracks published on `me` (source `me`), one per (track, target node).
    `receives`: copies coming to `me` (target `me`), one per (track, source node).
    `pairs`: the relays `me` needs (each shared by all rooms and both directions).
    `rooms`: per pair of `me` with a node it shares a room with, those rooms (whether or not
    the pair carries anything yet).
    """

    me: str
    sends: frozenset[Copy] = frozenset()
    receives: frozenset[Copy] = frozenset()
    pairs: frozenset[NodePair] = frozenset()
    rooms: Mapping[NodePair, frozenset[str]] = field(default_factory=dict)

    @property
    def copies(self) -> frozenset[Copy]:
        return self.sends | self.receives

    def copies_on(self, pair: NodePair) -> frozenset[Copy]:
        """The copies `pair` carries, in both directions."""
        return frozenset(c for c in self.copies if c.pair == pair)

    def by_pair(self) -> dict[NodePair, frozenset[Copy]]:
        """The copies grouped by the relay that carries them."""
        return _group(self.copies)


def plan(rooms: Iterable[RoomView], me: str, *, prewarm: bool = False) -> RelayPlan:
    """The relay plan of node `me` for these rooms. Passing every live room is simplest;
    rooms with neither a member on `me` nor a track published on `me` change nothing."""
    views = list(rooms)
    sends: set[Copy] = set()
    receives: set[Copy] = set()
    shared: dict[NodePair, set[str]] = {}
    for room in views:
        nodes = room.nodes
        if me in nodes:
            for other in nodes - {me}:
                shared.setdefault(node_pair(me, other), set()).add(room.slug)
        for track, targets in room.demand().items():
            if track.node == me:
                sends.update(Copy(track, target) for target in targets)
            elif me in targets:
                receives.add(Copy(track, me))
    pairs = {c.pair for c in sends} | {c.pair for c in receives}
    if prewarm:
        pairs |= shared.keys()
    return RelayPlan(
        me=me,
        sends=frozenset(sends),
        receives=frozenset(receives),
        pairs=frozenset(pairs),
        rooms={pair: frozenset(slugs) for pair, slugs in shared.items()},
    )


def _group(copies: Iterable[Copy]) -> dict[NodePair, frozenset[Copy]]:
    grouped: dict[NodePair, set[Copy]] = {}
    for copy in copies:
        grouped.setdefault(copy.pair, set()).add(copy)
    return {pair: frozenset(items) for pair, items in sorted(grouped.items())}

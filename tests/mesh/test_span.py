"""mesh/span.py: which copies of which tracks each node sends and receives, per node pair."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.span import (
    Copy,
    RelayPlan,
    RoomView,
    TrackKey,
    TrackRef,
    all_copies,
    node_pair,
    peer_of,
    plan,
)


def tracks_of(session: str, node: str) -> frozenset[TrackRef]:
    return frozenset(
        {TrackRef(session, "a0", "audio", node), TrackRef(session, "v1", "video", node)}
    )


def room(slug: str, members: dict[str, str], **subscriptions: set[TrackKey]) -> RoomView:
    """A room where every member publishes audio and video on its node."""
    tracks = frozenset(t for s, n in members.items() for t in tracks_of(s, n))
    return RoomView(slug, members, tracks, {k: frozenset(v) for k, v in subscriptions.items()})


def targets(p: RelayPlan) -> set[tuple[str, str, str]]:
    return {(c.track.publisher_session, c.track.track_id, c.target) for c in p.sends}


def sources(p: RelayPlan) -> set[tuple[str, str, str]]:
    return {(c.track.publisher_session, c.track.track_id, c.source) for c in p.receives}


# -- pairs ------------------------------------------------------------------------------


def test_node_pair_is_canonical() -> None:
    assert node_pair("node2", "node1") == node_pair("node1", "node2") == ("node1", "node2")
    assert peer_of(("node1", "node2"), "node1") == "node2"
    assert peer_of(("node1", "node2"), "node2") == "node1"
    with pytest.raises(ValueError):
        node_pair("node1", "node1")
    with pytest.raises(ValueError):
        peer_of(("node1", "node2"), "node3")


# -- scenarios from the issue -----------------------------------------------------------


def test_two_nodes_each_send_their_tracks_once() -> None:
    rooms = [room("r", {"A": "node1", "B": "node2"})]
    one, two = plan(rooms, "node1"), plan(rooms, "node2")
    assert targets(one) == {("A", "a0", "node2"), ("A", "v1", "node2")}
    assert sources(one) == {("B", "a0", "node2"), ("B", "v1", "node2")}
    assert targets(two) == {("B", "a0", "node1"), ("B", "v1", "node1")}
    assert sources(two) == {("A", "a0", "node1"), ("A", "v1", "node1")}
    assert one.pairs == two.pairs == {("node1", "node2")}
    assert one.sends == two.receives and two.sends == one.receives
    assert one.rooms == {("node1", "node2"): {"r"}}


def test_third_node_makes_a_full_mesh_of_copies() -> None:
    rooms = [room("r", {"A": "node1", "B": "node2", "C": "node3"})]
    plans = {n: plan(rooms, n) for n in ("node1", "node2", "node3")}
    for me, p in plans.items():
        others = {"node1", "node2", "node3"} - {me}
        assert {c.target for c in p.sends} == others
        assert len(p.sends) == 2 * 2  # two tracks, one copy to each other node
        assert len(p.receives) == 2 * 2
        assert p.pairs == {node_pair(me, o) for o in others}
    assert all_copies(rooms) == frozenset().union(*(p.sends for p in plans.values()))
    assert len(all_copies(rooms)) == 3 * 2 * 2


def test_two_subscribers_on_one_remote_node_mean_one_copy() -> None:
    rooms = [room("r", {"A": "node1", "B": "node2", "B2": "node2", "B3": "node2"})]
    one = plan(rooms, "node1")
    assert targets(one) == {("A", "a0", "node2"), ("A", "v1", "node2")}
    # node2 has three publishers: node1 receives each of their tracks once.
    assert len(one.receives) == 3 * 2
    two = plan(rooms, "node2")
    assert len([c for c in two.receives if c.track.publisher_session == "A"]) == 2


def test_leaving_stops_copies_and_idles_the_pair() -> None:
    before = [room("r", {"A": "node1", "B": "node2"})]
    after = [room("r", {"A": "node1"})]
    old, new = plan(before, "node1"), plan(after, "node1")
    assert new.sends == new.receives == frozenset() and new.pairs == frozenset()
    assert old.pairs == {("node1", "node2")} and old.copies


def test_a_room_on_one_node_needs_no_relay() -> None:
    rooms = [room("r", {"A": "node1", "B": "node1", "C": "node1"})]
    p = plan(rooms, "node1")
    assert p == RelayPlan("node1")
    assert all_copies(rooms) == frozenset()


def test_two_rooms_share_one_pair() -> None:
    rooms = [
        room("r1", {"A": "node1", "B": "node2"}),
        room("r2", {"C": "node1", "D": "node2", "E": "node3"}),
    ]
    p = plan(rooms, "node1")
    assert p.pairs == {("node1", "node2"), ("node1", "node3")}
    assert p.rooms == {("node1", "node2"): {"r1", "r2"}, ("node1", "node3"): {"r2"}}
    on12 = p.copies_on(("node1", "node2"))
    assert {c.track.publisher_session for c in on12} == {"A", "B", "C", "D"}
    assert p.by_pair() == {pair: p.copies_on(pair) for pair in p.pairs}


def test_no_copy_without_a_remote_subscriber() -> None:
    # A (node1) wants only B's tracks; B (node2) wants A's audio and C's video; C (node3)
    # wants nothing.
    rooms = [
        room(
            "r",
            {"A": "node1", "B": "node2", "C": "node3"},
            A={("B", "a0"), ("B", "v1")},
            B={("A", "a0"), ("C", "v1")},
            C=set(),
        )
    ]
    one = plan(rooms, "node1")
    assert targets(one) == {("A", "a0", "node2")}
    assert sources(one) == {("B", "a0", "node2"), ("B", "v1", "node2")}
    # node1 and node3 share the room but nothing flows between them: no relay.
    assert one.pairs == {("node1", "node2")}
    assert one.rooms.keys() == {("node1", "node2"), ("node1", "node3")}
    three = plan(rooms, "node3")
    assert targets(three) == {("C", "v1", "node2")}
    assert three.receives == frozenset()
    assert three.pairs == {("node2", "node3")}
    # With prewarm, the shared but idle pair node1-node3 is needed too.
    assert plan(rooms, "node1", prewarm=True).pairs == {("node1", "node2"), ("node1", "node3")}


def test_unsubscribing_removes_only_that_copy() -> None:
    members = {"A": "node1", "B": "node2", "B2": "node2"}
    old = plan([room("r", members)], "node1")
    # B2 drops A's video; B still wants it: nothing changes on the relay.
    same = plan([room("r", members, B2={("A", "a0")})], "node1")
    assert same == old
    # Both drop it: that copy goes, the pair stays.
    fewer = plan([room("r", members, B={("A", "a0")}, B2={("A", "a0")})], "node1")
    assert fewer.pairs == old.pairs
    assert old.copies - fewer.copies == {Copy(TrackRef("A", "v1", "video", "node1"), "node2")}
    assert fewer.copies < old.copies


def test_tracks_of_non_members_and_own_tracks_are_ignored() -> None:
    ghost = TrackRef("gone", "v1", "video", "node2")
    view = RoomView(
        "r",
        {"A": "node1", "B": "node2"},
        tracks_of("A", "node1") | {ghost},
        {"A": frozenset({("A", "v1"), ("gone", "v1")})},
    )
    p = plan([view], "node1")
    assert sources(p) == set()  # A asked only for its own track and a non-member's
    assert targets(p) == {("A", "a0", "node2"), ("A", "v1", "node2")}


@dataclass(frozen=True)
class FakeMembership:
    session_id: str
    node: str
    state: str


def test_from_members_skips_pending() -> None:
    members = [
        FakeMembership("A", "node1", "active"),
        FakeMembership("B", "node2", "pending"),
    ]
    view = RoomView.from_members("r", members, tracks_of("A", "node1"))
    assert view.members == {"A": "node1"}
    assert plan([view], "node1").pairs == frozenset()
    everyone = RoomView.from_members("r", members, active_only=False)
    assert everyone.nodes == {"node1", "node2"}


# -- property ---------------------------------------------------------------------------

NODES = ["n1", "n2", "n3", "n4"]


@st.composite
def rooms_strategy(draw: st.DrawFn) -> list[RoomView]:
    views: list[RoomView] = []
    session_ids = iter(range(10_000))
    for r in range(draw(st.integers(0, 4))):
        count = draw(st.integers(0, 6))
        members = {f"s{next(session_ids)}": draw(st.sampled_from(NODES)) for _ in range(count)}
        tracks: set[TrackRef] = set()
        for session, node in members.items():
            kinds = draw(st.lists(st.sampled_from(["audio", "video"]), max_size=3))
            tracks.update(TrackRef(session, f"t{i}", k, node) for i, k in enumerate(kinds))
        subscriptions: dict[str, frozenset[TrackKey]] = {}
        keys = sorted(t.key for t in tracks)
        for session in members:
            chooses: bool = draw(st.booleans())
            if keys and chooses:
                subscriptions[session] = frozenset(draw(st.lists(st.sampled_from(keys))))
        views.append(RoomView(f"r{r}", members, frozenset(tracks), subscriptions))
    return views


@settings(max_examples=300, deadline=None)
@given(rooms_strategy())
def test_every_remote_subscriber_gets_each_track_exactly_once(rooms: list[RoomView]) -> None:
    plans = {n: plan(rooms, n) for n in NODES}
    sent = [c for p in plans.values() for c in p.sends]
    received = [c for p in plans.values() for c in p.receives]
    assert len(sent) == len(set(sent))
    assert sorted(sent) == sorted(received)  # what one node sends, its peer expects
    assert set(sent) == all_copies(rooms)

    # Demand, worked out the slow way: (track, node) for every subscriber on another node.
    wanted: set[tuple[TrackRef, str]] = set()
    for view in rooms:
        for track in view.tracks:
            for session, node in view.members.items():
                if session == track.publisher_session or node == track.node:
                    continue
                chosen = view.subscriptions.get(session)
                if chosen is None or track.key in chosen:
                    wanted.add((track, node))
    counts: dict[tuple[TrackRef, str], int] = {}
    for copy in sent:
        key = (copy.track, copy.target)
        counts[key] = counts.get(key, 0) + 1
    # Every remote subscriber's track arrives exactly once at its node...
    assert all(counts.get(w) == 1 for w in wanted)
    # ...and no copy goes to a node without a subscriber of it.
    assert set(counts) == wanted

    for me, p in plans.items():
        assert all(c.source == me for c in p.sends)
        assert all(c.target == me for c in p.receives)
        assert p.pairs == {c.pair for c in p.copies}
        for pair in p.pairs:
            assert me in pair and pair in p.rooms
        # Relays are symmetric: both ends agree on what each pair carries.
        for pair, copies in p.by_pair().items():
            assert plans[peer_of(pair, me)].copies_on(pair) == copies

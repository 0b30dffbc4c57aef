"""A Redis primary that dies mid-call (Sentinel promotes a replica): two node processes on a
Sentinel-managed Redis keep their people in the room, chat goes on with every message
delivered and stored exactly once, and page refreshes racing the failover end right."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import httpx
import pytest
import websockets

from node.local.launch import LocalNode
from node.runtime.services import BackingServices
from node.state import keys
from node.state.connect import open_redis_with
from node.state.sessions import Membership
from tests.conftest import sentinel_settings
from tests.node.live_client import Socket, User, create_room, sign_up
from tests.node.runtime.test_live_mesh import PresenceModel
from tests.redis_topologies import SentinelGroup, cli

pytestmark = pytest.mark.slow

ROOM = "ha"
FAILOVERS = 2
#: the pages show the room right again within this after a failover: a node's repair runs
#: at its first heartbeat after the server changed (beats every node TTL / 3: 3.3 s by default)
REPAIR_WITHIN_S = 20.0


def _primary_has_replica(group: SentinelGroup) -> bool:
    """Whether the primary the sentinels name now has a replica in sync. (Now: on a busy
    machine a freshly promoted primary may miss its down-after time and be failed over in
    turn.)"""
    info = cli(group.primary(), group.password, "info", "replication")
    return "role:master" in info and "state=online" in info


def _sentinel_nodes(
    group: SentinelGroup, backing: BackingServices, node_processes: Callable[..., LocalNode]
) -> list[LocalNode]:
    """node-1 and node-2 on the Sentinel group."""
    # No URL: the nodes ask the sentinels (the placeholder keeps them from starting a Redis).
    services = BackingServices("sentinel:", backing.mongodb_uri)
    env = {
        "SFUMESH_REDIS_MODE": "sentinel",
        "SFUMESH_REDIS_SENTINELS": json.dumps(group.addresses),
        "SFUMESH_REDIS_PASSWORD": group.password,
        "SFUMESH_CHAT_PER_S": "100000",
    }
    return [node_processes(f"node-{i}", services, env) for i in (1, 2)]


async def _in_room(
    http: httpx.AsyncClient, urls: list[str], homes: list[int]
) -> tuple[list[User], list[Socket]]:
    """One user per entry of `homes`, the first creating the room; each connects to the node
    `urls[home]` and joins through the other node."""
    users = [await sign_up(http, urls[i % 2]) for i in range(len(homes))]
    await create_room(users[0], urls[0], ROOM)
    sockets = []
    for user, home in zip(users, homes, strict=True):
        sock = await user.connect(urls[home])
        await user.join(sock, ROOM, urls[1 - home])
        sockets.append(sock)
    return users, sockets


async def _wait(check: Callable[[], bool], what: str, within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while not await asyncio.to_thread(check):
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.2)


async def test_primary_failover_mid_call_loses_and_repeats_nothing(
    sentinel_group: SentinelGroup,
    backing: BackingServices,
    node_processes: Callable[..., LocalNode],
) -> None:
    group = sentinel_group
    urls = [node.url for node in _sentinel_nodes(group, backing, node_processes)]
    state = open_redis_with(sentinel_settings(group), "")
    async with httpx.AsyncClient(timeout=30) as http:
        (alice, bob, carol), (a, b, c) = await _in_room(http, urls, [0, 1, 0])
        sent: list[str] = []

        for failover in range(FAILOVERS):
            stop = asyncio.Event()

            async def talk(sock: Socket, tag: str, stop: asyncio.Event = stop) -> None:
                count = 0
                while not stop.is_set():
                    text = f"{tag}:{count}"
                    ack = await sock.request("chat", text=text)
                    assert ack["type"] == "ack", (ack, text)
                    sent.append(text)
                    count += 1
                    await asyncio.sleep(0.05)

            async def refresh(user: User, stop: asyncio.Event = stop) -> int:
                nonlocal c
                rounds = 0
                while not stop.is_set():
                    c = await _refresh_once(user, c, urls)
                    rounds += 1
                return rounds

            work = [
                asyncio.create_task(talk(a, f"{failover}.a")),
                asyncio.create_task(talk(b, f"{failover}.b")),
            ]
            refreshing = asyncio.create_task(refresh(carol))
            await asyncio.sleep(0.5)
            old = await asyncio.to_thread(group.primary)
            group.kill(old)
            await asyncio.to_thread(group.wait_new_primary, old)
            await asyncio.sleep(1.5)  # on well past the promotion
            stop.set()
            await asyncio.gather(*work)
            assert await refreshing > 0
            # The killed server comes back (empty) as the new primary's replica; the next
            # failover needs a replica that acknowledges the fences.
            await asyncio.to_thread(group.restart, old)
            await _wait(partial(_primary_has_replica, group), "no replica re-attached")

            # Everyone is still in the room: Alice and Bob, and Carol's newest session only.
            marker = f"after-failover-{failover}"
            assert (await c.request("chat", text=marker))["type"] == "ack"
            sent.append(marker)
            for sock in (a, b):
                await sock.wait_for("chat", text=marker)

            async def presence_problems(failover: int = failover) -> list[Any]:
                problems: list[Any] = []
                for sock, other, other_user in ((a, b, bob), (b, a, alice)):
                    model = PresenceModel()
                    for message in list(sock.messages):
                        model.apply(message)
                    if model.of_user(carol.user_id) != {c.session_id}:
                        problems.append((failover, "carol", model.of_user(carol.user_id)))
                    if model.of_user(other_user.user_id) != {other.session_id}:
                        problems.append((failover, "other", model.of_user(other_user.user_id)))
                raw = await state.hgetall(keys.room_members(ROOM))
                members = sorted(
                    (m.session_id, m.state) for m in (Membership.decode(v) for v in raw.values())
                )
                if members != sorted((s.session_id, "active") for s in (a, b, c)):
                    problems.append((failover, "members", members))
                return problems

            # A refresh whose end the failover lost leaves a ghost until its node's repair
            # (at its next heartbeat after the server changed, `LiveNode._end_ghosts`) has
            # ended it: the pages must come right within a few beats, not at once.
            deadline = time.monotonic() + REPAIR_WITHIN_S
            while problems := await presence_problems():
                assert time.monotonic() < deadline, problems
                await asyncio.sleep(0.2)

        # Every chat reached both live pages exactly once, in one order, and the history
        # holds each exactly once.
        for sock in (a, b):
            for text in sent:
                await sock.wait_for("chat", text=text)
        orders = [[m["text"] for m in s.messages if m["type"] == "chat"] for s in (a, b)]
        assert orders[0] == orders[1]
        assert sorted(orders[0]) == sorted(sent)
        history = await _history(http, urls[1], a.session_token)
        assert sorted(history) == sorted(sent)
        await asyncio.gather(a.close(), b.close(), c.close())
    await state.aclose()


async def test_events_a_node_missed_around_a_failover_are_made_good(
    sentinel_group: SentinelGroup,
    backing: BackingServices,
    node_processes: Callable[..., LocalNode],
) -> None:
    """Replication is asynchronous: a failover can lose the last events of a room's stream,
    some nodes having read them and some not. Made deterministic here: node-1 is stopped
    while Dave joins and Carol leaves on node-2, and both events are deleted before it
    wakes, as a lost tail would be (node-1 never read them); then the primary dies. After
    the failover each node re-reads its rooms' members and tells its clients what they
    missed: Alice (node-1) hears Dave join and Carol leave; Bob (node-2), who heard both, is
    told nothing twice."""
    group = sentinel_group
    nodes = _sentinel_nodes(group, backing, node_processes)
    urls = [node.url for node in nodes]
    sleeper = nodes[0].process.popen
    assert sleeper is not None
    state = open_redis_with(sentinel_settings(group), "")
    async with httpx.AsyncClient(timeout=30) as http:
        (_, _, carol), (a, b, c) = await _in_room(http, urls, [0, 1, 1])
        dave = await sign_up(http, urls[1])
        await a.wait_for("participant-joined", session_id=c.session_id)
        sleeper.send_signal(signal.SIGSTOP)
        try:
            # A blocking read node-1 had under way is answered (into its socket's buffer)
            # by this, so that it reads nothing of what follows.
            assert (await b.request("chat", text="while node-1 sleeps"))["type"] == "ack"
            d = await dave.connect(urls[1])
            await dave.join(d, ROOM, urls[1])
            assert (await c.request("leave"))["type"] == "ack"
            await b.wait_for("participant-left", session_id=c.session_id)
            events: Any = await state.xrange(keys.room_events(ROOM))
            wanted = {
                (b"participant-joined", d.session_id),
                (b"participant-left", c.session_id),
            }
            missed = [
                event_id
                for event_id, fields in events
                if (fields[b"type"], json.loads(fields[b"data"]).get("session_id")) in wanted
            ]
            assert len(missed) == 2, events
            await state.xdel(keys.room_events(ROOM), *missed)
            old = await asyncio.to_thread(group.primary)
            group.kill(old)
            await asyncio.to_thread(group.wait_new_primary, old)
        finally:
            sleeper.send_signal(signal.SIGCONT)
        await a.wait_for("participant-joined", within_s=30, session_id=d.session_id)
        await a.wait_for("participant-left", within_s=30, session_id=c.session_id)
        model = PresenceModel()
        for message in list(a.messages):
            model.apply(message)
        assert model.of_user(dave.user_id) == {d.session_id}
        assert model.of_user(carol.user_id) == set()
        # Bob's node made good nothing (it had read both): one join, one leave, no more.
        await asyncio.sleep(1.0)
        told = [
            m["type"]
            for m in b.messages
            if m.get("session_id", m.get("participant", {}).get("session_id"))
            in (c.session_id, d.session_id)
            and m["type"].startswith("participant-")
        ]
        assert sorted(told) == ["participant-joined", "participant-joined", "participant-left"]
        await asyncio.gather(a.close(), b.close(), c.close(), d.close())
    await state.aclose()


async def test_a_session_whose_end_the_failover_lost_is_ended(
    sentinel_group: SentinelGroup,
    backing: BackingServices,
    node_processes: Callable[..., LocalNode],
) -> None:
    """A failover can lose a session's end (its record, node entry and membership come back
    with the promoted replica) while its node lives on: nothing would ever end it, and the
    room would show a ghost (seen in the failover test above: Carol's replaced session still
    in a page's presence). Made deterministic: Carol leaves by closing her page, then her
    session's keys are written back as they were, replicated, and the primary killed. Her
    node ends the ghost after the failover: the membership goes, no page shows her."""
    group = sentinel_group
    urls = [node.url for node in _sentinel_nodes(group, backing, node_processes)]
    state = open_redis_with(sentinel_settings(group), "")
    async with httpx.AsyncClient(timeout=30) as http:
        (_, _, carol), (a, b, c) = await _in_room(http, urls, [0, 1, 0])
        await b.wait_for("participant-joined", session_id=c.session_id)
        member = await state.hget(keys.room_members(ROOM), c.session_id)
        record: dict[Any, Any] = await state.hgetall(keys.session(c.session_id))
        assert member is not None and record
        node = bytes(record[b"node"]).decode()
        await c.close()
        await b.wait_for("participant-left", session_id=c.session_id)
        # (the session's record and node entry go after the membership: wait for all)
        deadline = time.monotonic() + 30
        while await state.exists(keys.session(c.session_id)) or await state.sismember(
            keys.node_sessions(node), c.session_id
        ):
            assert time.monotonic() < deadline, "Carol's session did not end"
            await asyncio.sleep(0.1)
        await state.hset(keys.room_members(ROOM), c.session_id, member)
        await state.hset(keys.session(c.session_id), mapping=record)
        await state.sadd(keys.node_sessions(node), c.session_id)
        assert await state.wait(1, 5000) >= 1
        old = await asyncio.to_thread(group.primary)
        group.kill(old)
        await asyncio.to_thread(group.wait_new_primary, old)

        async def ghost_gone() -> bool:
            return await state.hget(keys.room_members(ROOM), c.session_id) is None

        deadline = time.monotonic() + 30
        while not await ghost_gone():
            assert time.monotonic() < deadline, "the ghost membership stayed"
            await asyncio.sleep(0.5)
        marker = "after-the-ghost"
        assert (await a.request("chat", text=marker))["type"] == "ack"
        for sock in (a, b):
            await sock.wait_for("chat", text=marker)
            model = PresenceModel()
            for message in list(sock.messages):
                model.apply(message)
            assert model.of_user(carol.user_id) == set()
        await asyncio.gather(a.close(), b.close())
    await state.aclose()


class JoinExpired(Exception):
    """The connection's pending seat lapsed while the room was unavailable: reconnect."""


async def _join(user: User, sock: Socket, via_url: str) -> None:
    """Join as a page does: a refusal that says "try again" (503 over HTTP, `unavailable` on
    the socket: while a room change waits for the promoted primary to have a replica) is
    tried again after a moment; `join_expired` (the wait outlasted the pending seat) means
    reconnect the WebSocket, as the error says."""
    for _ in range(60):
        reply = await user.http_join(sock, ROOM, via_url)
        if reply.status_code == 503:
            await asyncio.sleep(0.5)
            continue
        if reply.status_code == 409 and reply.json()["error"]["code"] == "join_expired":
            raise JoinExpired
        assert reply.status_code == 200, reply.text
        ack = await sock.request("join", room_token=reply.json()["room_token"])
        if ack.get("code") == "unavailable":
            await asyncio.sleep(0.5)
            continue
        assert ack["type"] == "ack", ack
        await sock.wait_for("joined")
        return
    raise AssertionError("the room stayed unavailable for 30 s")


async def _refresh_once(user: User, old: Socket, urls: list[str]) -> Socket:
    """A page refresh (as in test_live_mesh): the old page leaves and/or closes while the
    new one connects and joins, same session or a new one, on either node."""
    same_session = random.random() < 0.3
    action = random.choice(["leave-and-close", "close", "close-late"])

    async def old_page() -> None:
        await asyncio.sleep(random.uniform(0, 0.03))
        try:
            if action == "leave-and-close":
                await old.ws.send(json.dumps({"type": "leave"}))
            if action == "close-late":
                await asyncio.sleep(random.uniform(0.02, 0.06))
            await old.close()
        except (OSError, websockets.exceptions.WebSocketException):
            pass  # the server may have closed it first (replaced)

    async def new_page() -> Socket:
        await asyncio.sleep(random.uniform(0, 0.03))
        for _ in range(3):
            fresh = await user.connect(
                random.choice(urls), old.session_token if same_session else None
            )
            try:
                await _join(user, fresh, random.choice(urls))
            except JoinExpired:
                await fresh.close()
                continue
            return fresh
        raise AssertionError("the join expired three times in a row")

    _, fresh = await asyncio.gather(old_page(), new_page())
    return fresh


async def _history(http: httpx.AsyncClient, url: str, session_token: str) -> list[str]:
    texts: list[str] = []
    before: Any = None
    while True:
        params = {"limit": 100, **({"before": before} if before else {})}
        reply = await http.get(
            f"{url}/api/rooms/{ROOM}/messages",
            params=params,
            headers={"Authorization": f"Bearer {session_token}"},
        )
        assert reply.status_code == 200, reply.text
        page = reply.json()
        texts += [m["text"] for m in page["messages"]]
        before = page["next_before"]
        if not before:
            return texts

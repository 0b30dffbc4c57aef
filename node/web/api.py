"""HTTP routes of the public contract (../shared/API.md): users, auth, sessions, rooms, chat."""

from __future__ import annotations

import json
import math
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from quart import Blueprint, Response, request
from quart_schema import validate_querystring, validate_request, validate_response

from mesh.closest import NEXT_PROBES, estimated_rtts, next_probes
from mesh.vivaldi import rank_from_samples
from node.errors import DomainError, Forbidden, Invalid
from node.runtime.chat import Poster, post_chat
from node.state import keys
from node.store.messages import (
    HistoryPage,
    HistoryQuery,
    MessageView,
    NewMessage,
    history,
    message_view,
)
from node.store.models import User
from node.store.rooms import (
    NewRoom,
    RoomChange,
    RoomView,
    change_room,
    create_room,
    get_room,
    qr_svg,
    remember_person,
    room_person,
    room_url,
    room_view,
    share_a_room,
)
from node.store.users import (
    LoginRequest,
    NewUser,
    OwnUser,
    PasswordChange,
    PublicUser,
    authenticate,
    change_password,
    create_user,
    get_user,
    own_view,
    public_view,
    username_key,
)
from node.web.auth import Auth, authenticated
from node.web.context import node_context
from node.web.errors import APIError
from node.web.peers import client_address as peer_address
from node.web.tokens import Purpose, dump_claims

api = Blueprint("api", __name__, url_prefix="/api")


class UserToken(BaseModel):
    user_token: str
    expires_at: datetime


class SessionGrant(BaseModel):
    session_id: str
    session_token: str
    expires_at: datetime


def client_address(trusted_proxies: list[str]) -> str:
    """The request's client address (see `node.web.peers.client_address`)."""
    return peer_address(request, trusted_proxies)


@api.post("/users")
@validate_request(NewUser)
@validate_response(PublicUser, 201)
async def sign_up(data: NewUser) -> tuple[PublicUser, int]:
    context = node_context()
    address = client_address(context.settings.trusted_proxies)
    return await create_user(data, context.hasher, context.signup_limiter, address), 201


@api.post("/auth/login")
@validate_request(LoginRequest)
@validate_response(UserToken)
async def login(data: LoginRequest) -> UserToken:
    context = node_context()
    address = client_address(context.settings.trusted_proxies)
    user = await authenticate(data, address, context.hasher, context.login_limiter)
    issued = context.tokens.issue(Purpose.USER, str(user.id), generation=user.token_generation)
    return UserToken(user_token=issued.token, expires_at=issued.expires_at)


@api.post("/auth/refresh")
@authenticated(Purpose.USER)
@validate_response(UserToken)
async def refresh(auth: Auth) -> UserToken:
    """A new user token for a valid one (same login, so logout still reaches it), until
    `tokens.user_max_age_s` after the login: then the client logs in again."""
    context = node_context()
    claims, user = auth.claims, auth.user
    logged_in = claims.authenticated_at or datetime.now(UTC)
    deadline = logged_in + timedelta(seconds=context.tokens.user_max_age_s)
    left_s = (deadline - datetime.now(UTC)).total_seconds()
    if left_s < 1:
        raise APIError(
            401,
            "login_required",
            "this login is too old to refresh; log in again",
            headers={"WWW-Authenticate": "Bearer"},
        )
    issued = context.tokens.issue(
        Purpose.USER,
        str(user.id),
        family=claims.family,
        generation=user.token_generation,
        authenticated_at=logged_in,
        ttl_s=min(context.settings.tokens.user_ttl_s, left_s),
    )
    return UserToken(user_token=issued.token, expires_at=issued.expires_at)


@api.post("/auth/logout")
@authenticated(Purpose.USER)
async def logout(auth: Auth) -> tuple[str, int]:
    """Ends this login: its user tokens and every session and room token they bought stop
    working on every node."""
    context = node_context()
    claims = auth.claims
    # Clocks of other nodes may lag a little: keep the mark a minute past the longest life.
    await context.token_state.revoke_family(claims.family, context.tokens.longest_ttl_s + 60)
    return "", 204


@api.post("/users/me/password")
@authenticated(Purpose.USER)
@validate_request(PasswordChange)
@validate_response(UserToken)
async def new_password(data: PasswordChange, auth: Auth) -> UserToken:
    """Change the password; every token of the user is refused from now on, this one too,
    so the answer carries a fresh user token (a new login)."""
    context = node_context()
    user = auth.user
    address = client_address(context.settings.trusted_proxies)
    user = await change_password(user, data, address, context.hasher, context.login_limiter)
    issued = context.tokens.issue(Purpose.USER, str(user.id), generation=user.token_generation)
    return UserToken(user_token=issued.token, expires_at=issued.expires_at)


@api.get("/users/me")
@authenticated(Purpose.USER)
@validate_response(OwnUser)
async def me(auth: Auth) -> OwnUser:
    return own_view(auth.user)


@api.get("/users/by-username/<username>")
@authenticated(Purpose.USER)
@validate_response(PublicUser)
async def user_by_username(username: str, auth: Auth) -> PublicUser:
    user = await User.find_one(User.username_key == username_key(username))
    if user is None:
        raise APIError(404, "user_not_found", "no such user")
    return public_view(user)


@api.get("/users/<user_id>")
@authenticated(Purpose.USER)
async def user_by_id(user_id: str, auth: Auth) -> dict[str, Any]:
    """A profile by id only for its owner and the people who share a room with them: ids are
    shown in rooms, never listed, so nobody walks every profile. Anyone else is told 404,
    exactly as for an id nobody has (by-username stays open: a name is what one is given)."""
    viewer = auth.user
    user = await get_user(user_id)
    if user is None or not await share_a_room(viewer.id, user.id):
        raise APIError(404, "user_not_found", "no such user")
    # Email and sign-up date only for the user themself.
    view = own_view(user) if user.id == viewer.id else public_view(user)
    return view.model_dump(mode="json")


@api.post("/sessions")
@authenticated(Purpose.USER)
@validate_response(SessionGrant, 201)
async def new_session(auth: Auth) -> tuple[SessionGrant, int]:
    claims, user = auth.claims, auth.user
    session_id = secrets.token_hex(16)
    issued = node_context().tokens.issue(
        Purpose.SESSION,
        str(user.id),
        session_id=session_id,
        family=claims.family,
        generation=user.token_generation,
        authenticated_at=claims.authenticated_at,
    )
    return SessionGrant(
        session_id=session_id, session_token=issued.token, expires_at=issued.expires_at
    ), 201


class WsTicket(BaseModel):
    ticket: str
    expires_at: datetime


@api.post("/sessions/ws-ticket")
@authenticated(Purpose.SESSION)
@validate_response(WsTicket, 201)
async def ws_ticket(auth: Auth) -> tuple[WsTicket, int]:
    """A short-lived, single-use stand-in for the session token in `/ws?ticket=...`, so the
    long-lived token never appears in a URL (proxy logs, browser history). It holds on
    every node: the ticket lives in the shared Redis."""
    context = node_context()
    claims = auth.claims
    ttl_s = context.settings.tokens.ws_ticket_ttl_s
    ticket = secrets.token_urlsafe(32)
    expires_at = datetime.now(UTC) + timedelta(seconds=ttl_s)
    await context.token_state.put_ticket(ticket, dump_claims(claims), ttl_s)
    return WsTicket(ticket=ticket, expires_at=expires_at), 201


@api.post("/rooms")
@authenticated(Purpose.USER)
@validate_request(NewRoom)
@validate_response(RoomView, 201)
async def new_room(data: NewRoom, auth: Auth) -> tuple[RoomView, int]:
    context = node_context()
    user = auth.user
    settings = context.settings.rooms
    # Counted before the work; given back if no room was made (a taken name, say).
    limit_key = keys.room_creations(str(user.id))
    await context.live.limits.hit(
        limit_key, settings.creations_per_window, settings.creation_window_s, "rooms created"
    )
    lock = context.live.lock
    try:
        room = await create_room(
            data,
            user,
            settings,
            guard=lambda: lock.hold(keys.room_lock(data.slug), keys.room_fence(data.slug)),
        )
    except DomainError:
        await context.live.limits.give_back(limit_key)
        raise
    return await room_view(room, context.settings.base_url, context.redis), 201


async def _count_lookup() -> None:
    """One room look-up from this client address (429 over `rooms.lookups_per_window`)."""
    context = node_context()
    settings = context.settings.rooms
    address = client_address(context.settings.trusted_proxies)
    await context.live.limits.hit(
        keys.room_lookups(address),
        settings.lookups_per_window,
        settings.lookup_window_s,
        "room look-ups",
    )


@api.get("/rooms/<slug>")
@validate_response(RoomView)
async def room_info(slug: str) -> RoomView:
    context = node_context()
    await _count_lookup()
    room = await get_room(slug)
    return await room_view(room, context.settings.base_url, context.redis)


@api.patch("/rooms/<slug>")
@authenticated(Purpose.USER)
@validate_request(RoomChange)
@validate_response(RoomView)
async def patch_room(slug: str, data: RoomChange, auth: Auth) -> RoomView:
    """The room's creator changes its settings: today whether photos uploaded from now on
    keep their original EXIF (issue 15), if the operator allows it
    (`files.keep_original_exif_allowed`)."""
    context = node_context()
    room = await get_room(slug)
    room = await change_room(
        room, data, auth.user, context.settings.files.keep_original_exif_allowed
    )
    return await room_view(room, context.settings.base_url, context.redis)


@api.get("/rooms/<slug>/qr.svg")
async def room_qr(slug: str) -> Response:
    await _count_lookup()
    room = await get_room(slug)
    svg = qr_svg(room_url(node_context().settings.base_url, room.slug))
    return Response(svg, content_type="image/svg+xml", headers={"Cache-Control": "max-age=3600"})


class RoomGrant(BaseModel):
    room_token: str
    expires_at: datetime
    room: str
    # The node that holds this session's WebSocket: the room token works there only.
    node: str
    node_url: str | None


@api.post("/rooms/<slug>/join")
@authenticated(Purpose.SESSION)
@validate_response(RoomGrant)
async def join_room(slug: str, auth: Auth) -> RoomGrant:
    """Step 2 of joining (S2): on any node; the WebSocket must already be open somewhere."""
    context = node_context()
    claims, user = auth.claims, auth.user
    room = await get_room(slug)
    assert claims.session_id is not None  # session tokens always carry one
    record, _ = await context.live.sessions.join(
        room.slug,
        claims.session_id,
        str(user.id),
        user.display_name,
        room.capacity,
        context.settings.live.duplicate_policy,
    )
    await remember_person(room, str(user.id))
    issued = context.tokens.issue(
        Purpose.ROOM,
        str(user.id),
        session_id=claims.session_id,
        room=room.slug,
        node=record.node,
        family=claims.family,
        generation=user.token_generation,
        authenticated_at=claims.authenticated_at,
    )
    nodes = {info.name: info for info in await context.live.registry.live()}
    return RoomGrant(
        room_token=issued.token,
        expires_at=issued.expires_at,
        room=room.slug,
        node=record.node,
        node_url=nodes[record.node].url if record.node in nodes else None,
    )


class RemoveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(min_length=1, max_length=64)


class Removed(BaseModel):
    room: str
    user_id: str
    # The sessions of that user that were in the room (or waiting to enter it).
    sessions_removed: int


@api.post("/rooms/<slug>/kick")
@authenticated(Purpose.USER)
@validate_request(RemoveRequest)
@validate_response(Removed)
async def kick(slug: str, data: RemoveRequest, auth: Auth) -> Removed:
    """The room's creator removes someone: their sessions leave now (`left`, reason
    `removed-by-owner`; the others see `participant-left`) and they cannot join again for
    `rooms.removed_for_s`. Also how a creator frees seats held by joins never completed."""
    context = node_context()
    user = auth.user
    room = await get_room(slug)
    if room.creator_id != str(user.id):
        raise Forbidden("not_room_creator", "only the room's creator can remove people")
    if data.user_id == str(user.id):
        raise Invalid("cannot_remove_self", "the creator cannot remove themselves")
    removed = await context.live.sessions.kick(room.slug, data.user_id)
    return Removed(room=room.slug, user_id=data.user_id, sessions_removed=len(removed))


class CoordinateView(BaseModel):
    """A Serf Vivaldi coordinate (seconds), as `get-coordinate` gives it."""

    vec: list[float]
    error: float
    adjustment: float
    height: float


class LoadView(BaseModel):
    sessions: int
    cpu_percent: float


class NodeView(BaseModel):
    name: str
    region: str
    url: str
    ws_url: str
    started_at: float
    # From the Serf mesh; null when the node is not (yet) seen there or the mesh is off.
    serf_status: str | None = None
    coordinate: CoordinateView | None = None
    load: LoadView | None = None


class NodeList(BaseModel):
    nodes: list[NodeView]


async def _node_views() -> list[NodeView]:
    context = node_context()
    members = {m.name: m for m in context.cluster.members()}
    views = []
    for info in await context.live.registry.live():
        member = members.get(info.name)
        coordinate = load = None
        if member is not None and member.coordinate is not None:
            c = member.coordinate
            coordinate = CoordinateView(
                vec=list(c.vec), error=c.error, adjustment=c.adjustment, height=c.height
            )
        if member is not None:
            load = LoadView(sessions=member.load.sessions, cpu_percent=member.load.cpu_percent)
        views.append(
            NodeView(
                name=info.name,
                region=info.region,
                url=info.url,
                ws_url=info.ws_url,
                started_at=info.started_at,
                serf_status=member.status if member is not None else None,
                coordinate=coordinate,
                load=load,
            )
        )
    return views


@api.get("/nodes")
@validate_response(NodeList)
async def live_nodes() -> NodeList:
    """Nodes whose registry record is fresh, with their Serf coordinate and load."""
    return NodeList(nodes=await _node_views())


class RttSample(BaseModel):
    node: str = Field(min_length=1, max_length=128)
    rtt_ms: float = Field(gt=0, le=10_000)


class RankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    samples: list[RttSample] = Field(min_length=1, max_length=16)


class RankedNode(BaseModel):
    name: str
    region: str
    url: str
    ws_url: str
    # Measured by the client when it sampled this node, else estimated from coordinates;
    # null when neither is known (no coordinate: the mesh is off or not settled yet).
    rtt_ms: float | None
    measured: bool


class Ranking(BaseModel):
    nodes: list[RankedNode]
    # Up to NEXT_PROBES (4) nodes worth measuring next, not measured yet: those whose RTT
    # profile best matches the samples, round 2 of the clients' procedure (mesh/closest.py,
    # which clients run themselves from GET /api/nodes; kept here for older clients).
    probe_next: list[str]


@api.post("/nodes/rank")
@validate_request(RankRequest)
@validate_response(Ranking)
async def rank_nodes(data: RankRequest) -> Ranking:
    """Rank every live node for this client, nearest first: the client's RTT samples to a
    few nodes place it among the nodes' Vivaldi coordinates (N4)."""
    context = node_context()
    infos = await context.live.registry.live()
    samples: dict[str, float] = {}
    for sample in data.samples:
        # a repeated node keeps its best sample (the least queued)
        seconds = sample.rtt_ms / 1000
        samples[sample.node] = min(seconds, samples.get(sample.node, seconds))
    live = {info.name for info in infos}
    coords = {
        name: coordinate
        for name, coordinate in context.cluster.coordinates().items()
        if name in live
    }
    # measured beats estimated; neither known: inf (last, null)
    rtts = {name: samples.get(name, math.inf) for name in live}
    rtts.update(rank_from_samples(samples, coords))
    ranked = [
        RankedNode(
            name=info.name,
            region=info.region,
            url=info.url,
            ws_url=info.ws_url,
            rtt_ms=round(rtts[info.name] * 1000, 3) if math.isfinite(rtts[info.name]) else None,
            measured=info.name in samples,
        )
        for info in sorted(infos, key=lambda i: (rtts[i.name], i.name))
    ]
    probe_next = next_probes(estimated_rtts(coords), samples, NEXT_PROBES) if coords else []
    return Ranking(nodes=ranked, probe_next=probe_next)


@api.get("/ping")
async def ping() -> Response:
    """Tiny and never cached: clients time it to a few nodes before asking for a ranking."""
    response = Response(
        json.dumps({"node": node_context().settings.node_name}),
        content_type="application/json",
    )
    response.headers["Cache-Control"] = "no-store"
    # Lets a page of another node read this request's Resource Timing (TCP connect and
    # request apart), so one request measures the RTT even on a new connection
    # (webapp/closest.js). It reveals nothing but timing of a public, constant answer.
    response.headers["Timing-Allow-Origin"] = "*"
    return response


@api.get("/rooms/<slug>/messages")
@authenticated(Purpose.SESSION)
@validate_querystring(HistoryQuery)
@validate_response(HistoryPage)
async def room_messages(slug: str, query_args: HistoryQuery, auth: Auth) -> HistoryPage:
    room = await room_person(slug, str(auth.user.id))
    return await history(room, query_args.before, query_args.limit)


@api.post("/rooms/<slug>/messages")
@authenticated(Purpose.SESSION)
@validate_request(NewMessage)
@validate_response(MessageView, 201)
async def post_message(slug: str, data: NewMessage, auth: Auth) -> tuple[MessageView, int]:
    claims, user = auth.claims, auth.user
    room = await get_room(slug)
    assert claims.session_id is not None  # session tokens always carry one
    poster = Poster(claims.session_id, str(user.id), user.display_name, in_room_now=False)
    message, _ = await post_chat(node_context().live, room, poster, data.text)
    return message_view(message), 201

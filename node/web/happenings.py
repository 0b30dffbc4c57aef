"""HTTP routes of happenings (R8, issue 16): plan, change, cancel, answer, calendars.

Every route but the calendar feed takes a session token (as chat does) and is for the room's
people only; the token is checked before the body is read (`authenticated`). The feed is read
by calendar apps, which send no header: its URL carries a signed token of its own
(purpose "calendar", see `calendar_feed`).
"""

from __future__ import annotations

from datetime import datetime
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field
from quart import Blueprint, Response
from quart_schema import validate_querystring, validate_request, validate_response

from node.errors import Forbidden, NotFound
from node.runtime import happenings as live_happenings
from node.state.reminders import Reminders
from node.store.calendar import calendar_of
from node.store.happenings import (
    HappeningPatch,
    HappeningView,
    NewHappening,
    RsvpRequest,
    cancel_happening,
    check_may_change,
    edit_happening,
    feed_family,
    feed_is_current,
    get_happening,
    happening_view,
    happening_views,
    room_happenings,
)
from node.store.models import Room
from node.store.rooms import get_room, is_person, room_person
from node.store.users import get_user
from node.web.auth import Auth, authenticated
from node.web.context import node_context
from node.web.tokens import Purpose, TokenError

happenings_api = Blueprint("happenings", __name__, url_prefix="/api")

#: app.extensions key of the node's ReminderLoop
REMINDERS_EXTENSION = "sfumesh-reminders"


class HappeningList(BaseModel):
    happenings: list[HappeningView]


async def _person_room(slug: str, user_id: str) -> Room:
    room = await get_room(slug)
    if not await is_person(room, user_id):
        raise Forbidden("not_joined", "only the room's people may do this: join the room first")
    return room


@happenings_api.get("/rooms/<slug>/happenings")
@authenticated(Purpose.SESSION)
@validate_response(HappeningList)
async def list_happenings(slug: str, auth: Auth) -> HappeningList:
    """The room's happenings by start, oldest first; cancelled ones included (flagged)."""
    room = await room_person(slug, str(auth.user.id))
    return HappeningList(happenings=await happening_views(await room_happenings(room)))


@happenings_api.post("/rooms/<slug>/happenings")
@authenticated(Purpose.SESSION)
@validate_request(NewHappening)
@validate_response(HappeningView, 201)
async def plan_happening(slug: str, data: NewHappening, auth: Auth) -> tuple[HappeningView, int]:
    context = node_context()
    settings = context.settings.happenings
    room = await _person_room(slug, str(auth.user.id))
    happening = await live_happenings.plan(
        context.live,
        room,
        str(auth.user.id),
        auth.user.display_name,
        data,
        settings.max_per_room,
        settings.max_capacity,
    )
    await live_happenings.reschedule(Reminders(context.redis), happening, settings.reminder_lead_s)
    view = await live_happenings.announce(
        context.live, room, "created", happening, auth.user.display_name
    )
    return view, 201


@happenings_api.get("/happenings/<happening_id>")
@authenticated(Purpose.SESSION)
@validate_response(HappeningView)
async def show_happening(happening_id: str, auth: Auth) -> HappeningView:
    happening = await get_happening(happening_id)
    await room_person(happening.room, str(auth.user.id))
    return await happening_view(happening)


@happenings_api.patch("/happenings/<happening_id>")
@authenticated(Purpose.SESSION)
@validate_request(HappeningPatch)
@validate_response(HappeningView)
async def change_happening(happening_id: str, data: HappeningPatch, auth: Auth) -> HappeningView:
    context = node_context()
    settings = context.settings.happenings
    happening = await get_happening(happening_id)
    room = await get_room(happening.room)
    check_may_change(happening, room, str(auth.user.id))
    old = happening.model_copy()
    happening = await edit_happening(happening, data, settings.max_capacity)
    await live_happenings.reschedule(
        Reminders(context.redis), happening, settings.reminder_lead_s, old
    )
    return await live_happenings.announce(
        context.live, room, "updated", happening, auth.user.display_name
    )


@happenings_api.delete("/happenings/<happening_id>")
@authenticated(Purpose.SESSION)
@validate_response(HappeningView)
async def cancel(happening_id: str, auth: Auth) -> HappeningView:
    """Cancelled, not deleted: the room still sees it (flagged), its reminders are dropped."""
    context = node_context()
    happening = await get_happening(happening_id)
    room = await get_room(happening.room)
    check_may_change(happening, room, str(auth.user.id))
    if happening.cancelled:
        return await happening_view(happening)
    happening = await cancel_happening(happening)
    await Reminders(context.redis).unschedule(live_happenings.all_reminders(happening))
    return await live_happenings.announce(
        context.live, room, "cancelled", happening, auth.user.display_name
    )


@happenings_api.put("/happenings/<happening_id>/rsvp")
@authenticated(Purpose.SESSION)
@validate_request(RsvpRequest)
@validate_response(HappeningView)
async def rsvp(happening_id: str, data: RsvpRequest, auth: Auth) -> HappeningView:
    """Going, maybe or not going; with a capacity, "going" past it waits in line."""
    happening = await get_happening(happening_id)
    room = await _person_room(happening.room, str(auth.user.id))
    return await live_happenings.answer(
        node_context().live,
        room,
        happening,
        str(auth.user.id),
        auth.user.display_name,
        data.answer,
    )


ICS = "text/calendar; charset=utf-8"


def _ics(body: bytes, filename: str) -> Response:
    response = Response(body, content_type=ICS)
    response.headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    response.headers["Cache-Control"] = "private, no-store"
    return response


@happenings_api.get("/happenings/<happening_id>/event.ics")
@authenticated(Purpose.SESSION)
async def happening_ics(happening_id: str, auth: Auth) -> Response:
    """One happening as an .ics file ("add to calendar")."""
    happening = await get_happening(happening_id)
    await room_person(happening.room, str(auth.user.id))
    body = calendar_of([happening], node_context().settings.base_url)
    return _ics(body, "happening.ics")


class CalendarLink(BaseModel):
    #: the feed over https, and the same as webcal:// (what calendar apps subscribe to)
    url: str
    webcal: str
    expires_at: datetime


class FeedQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str = Field(max_length=2048)


@happenings_api.post("/rooms/<slug>/calendar")
@authenticated(Purpose.SESSION)
@validate_response(CalendarLink)
async def calendar_link(slug: str, auth: Auth) -> CalendarLink:
    """A subscribable URL of the room's happenings, for the asking person."""
    return await _link(slug, auth, reset=False)


@happenings_api.delete("/rooms/<slug>/calendar")
@authenticated(Purpose.SESSION)
@validate_response(CalendarLink)
async def reset_calendar_link(slug: str, auth: Auth) -> CalendarLink:
    """Revoke every earlier feed URL of the asking person for this room; a new one back."""
    return await _link(slug, auth, reset=True)


async def _link(slug: str, auth: Auth, *, reset: bool) -> CalendarLink:
    context = node_context()
    room = await room_person(slug, str(auth.user.id))
    family = await feed_family(room.slug, str(auth.user.id), reset=reset)
    issued = context.tokens.issue(
        Purpose.CALENDAR,
        str(auth.user.id),
        room=room.slug,
        family=family,
        generation=auth.user.token_generation,
    )
    # In the query string, never the path: the access log writes paths.
    url = f"{context.settings.base_url}/api/calendars/room.ics?token={quote(issued.token)}"
    webcal = "webcal://" + url.split("://", 1)[1]
    return CalendarLink(url=url, webcal=webcal, expires_at=issued.expires_at)


@happenings_api.get("/calendars/room.ics")
@validate_querystring(FeedQuery)
async def calendar_feed(query_args: FeedQuery) -> Response:
    """The room's happenings for a calendar app. The token in the URL is the whole check:
    signed for purpose "calendar", its family still the feed's (not reset), its user's
    password unchanged since, and its user still one of the room's people."""
    context = node_context()
    refused = NotFound("calendar_not_found", "no such calendar (the link was reset or expired)")
    try:
        claims = context.tokens.verify(query_args.token, Purpose.CALENDAR)
    except TokenError as error:
        raise refused from error
    if claims.room is None or not await feed_is_current(claims.room, claims.user_id, claims.family):
        raise refused
    user = await get_user(claims.user_id)
    if user is None or user.token_generation != claims.generation:
        raise refused
    room = await get_room(claims.room)
    if not await is_person(room, claims.user_id):
        raise refused
    body = calendar_of(await room_happenings(room), context.settings.base_url, name=room.name)
    return _ics(body, "room.ics")

"""Happenings (R8, issue 16): events a room plans, the people's answers, and who gets a seat.

A happening keeps its start and end as UTC instants plus the IANA zone it was planned in:
the instant is what reminders and calendars need, the zone what people meant ("10:00 at the
lake" stays 10:00 in Hanoi whatever zone a reader is in). Wall times arrive as the planner
typed them (naive ISO, read in `zone`), so the client never has to do zone arithmetic.

Answers (RSVPs) are one document per (happening, person). Who is "going" and who waits is
never stored: it is derived from the answers alone, each "going" ranked by the order it was
given (`seq`), the first `capacity` going and the rest wait-listed in that order. So dropping
out moves the wait list up by itself, a changed capacity needs no rewrite, and the outcome is
the same on every node whatever order the writes land in. `seq` is the fence of the per-
happening lock the answer was written under (node/runtime/happenings.py): unique and
increasing across the mesh, so the order is the order the lock was taken in.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from beanie import Document, PydanticObjectId, SortDirection
from beanie.operators import In
from bson.errors import InvalidId
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pymongo import ASCENDING, IndexModel

from node.errors import Conflict, Forbidden, Invalid, NotFound
from node.store.models import Room, utcnow
from node.store.text import RAW_CHARS_PER_CHAR, clean_text

log = logging.getLogger(__name__)

MAX_TITLE_CHARS = 120
MAX_DESCRIPTION_CHARS = 4000
MAX_PLACE_CHARS = 200
MAX_URL_CHARS = 2000
MAX_WHEN_CHARS = 40
MAX_ZONE_CHARS = 64
#: the longest a happening may last
MAX_DURATION = timedelta(days=31)
#: starts this far out are refused (typos like year 20266)
MAX_AHEAD = timedelta(days=5 * 366)

Answer = Literal["going", "maybe", "not_going"]
Status = Literal["going", "waitlisted", "maybe", "not_going"]


class Happening(Document):
    id: PydanticObjectId = Field(default_factory=PydanticObjectId)
    room: str
    title: str
    description: str = ""
    starts_at: datetime  # UTC
    ends_at: datetime | None = None  # UTC
    zone: str
    place: str = ""
    place_url: str | None = None
    capacity: int | None = None
    creator_id: str
    creator_name: str
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    cancelled: bool = False

    class Settings:
        name = "happenings"
        indexes: ClassVar[list[IndexModel]] = [
            IndexModel([("room", ASCENDING), ("starts_at", ASCENDING)])
        ]


class Rsvp(Document):
    """One person's answer to one happening; the id is (happening, user), so one each."""

    id: str  # type: ignore[assignment]  # "<happening id>\n<user id>"
    happening_id: str
    user_id: str
    display_name: str
    answer: Answer
    # The fence of the lock this answer was given under: its place in the queue for seats.
    seq: int
    at: datetime = Field(default_factory=utcnow)

    class Settings:
        name = "happening_rsvps"
        indexes: ClassVar[list[IndexModel]] = [IndexModel([("happening_id", ASCENDING)])]

    @staticmethod
    def key(happening_id: str, user_id: str) -> str:
        return f"{happening_id}\n{user_id}"


class CalendarFeed(Document):
    """One person's feed of one room's happenings. Its URL carries a signed token naming
    `family`; resetting the feed draws a new family, and every earlier URL stops working."""

    id: str  # type: ignore[assignment]  # "<room slug>\n<user id>"
    family: str
    reset_at: datetime = Field(default_factory=utcnow)

    class Settings:
        name = "calendar_feeds"

    @staticmethod
    def key(room: str, user_id: str) -> str:
        return f"{room}\n{user_id}"


HAPPENING_MODELS: list[type[Document]] = [Happening, Rsvp, CalendarFeed]


async def feed_family(room: str, user_id: str, *, reset: bool = False) -> str:
    """The family of `user_id`'s feed of `room` (made on first use; new when `reset`)."""
    key = CalendarFeed.key(room, user_id)
    feed = await CalendarFeed.get(key)
    if feed is None or reset:
        feed = CalendarFeed(id=key, family=secrets.token_hex(12))
        await feed.save()
    return feed.family


async def feed_is_current(room: str, user_id: str, family: str) -> bool:
    feed = await CalendarFeed.get(CalendarFeed.key(room, user_id))
    return feed is not None and secrets.compare_digest(feed.family, family)


# --- input -------------------------------------------------------------------------------


def _clean_title(value: str) -> str:
    title = clean_text(value, max_chars=MAX_TITLE_CHARS)
    if not title:
        raise ValueError("must not be empty")
    return title


def _clean_description(value: str) -> str:
    # Optional: left empty (or blank) by a form is no description, not an error.
    if not value.strip():
        return ""
    return clean_text(value, max_chars=MAX_DESCRIPTION_CHARS, allow_newlines=True)


def _clean_place(value: str) -> str:
    if not value.strip():
        return ""
    return clean_text(value, max_chars=MAX_PLACE_CHARS)


def _check_url(value: str) -> str:
    value = value.strip()
    if not value:
        return value
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.netloc:
        raise ValueError("must be an http(s) URL")
    if any(ord(char) < 0x21 or ord(char) == 0x7F for char in value):
        raise ValueError("must not contain spaces or control characters")
    return value


def check_zone(value: str) -> str:
    """The IANA zone name as given, or ValueError ("UTC" is one; offsets like "+07" are not)."""
    if value not in available_timezones() and value != "UTC":
        raise ValueError(f"unknown time zone {value!r} (an IANA name, e.g. Asia/Ho_Chi_Minh)")
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError) as error:
        raise ValueError(f"unknown time zone {value!r}") from error
    return value


Title = Annotated[
    str, Field(max_length=RAW_CHARS_PER_CHAR * MAX_TITLE_CHARS), AfterValidator(_clean_title)
]
Description = Annotated[
    str,
    Field(max_length=RAW_CHARS_PER_CHAR * MAX_DESCRIPTION_CHARS),
    AfterValidator(_clean_description),
]
Place = Annotated[
    str, Field(max_length=RAW_CHARS_PER_CHAR * MAX_PLACE_CHARS), AfterValidator(_clean_place)
]
PlaceUrl = Annotated[str, Field(max_length=MAX_URL_CHARS), AfterValidator(_check_url)]
Zone = Annotated[str, Field(max_length=MAX_ZONE_CHARS), AfterValidator(check_zone)]
#: a wall time as the planner typed it, "2026-03-29T10:00" (read in `zone`); an ISO time
#: with an offset or "Z" is taken as that instant
When = Annotated[str, Field(min_length=10, max_length=MAX_WHEN_CHARS)]


class NewHappening(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    title: Title
    description: Description = ""
    start: When
    end: When | None = None
    zone: Zone
    place: Place = ""
    place_url: PlaceUrl | None = None
    capacity: Annotated[int, Field(ge=1)] | None = None


class HappeningPatch(BaseModel):
    """Only what is given changes; `end`, `place_url` and `capacity` may be set to null."""

    model_config = ConfigDict(extra="forbid", strict=True)

    title: Title | None = None
    description: Description | None = None
    start: When | None = None
    end: When | None = None
    zone: Zone | None = None
    place: Place | None = None
    place_url: PlaceUrl | None = None
    capacity: Annotated[int, Field(ge=1)] | None = None


class RsvpRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    answer: Answer


def to_instant(field: str, when: str, zone: str) -> datetime:
    """The UTC instant of `when` (a wall time in `zone`, or an ISO time with an offset).

    A wall time that does not exist in the zone (skipped by a DST change) is refused rather
    than moved; one that exists twice (the hour repeated in autumn) is the first of the two.
    """
    try:
        parsed = datetime.fromisoformat(when)
    except ValueError as error:
        raise Invalid("invalid_time", f"{field}: not an ISO 8601 date and time") from error
    if parsed.tzinfo is not None:
        return _ms(parsed.astimezone(UTC))
    tz = ZoneInfo(zone)
    local = parsed.replace(tzinfo=tz, fold=0)
    instant = local.astimezone(UTC)
    if instant.astimezone(tz).replace(tzinfo=None) != parsed:
        raise Invalid(
            "invalid_time", f"{field}: {when} does not exist in {zone} (skipped by a clock change)"
        )
    return _ms(instant)


def _ms(value: datetime) -> datetime:
    """To the millisecond, as the store keeps it: reminders are named by it."""
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


def _check_span(start: datetime, end: datetime | None) -> None:
    if end is not None:
        if end < start:
            raise Invalid("end_before_start", "end: must not be before start")
        if end - start > MAX_DURATION:
            raise Invalid("invalid_time", f"end: at most {MAX_DURATION.days} days after start")
    now = utcnow()
    if start > now + MAX_AHEAD or start < now - MAX_AHEAD:
        raise Invalid("invalid_time", "start: too far from today")


# --- views -------------------------------------------------------------------------------


class RsvpView(BaseModel):
    user_id: str
    display_name: str
    answer: Answer
    status: Status
    #: 1-based place on the wait list (waitlisted only)
    position: int | None = None


class Counts(BaseModel):
    going: int
    waitlisted: int
    maybe: int
    not_going: int


class HappeningView(BaseModel):
    id: str
    room: str
    title: str
    description: str
    start: datetime  # UTC
    end: datetime | None
    zone: str
    #: start and end as wall times in `zone`, with their offset
    start_local: str
    end_local: str | None
    place: str
    place_url: str | None
    capacity: int | None
    creator_id: str
    creator_name: str
    created_at: datetime
    updated_at: datetime
    cancelled: bool
    counts: Counts
    rsvps: list[RsvpView]


def seats(happening: Happening, answers: list[Rsvp]) -> list[RsvpView]:
    """Everyone's status: the first `capacity` "going" answers by `seq` go, the rest wait."""
    going = sorted((r for r in answers if r.answer == "going"), key=lambda r: (r.seq, r.user_id))
    views: list[RsvpView] = []
    for index, rsvp in enumerate(going):
        if happening.capacity is None or index < happening.capacity:
            views.append(RsvpView(**_person(rsvp), status="going"))
        else:
            position = index - happening.capacity + 1
            views.append(RsvpView(**_person(rsvp), status="waitlisted", position=position))
    others = sorted((r for r in answers if r.answer != "going"), key=lambda r: (r.seq, r.user_id))
    views += [RsvpView(**_person(r), status=r.answer) for r in others]
    return views


def _person(rsvp: Rsvp) -> dict[str, Any]:
    return {"user_id": rsvp.user_id, "display_name": rsvp.display_name, "answer": rsvp.answer}


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


def _local(value: datetime | None, zone: str) -> str | None:
    return None if value is None else _utc(value).astimezone(ZoneInfo(zone)).isoformat()


async def answers_of(happening: Happening) -> list[Rsvp]:
    return await Rsvp.find(Rsvp.happening_id == str(happening.id)).to_list()


async def happening_views(happenings: list[Happening]) -> list[HappeningView]:
    """The views of many happenings (a room's list) with one read of all their answers,
    not one read per happening."""
    ids = [str(happening.id) for happening in happenings]
    by_happening: dict[str, list[Rsvp]] = {hid: [] for hid in ids}
    if ids:
        for rsvp in await Rsvp.find(In(Rsvp.happening_id, ids)).to_list():
            by_happening.setdefault(rsvp.happening_id, []).append(rsvp)
    return [
        await happening_view(happening, by_happening[str(happening.id)]) for happening in happenings
    ]


async def happening_view(happening: Happening, answers: list[Rsvp] | None = None) -> HappeningView:
    if answers is None:
        answers = await answers_of(happening)
    rsvps = seats(happening, answers)
    counts = Counts(
        going=sum(r.status == "going" for r in rsvps),
        waitlisted=sum(r.status == "waitlisted" for r in rsvps),
        maybe=sum(r.status == "maybe" for r in rsvps),
        not_going=sum(r.status == "not_going" for r in rsvps),
    )
    return HappeningView(
        id=str(happening.id),
        room=happening.room,
        title=happening.title,
        description=happening.description,
        start=_utc(happening.starts_at),
        end=_utc(happening.ends_at) if happening.ends_at else None,
        zone=happening.zone,
        start_local=_local(happening.starts_at, happening.zone) or "",
        end_local=_local(happening.ends_at, happening.zone),
        place=happening.place,
        place_url=happening.place_url,
        capacity=happening.capacity,
        creator_id=happening.creator_id,
        creator_name=happening.creator_name,
        created_at=_utc(happening.created_at),
        updated_at=_utc(happening.updated_at),
        cancelled=happening.cancelled,
        counts=counts,
        rsvps=rsvps,
    )


# --- reading and writing -----------------------------------------------------------------


async def room_happenings(room: Room) -> list[Happening]:
    """The room's happenings by start, oldest first (clients split upcoming and past)."""
    return (
        await Happening.find(Happening.room == room.slug)
        .sort([("starts_at", SortDirection.ASCENDING)])
        .to_list()
    )


async def coming_happenings(since: datetime) -> list[Happening]:
    """Every room's happenings starting from `since` on, not cancelled (reminder upkeep)."""
    found = await Happening.find(Happening.starts_at >= since).to_list()
    return [happening for happening in found if not happening.cancelled]


async def get_happening(raw_id: str) -> Happening:
    try:
        happening_id = PydanticObjectId(raw_id)
    except (InvalidId, TypeError) as error:
        raise NotFound("happening_not_found", "no such happening") from error
    happening = await Happening.get(happening_id)
    if happening is None:
        raise NotFound("happening_not_found", "no such happening")
    return happening


async def create_happening(
    room: Room,
    user_id: str,
    user_name: str,
    new: NewHappening,
    max_per_room: int,
    max_capacity: int,
) -> Happening:
    """Checked here (who may is the caller's): times, span, capacity, the room's limit.

    The limit is a count followed by an insert: callers hold the room's lock around this call
    (node/runtime/happenings.py `plan`), so two creations never both see the last place free;
    a count after the insert keeps the limit even without the lock."""
    start = to_instant("start", new.start, new.zone)
    end = to_instant("end", new.end, new.zone) if new.end is not None else None
    _check_span(start, end)
    if new.capacity is not None and new.capacity > max_capacity:
        raise Invalid("invalid_input", f"capacity: must be at most {max_capacity}")
    if await Happening.find(Happening.room == room.slug).count() >= max_per_room:
        raise Conflict("too_many_happenings", f"a room holds at most {max_per_room} happenings")
    happening = Happening(
        room=room.slug,
        title=new.title,
        description=new.description,
        starts_at=start,
        ends_at=end,
        zone=new.zone,
        place=new.place,
        place_url=new.place_url or None,
        capacity=new.capacity,
        creator_id=user_id,
        creator_name=user_name,
    )
    await happening.insert()
    # Belt and braces for a lock holder that stalled past its lease while another counted:
    # counted again after the insert, an overshoot takes its own happening back. Each kept
    # one saw at most the limit after its insert, so the limit holds even then (at worst two
    # racers both step back and a place stays free).
    if await Happening.find(Happening.room == room.slug).count() > max_per_room:
        await happening.delete()
        log.warning("happening.over_limit", extra={"room": room.slug})
        raise Conflict("too_many_happenings", f"a room holds at most {max_per_room} happenings")
    log.info("happening.created", extra={"room": room.slug, "happening": str(happening.id)})
    return happening


def may_change(happening: Happening, room: Room, user_id: str) -> bool:
    return user_id in (happening.creator_id, room.creator_id)


def check_may_change(happening: Happening, room: Room, user_id: str) -> None:
    if not may_change(happening, room, user_id):
        raise Forbidden(
            "forbidden", "only who planned the happening, or the room's creator, may change it"
        )


async def edit_happening(
    happening: Happening, patch: HappeningPatch, max_capacity: int
) -> Happening:
    """Apply `patch` (the caller checked who may); times are re-read in the (new) zone."""
    given = patch.model_fields_set
    if happening.cancelled:
        raise Conflict("happening_cancelled", "a cancelled happening cannot be changed")
    zone = patch.zone if patch.zone is not None else happening.zone
    if "start" in given and patch.start is not None:
        start = to_instant("start", patch.start, zone)
    elif "zone" in given:  # the same wall time, now meant in the new zone
        start = to_instant("start", _wall(happening.starts_at, happening.zone), zone)
    else:
        start = _utc(happening.starts_at)
    if "end" in given:
        end = to_instant("end", patch.end, zone) if patch.end is not None else None
    elif happening.ends_at is not None and "zone" in given:
        end = to_instant("end", _wall(happening.ends_at, happening.zone), zone)
    else:
        end = _utc(happening.ends_at) if happening.ends_at is not None else None
    if "start" in given and patch.start is None:
        raise Invalid("invalid_input", "start: must not be null")
    _check_span(start, end)
    if patch.capacity is not None and patch.capacity > max_capacity:
        raise Invalid("invalid_input", f"capacity: must be at most {max_capacity}")
    for name in ("title", "description", "place"):
        if name in given:
            value = getattr(patch, name)
            if value is None:
                raise Invalid("invalid_input", f"{name}: must not be null")
            setattr(happening, name, value)
    if "place_url" in given:
        happening.place_url = patch.place_url or None
    if "capacity" in given:
        happening.capacity = patch.capacity
    happening.zone = zone
    happening.starts_at = start
    happening.ends_at = end
    happening.updated_at = utcnow()
    await happening.save()
    return happening


def _wall(value: datetime, zone: str) -> str:
    return _utc(value).astimezone(ZoneInfo(zone)).replace(tzinfo=None).isoformat()


async def cancel_happening(happening: Happening) -> Happening:
    if not happening.cancelled:
        happening.cancelled = True
        happening.updated_at = utcnow()
        await happening.save()
    return happening


async def record_answer(
    happening: Happening, user_id: str, display_name: str, answer: Answer, seq: int
) -> bool:
    """Store one answer; call it under the happening's lock with that lock's fence as `seq`.
    Whether it changed anything (the same answer again is not written, nor told to the room).

    Answering "going" again keeps one's place: only a new "going" joins the queue's end."""
    if happening.cancelled:
        raise Conflict("happening_cancelled", "the happening was cancelled")
    key = Rsvp.key(str(happening.id), user_id)
    current = await Rsvp.get(key)
    if current is not None and current.answer == answer:
        return False
    rsvp = Rsvp(
        id=key,
        happening_id=str(happening.id),
        user_id=user_id,
        display_name=display_name,
        answer=answer,
        seq=seq,
    )
    await rsvp.save()
    return True


# --- reminders -----------------------------------------------------------------------------

ReminderKind = Literal["lead", "start"]


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def epoch_ms(value: datetime) -> int:
    """Whole milliseconds since the epoch, in integers (the store keeps milliseconds)."""
    return (_utc(value) - EPOCH) // timedelta(milliseconds=1)


def reminder_id(happening_id: str, kind: str, starts_at: datetime) -> str:
    """One reminder's name: the start it is for (ms) is part of it, so moving a happening
    makes new reminders rather than reusing the old ones."""
    return f"{happening_id}|{kind}|{epoch_ms(starts_at)}"


def reminder_message_id(reminder: str) -> PydanticObjectId:
    """The chat message id a reminder is written under: derived, so writing it twice (a
    node taking over a claim whose holder died after writing) hits the unique _id."""
    return PydanticObjectId(hashlib.sha256(reminder.encode()).digest()[:12])


def reminder_text(happening: Happening, kind: ReminderKind, lead_s: int) -> str:
    local = _utc(happening.starts_at).astimezone(ZoneInfo(happening.zone))
    when = local.strftime("%Y-%m-%d %H:%M") + f" ({happening.zone})"
    place = f" at {happening.place}" if happening.place else ""
    if kind == "start":
        return f"⏰ Starting now: {happening.title}{place}"
    minutes = max(1, round(lead_s / 60))
    ahead = f"{minutes // 60} h" if minutes % 60 == 0 else f"{minutes} min"
    return f"⏰ In {ahead}: {happening.title}, {when}{place}"

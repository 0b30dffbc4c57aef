"""Rooms (R1-R3): slugs that are safe to share, creation policy, QR invites."""

from __future__ import annotations

import io
import logging
import unicodedata
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, nullcontext, suppress
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import quote

import segno
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pymongo.errors import DuplicateKeyError
from redis.asyncio import Redis

from node.config import RoomSettings
from node.errors import Conflict, Forbidden, Invalid, NotFound
from node.state import keys
from node.state.sessions import Membership
from node.store.models import Room, RoomPerson, User
from node.store.text import EMOJI_FORMAT_CHARS, INVISIBLE_CHARS, check_raw, clean_text
from node.store.users import username_key

log = logging.getLogger(__name__)

SLUG_MIN_CHARS = 2
SLUG_MAX_CHARS = 48
SLUG_MAX_BYTES = 128
RESERVED_SLUGS = frozenset(
    """about admin api app assets auth docs healthz help login logout metrics new null openapi
    r random readyz redocs register room rooms root scalar settings sfumesh signup static
    system undefined user users www ws""".split()
)
# Skin-tone modifiers are "Sk" (modifier symbols); other Sk characters are accents on their own.
_SKIN_TONES = frozenset(chr(c) for c in range(0x1F3FB, 0x1F400))
# Scripts with letters that look like Latin ones: mixing them in one slug is how look-alike
# addresses are made ("pаypal" with a Cyrillic "а").
_LOOKALIKE_SCRIPTS = frozenset({"LATIN", "CYRILLIC", "GREEK", "ARMENIAN", "CHEROKEE", "COPTIC"})
# What undecodable bytes in a URL turn into: not a name anyone chose.
_REPLACEMENT_CHARS = frozenset({"\ufffd"})
_TEXT_OR_EMOJI_STYLE = frozenset({"\ufe0e", "\ufe0f"})


def _script(char: str) -> str:
    return unicodedata.name(char, "UNKNOWN").split(" ")[0]


def _is_emoji(char: str) -> bool:
    return unicodedata.category(char) == "So" or char in _SKIN_TONES


def _check_emoji_format(slug: str, index: int) -> None:
    """A joiner or variation selector is an emoji's part, or invisible: only after an emoji
    (and a joiner only between two), else "lobby\u200d" would pass for "lobby"."""
    char = slug[index]
    before = slug[index - 1] if index > 0 else ""
    after = slug[index + 1] if index + 1 < len(slug) else ""
    if char in _TEXT_OR_EMOJI_STYLE:
        ok = bool(before) and _is_emoji(before)
    else:
        ok = (
            bool(before and after)
            and (_is_emoji(before) or before in _TEXT_OR_EMOJI_STYLE)
            and _is_emoji(after)
        )
    if not ok:
        raise ValueError(f"U+{ord(char):04X} may only join or style emoji")


def normalize_slug(raw: str) -> str:
    """The canonical slug (NFC, casefolded), or ValueError saying what is wrong with it."""
    # Slugs come from URL paths too, where no token is needed: cheap checks before NFC.
    check_raw(raw, max_chars=SLUG_MAX_CHARS)
    slug = unicodedata.normalize("NFC", unicodedata.normalize("NFC", raw).casefold())
    if not SLUG_MIN_CHARS <= len(slug) <= SLUG_MAX_CHARS:
        raise ValueError(f"must be {SLUG_MIN_CHARS}-{SLUG_MAX_CHARS} characters")
    if len(slug.encode(errors="surrogatepass")) > SLUG_MAX_BYTES:
        raise ValueError(f"must be at most {SLUG_MAX_BYTES} bytes in UTF-8")
    scripts: set[str] = set()
    for index, char in enumerate(slug):
        category = unicodedata.category(char)
        if char in "-_":
            continue
        if (
            char in INVISIBLE_CHARS
            or char in _REPLACEMENT_CHARS
            or "VARIATION SELECTOR" in unicodedata.name(char, "")
        ) and char not in EMOJI_FORMAT_CHARS:
            raise ValueError(f"must not contain invisible characters (U+{ord(char):04X})")
        if char in EMOJI_FORMAT_CHARS:
            _check_emoji_format(slug, index)
            continue
        if category[0] in "LN" and unicodedata.normalize("NFKC", char) != char:
            raise ValueError(f"must not contain look-alike compatibility characters ({char!r})")
        if category[0] == "L" or category == "Nd":
            if category[0] == "L":
                scripts.add(_script(char))
            continue
        if category in ("Mn", "Mc", "So") or char in _SKIN_TONES:
            continue
        raise ValueError(
            f"may contain letters, digits, emoji, '-' and '_' only (not U+{ord(char):04X})"
        )
    if len(scripts & _LOOKALIKE_SCRIPTS) > 1:
        raise ValueError("must not mix Latin, Cyrillic or Greek letters that look alike")
    if slug[0] in "-_" or slug[-1] in "-_" or unicodedata.category(slug[0]).startswith("M"):
        raise ValueError("must start and end with a letter, digit or emoji")
    if slug in RESERVED_SLUGS:
        raise ValueError(f"{slug!r} is reserved")
    return slug


def _check_room_name(value: str) -> str:
    return clean_text(value, max_chars=80)


class NewRoom(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    slug: Annotated[str, Field(max_length=256), AfterValidator(normalize_slug)]
    name: Annotated[str, Field(max_length=256), AfterValidator(_check_room_name)] | None = None
    capacity: Annotated[int, Field(ge=1)] | None = None


class Occupancy(BaseModel):
    people: int
    sessions: int


class RoomView(BaseModel):
    slug: str
    url: str
    name: str
    capacity: int
    creator_id: str
    created_at: datetime
    occupancy: Occupancy
    #: photos uploaded now keep their original EXIF (location...); see `PATCH /api/rooms/{slug}`
    keep_original_exif: bool = False


def room_url(base_url: str, slug: str) -> str:
    return f"{base_url}/r/{quote(slug, safe='')}"


async def occupancy(redis: Redis, slug: str) -> Occupancy:
    raw = await redis.hgetall(keys.room_members(slug))
    members = [Membership.decode(value) for value in raw.values()]
    return Occupancy(people=len({m.user_id for m in members}), sessions=len(members))


async def room_view(room: Room, base_url: str, redis: Redis) -> RoomView:
    return RoomView(
        slug=room.slug,
        url=room_url(base_url, room.slug),
        name=room.name,
        capacity=room.capacity,
        creator_id=room.creator_id,
        created_at=room.created_at,
        occupancy=await occupancy(redis, room.slug),
        keep_original_exif=room.keep_original_exif,
    )


def may_create_rooms(user: User, settings: RoomSettings) -> bool:
    if settings.create_policy == "anyone":
        return True
    return user.username_key in {username_key(name) for name in settings.creators}


async def create_room(
    new: NewRoom,
    creator: User,
    settings: RoomSettings,
    guard: Callable[[], AbstractAsyncContextManager[Any]] | None = None,
) -> Room:
    """Checked first, then stored under `guard` (the room lock, S6), so refused input
    takes no lock; the unique index stays the final word should a lock ever be lost."""
    if not may_create_rooms(creator, settings):
        raise Forbidden("forbidden", "room creation is limited to allow-listed users")
    capacity = new.capacity if new.capacity is not None else settings.default_capacity
    if capacity > settings.max_capacity:
        raise Invalid("invalid_input", f"capacity: must be at most {settings.max_capacity}")
    room = Room(
        slug=new.slug, name=new.name or new.slug, capacity=capacity, creator_id=str(creator.id)
    )
    try:
        async with guard() if guard is not None else nullcontext():
            await room.insert()
    except DuplicateKeyError as error:
        raise Conflict("room_exists", f"the room {new.slug!r} already exists") from error
    log.info("room.created", extra={"room": room.slug, "user_id": room.creator_id})
    return room


async def get_room(raw_slug: str) -> Room:
    try:
        slug = normalize_slug(raw_slug)
    except ValueError as error:
        raise Invalid("invalid_slug", f"slug: {error}") from error
    room = await Room.find_one(Room.slug == slug)
    if room is None:
        raise NotFound("room_not_found", "no such room")
    return room


class RoomChange(BaseModel):
    """`PATCH /api/rooms/{slug}`: what the room's creator may change (only what is given)."""

    model_config = ConfigDict(extra="forbid")

    #: photos uploaded from now on keep their original bytes, EXIF and location included
    keep_original_exif: bool | None = Field(default=None, strict=True)


async def change_room(room: Room, change: RoomChange, by: User, exif_allowed: bool) -> Room:
    """The creator's change, written in one `$set` (or refused, and nothing written). Not
    retroactive: photos already kept stay as they were stored."""
    if room.creator_id != str(by.id):
        raise Forbidden("not_room_creator", "only the room's creator can change the room")
    fields = change.model_dump(exclude_none=True)
    if not fields:
        raise Invalid("nothing_to_change", "give at least one field to change")
    if fields.get("keep_original_exif") and not exif_allowed:
        raise Forbidden(
            "original_exif_not_allowed", "this node's operator does not let rooms keep EXIF"
        )
    await Room.find_one(Room.id == room.id).update({"$set": fields})
    for name, value in fields.items():
        setattr(room, name, value)
    log.info("rooms.changed", extra={"room": room.slug, "fields": sorted(fields)})
    return room


def qr_svg(url: str) -> bytes:
    out = io.BytesIO()
    segno.make_qr(url, error="m").save(out, kind="svg", scale=4, border=2, xmldecl=False)
    return out.getvalue()


async def remember_person(room: Room, user_id: str) -> None:
    """`user_id` is one of the room's people from now on (idempotent)."""
    with suppress(DuplicateKeyError):
        await RoomPerson(
            id=RoomPerson.key(room.slug, user_id), room=room.slug, user_id=user_id
        ).insert()


async def is_person(room: Room, user_id: str) -> bool:
    """Whether `user_id` is one of the room's people: its creator, or has joined it."""
    if room.creator_id == user_id:
        return True
    return await RoomPerson.get(RoomPerson.key(room.slug, user_id)) is not None


async def room_person(raw_slug: str, user_id: str) -> Room:
    """The room, when `user_id` is one of its people (history, posting and what a room keeps
    are theirs alone); 403 `not_joined` otherwise."""
    room = await get_room(raw_slug)
    if not await is_person(room, user_id):
        raise Forbidden("not_joined", "only the room's people may do this: join the room first")
    return room


async def _rooms_of(user_id: str) -> set[str]:
    joined = RoomPerson.find(RoomPerson.user_id == user_id)
    created = Room.find(Room.creator_id == user_id)
    return {person.room for person in await joined.to_list()} | {
        room.slug for room in await created.to_list()
    }


async def share_a_room(user_id: str, other_id: str) -> bool:
    """Whether both are among one room's people (its creator, or who has joined it once)."""
    if user_id == other_id:
        return True
    mine = await _rooms_of(user_id)
    return bool(mine) and not mine.isdisjoint(await _rooms_of(other_id))

"""Documents kept in MongoDB (through Beanie). Redis holds only live state, never these."""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime
from typing import Annotated, ClassVar

from beanie import Document, Indexed, PydanticObjectId
from pydantic import BaseModel, Field
from pymongo import ASCENDING, DESCENDING, IndexModel


def utcnow() -> datetime:
    return datetime.now(UTC)


USER_ID_RE = re.compile(r"^[0-9a-f]{32}$")


def new_user_id() -> str:
    """128 random bits in hex. Not an ObjectId: those carry their creation time and a
    counter, so one profile's id gave away its neighbours' and the order of sign-ups."""
    return secrets.token_hex(16)


def is_user_id(value: str) -> bool:
    return bool(USER_ID_RE.match(value))


class User(Document):
    # The id is generated here, not by the server, so it is known before the insert.
    id: str = Field(default_factory=new_user_id)  # type: ignore[assignment]
    username: str
    # Normalised forms carry the unique indexes: uniqueness is decided by the store.
    username_key: Annotated[str, Indexed(unique=True)]
    email: str
    email_key: Annotated[str, Indexed(unique=True)]
    password_hash: str
    display_name: str
    created_at: datetime = Field(default_factory=utcnow)
    # Raised by a password change: tokens carry the generation they were issued under, and
    # an older one is refused (node/web/auth.py). Kept here, with the password, so it is as
    # durable as the password it protects.
    token_generation: int = 0

    class Settings:
        name = "users"


class Room(Document):
    id: PydanticObjectId = Field(default_factory=PydanticObjectId)
    # The normalised slug (NFC, casefolded): unique, and the room's address.
    slug: Annotated[str, Indexed(unique=True)]
    name: str
    capacity: int
    creator_id: Annotated[str, Indexed()]
    created_at: datetime = Field(default_factory=utcnow)
    #: the creator's opt-in (issue 15): photos uploaded while this is on keep their original
    #: bytes, EXIF and location included, served to the room's people; off: stripped
    keep_original_exif: bool = False

    class Settings:
        name = "rooms"


class RoomPerson(Document):
    """A user who has joined the room at least once (R7, "the room's people"): they read its
    history and post to it. The id is (room, user), so recording twice changes nothing."""

    id: str  # type: ignore[assignment]  # "<room slug>\n<user id>": one record per pair
    room: str
    # Indexed: a profile is shown to the people who share a room with its owner.
    user_id: Annotated[str, Indexed()]
    first_joined_at: datetime = Field(default_factory=utcnow)

    class Settings:
        name = "room_people"

    @staticmethod
    def key(room: str, user_id: str) -> str:
        return f"{room}\n{user_id}"


class FileRef(BaseModel):
    """What a chat message says of the file it shares (node/store/files.py)."""

    id: str
    name: str
    kind: str  # "image" or "file"
    content_type: str
    size: int
    width: int | None = None
    height: int | None = None


class FileVariant(BaseModel):
    """One servable form of a stored file: a GridFS file and how it is served."""

    grid_id: PydanticObjectId
    content_type: str
    size: int
    etag: str


def gallery_key(sort_at: datetime, file_id: str) -> str:
    """Orders as (sort_at, id) does: microseconds since 1970, zero-padded, then the id."""
    micros = max(0, int(sort_at.timestamp() * 1_000_000))
    return f"{micros:020d}-{file_id}"


class StoredFile(Document):
    """A file or photo kept in a room (Memories, issue 15); its bytes are in GridFS."""

    # Random, not derived from the content: an id must tell nobody outside the room
    # whether some file is in it.
    id: str = Field(default_factory=new_user_id)  # type: ignore[assignment]
    room: Annotated[str, Indexed()]
    # "<room>\n<sha256>": identical bytes in one room are kept once (unique index).
    dedup_key: Annotated[str, Indexed(unique=True)]
    uploader_id: Annotated[str, Indexed()]
    uploader_name: str
    name: str
    kind: str
    content_type: str
    size: int
    sha256: str
    width: int | None = None
    height: int | None = None
    taken_at: datetime | None = None
    #: the gallery's order: when the photo was taken, else when it was uploaded
    sort_at: datetime
    #: `gallery_key(sort_at, id)`: the gallery pages by a range on this string (on
    #: nx-27017 a range on a date scans the collection, one on a string uses the index)
    gallery_key: str = ""
    created_at: datetime = Field(default_factory=utcnow)
    variants: dict[str, FileVariant]
    message_id: str | None = None

    class Settings:
        name = "files"
        indexes: ClassVar[list[IndexModel]] = [
            IndexModel([("room", ASCENDING), ("gallery_key", DESCENDING)])
        ]

    def ref(self) -> FileRef:
        return FileRef(
            id=self.id,
            name=self.name,
            kind=self.kind,
            content_type=self.content_type,
            size=self.size,
            width=self.width,
            height=self.height,
        )


class Message(Document):
    id: PydanticObjectId = Field(default_factory=PydanticObjectId)
    room: str
    author_id: str
    author_name: str
    text: str
    #: a message sharing a file (its text then empty)
    file: FileRef | None = None
    ts: datetime = Field(default_factory=utcnow)

    class Settings:
        name = "messages"
        # nx-27017 0.8.1 cannot insert into a collection whose compound index names _id,
        # so the (ts, _id) cursor is served by (room, ts) alone.
        indexes: ClassVar[list[IndexModel]] = [
            IndexModel([("room", ASCENDING), ("ts", DESCENDING)])
        ]


DOCUMENT_MODELS: list[type[Document]] = [User, Room, RoomPerson, Message, StoredFile]

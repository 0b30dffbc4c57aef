"""Documents kept in MongoDB (through Beanie). Redis holds only live state, never these."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, ClassVar

from beanie import Document, Indexed, PydanticObjectId
from pydantic import Field
from pymongo import ASCENDING, DESCENDING, IndexModel


def utcnow() -> datetime:
    return datetime.now(UTC)


class User(Document):
    # The id is generated here, not by the server, so it is known before the insert.
    id: PydanticObjectId = Field(default_factory=PydanticObjectId)
    username: str
    # Normalised forms carry the unique indexes: uniqueness is decided by the store.
    username_key: Annotated[str, Indexed(unique=True)]
    email: str
    email_key: Annotated[str, Indexed(unique=True)]
    password_hash: str
    display_name: str
    created_at: datetime = Field(default_factory=utcnow)

    class Settings:
        name = "users"


class Room(Document):
    id: PydanticObjectId = Field(default_factory=PydanticObjectId)
    # The normalised slug (NFC, casefolded): unique, and the room's address.
    slug: Annotated[str, Indexed(unique=True)]
    name: str
    capacity: int
    creator_id: str
    created_at: datetime = Field(default_factory=utcnow)

    class Settings:
        name = "rooms"


class Message(Document):
    id: PydanticObjectId = Field(default_factory=PydanticObjectId)
    room: str
    author_id: str
    author_name: str
    text: str
    ts: datetime = Field(default_factory=utcnow)

    class Settings:
        name = "messages"
        # nx-27017 0.8.1 cannot insert into a collection whose compound index names _id,
        # so the (ts, _id) cursor is served by (room, ts) alone.
        indexes: ClassVar[list[IndexModel]] = [
            IndexModel([("room", ASCENDING), ("ts", DESCENDING)])
        ]


DOCUMENT_MODELS: list[type[Document]] = [User, Room, Message]

"""Chat storage (R4): messages kept per room, read back newest first with a stable cursor."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from beanie import PydanticObjectId, SortDirection
from beanie.operators import And, Or
from bson.errors import InvalidId
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from node.errors import Invalid
from node.store.models import FileRef, Message, Room
from node.store.text import RAW_CHARS_PER_CHAR, check_size, clean_text

MAX_PAGE = 100


MAX_CHAT_CHARS = 4000
#: what a client may send at all (before NFC and stripping); more is malformed
MAX_RAW_CHAT_CHARS = RAW_CHARS_PER_CHAR * MAX_CHAT_CHARS


def check_chat_size(value: str) -> None:
    """The cheap first check of a chat text (length and bytes, no normalisation), or
    ValueError saying why it cannot be one."""
    check_size(value, max_chars=MAX_CHAT_CHARS)


def clean_chat_text(value: str) -> str:
    """A chat message's text as stored, or ValueError saying why it cannot be."""
    return clean_text(value, max_chars=MAX_CHAT_CHARS, allow_newlines=True)


class NewMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    text: Annotated[str, Field(max_length=MAX_RAW_CHAT_CHARS), AfterValidator(clean_chat_text)]


class HistoryQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    before: Annotated[str, Field(max_length=64)] | None = None
    limit: Annotated[int, Field(ge=1, le=MAX_PAGE)] = 50

    @model_validator(mode="before")
    @classmethod
    def _empty_means_default(cls, values: Any) -> Any:
        # Clients fill the contract's template `?before=&limit=` as is for the first page.
        if isinstance(values, dict):
            return {key: value for key, value in values.items() if value != ""}
        return values


class Author(BaseModel):
    id: str
    display_name: str


class MessageView(BaseModel):
    id: str
    room: str
    author: Author
    text: str
    ts: datetime
    #: set on a message sharing a file (Memories); its text is then empty
    file: FileRef | None = None


class HistoryPage(BaseModel):
    messages: list[MessageView]
    # Pass as `before` to get the next (older) page; null when there is none.
    next_before: str | None


def message_view(message: Message) -> MessageView:
    return MessageView(
        id=str(message.id),
        room=message.room,
        author=Author(id=message.author_id, display_name=message.author_name),
        text=message.text,
        ts=message.ts,
        file=message.file,
    )


async def append_message(
    room: Room, author_id: str, author_name: str, text: str, file: FileRef | None = None
) -> Message:
    message = Message(
        room=room.slug, author_id=author_id, author_name=author_name, text=text, file=file
    )
    await message.insert()
    return message


async def history(room: Room, before: str | None, limit: int) -> HistoryPage:
    """Newest first. The cursor is a message id; order is (ts, id), so ties cannot reorder."""
    query: list[Any] = [Message.room == room.slug]
    if before is not None:
        try:
            cursor_id = PydanticObjectId(before)
        except (InvalidId, TypeError) as error:
            raise Invalid("invalid_cursor", "before: not a message id") from error
        anchor = await Message.find_one(Message.id == cursor_id, Message.room == room.slug)
        if anchor is None:
            raise Invalid("invalid_cursor", "before: no such message in this room")
        query.append(
            Or(Message.ts < anchor.ts, And(Message.ts == anchor.ts, Message.id < anchor.id))
        )
    page = (
        await Message.find(*query)
        .sort([("ts", SortDirection.DESCENDING), ("_id", SortDirection.DESCENDING)])
        .limit(limit + 1)
        .to_list()
    )
    more = len(page) > limit
    page = page[:limit]
    return HistoryPage(
        messages=[message_view(m) for m in page],
        next_before=str(page[-1].id) if more and page else None,
    )

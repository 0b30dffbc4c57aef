"""Memories (issue 15, R7): files and photos kept in a room, in GridFS through the one store.

An upload streams to a private temporary file on disk (never whole in memory; named after
the node and its process, so a node restarted after being killed mid-upload removes its own
leftovers, `FileStore.sweep_leftovers`) while its
size is counted against `files.max_file_bytes` and its bytes are reserved against the room's
and the uploader's quotas (node/state/quota.py: atomic across nodes). Only a complete,
accepted upload reaches GridFS, so a cut or refused one leaves no chunk behind; should
writing to GridFS fail half way, what was written is deleted. Identical bytes in one room
are kept once (a unique `dedup_key` decides, even between racing nodes).

What a file *is* comes from its bytes: Pillow for photos (node/store/images.py), a few
magic numbers for the rest; the name and the client's content type decide nothing, except
that a name promising an image over bytes that are not one is refused as a lie. Markup
(HTML, SVG, XML) carrying script is refused; other markup and unknown bytes are kept and
served as attachments (node/web/files.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
import re
import secrets
import tempfile
import time
import unicodedata
from collections.abc import AsyncIterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from beanie import SortDirection
from bson import Binary, Int64, ObjectId
from gridfs import NoFile
from gridfs.asynchronous import AsyncGridFSBucket
from pydantic import BaseModel
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from node.config import FileSettings
from node.errors import Forbidden, Invalid, NotFound, TooLarge, Unsupported
from node.state.quota import FileQuota, NotSeeded, QuotaExceeded
from node.store.images import ImageRefused, is_image, render
from node.store.models import (
    FileRef,
    FileVariant,
    Message,
    Room,
    StoredFile,
    User,
    gallery_key,
    utcnow,
)

log = logging.getLogger(__name__)

#: bytes gathered before one quota reservation and one disk write (GridFS's chunk size)
BATCH_BYTES = 255 * 1024
BUCKET = "files"
GRID_CHUNK_BYTES = 255 * 1024
#: GridFS chunks sent in one insert: the node holds about this many at once
CHUNKS_PER_INSERT = 4
MAX_NAME_CHARS = 200
DEFAULT_NAME = "file"
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".png", ".gif", ".webp", ".heic", ".heif")
_SNIFF_BYTES = 4096
_ACTIVE_MARKUP = re.compile(
    rb"<script|javascript:|<foreignobject|<iframe|<object|<embed|\son\w+\s*="
)
_MARKUP_START = re.compile(rb"^\s*<(?:!doctype|html|svg|\?xml|head|body|script|[a-z][\w:-]*[\s>])")
#: content types served inline; anything else is an attachment in a sandbox
INLINE_TYPES = frozenset(
    {
        "image/jpeg",
        "image/png",
        "image/webp",
        "image/gif",
        "video/mp4",
        "video/webm",
        "video/quicktime",
        "audio/mpeg",
        "audio/ogg",
        "audio/wav",
        "audio/flac",
    }
)


def clean_name(raw: str | None) -> str:
    """The name kept for display, or Invalid: no path separators, no control, format or
    bidi characters (an RTL override makes "gpj.exe" read as "exe.jpg")."""
    if raw is None or raw == "":
        return DEFAULT_NAME
    if len(raw) > MAX_NAME_CHARS * 4:
        raise Invalid("invalid_name", f"name: at most {MAX_NAME_CHARS} characters")
    name = unicodedata.normalize("NFC", raw).strip()
    if len(name) > MAX_NAME_CHARS:
        raise Invalid("invalid_name", f"name: at most {MAX_NAME_CHARS} characters")
    for char in name:
        category = unicodedata.category(char)
        if char in "/\\" or category in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            raise Invalid(
                "invalid_name",
                f"name: must not contain path separators or control, format or bidi "
                f"characters (U+{ord(char):04X})",
            )
    if name.strip(".") == "":
        raise Invalid("invalid_name", "name: must not be only dots")
    return name


def sniff(head: bytes) -> str:
    """The content type of bytes that are not a photo, from their first bytes."""
    if head.startswith(b"%PDF-"):
        return "application/pdf"
    if head.startswith(b"PK\x03\x04"):
        return "application/zip"
    if head.startswith(b"\x1aE\xdf\xa3"):
        return "video/webm"
    if head.startswith(b"OggS"):
        return "audio/ogg"
    if head.startswith(b"fLaC"):
        return "audio/flac"
    if head.startswith(b"ID3") or head[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"):
        return "audio/mpeg"
    if head.startswith(b"RIFF") and head[8:12] == b"WAVE":
        return "audio/wav"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"heic", b"heix", b"mif1", b"msf1", b"heim", b"heis"):
            return "image/heic"
        return "video/quicktime" if brand == b"qt  " else "video/mp4"
    return "application/octet-stream"


def _check_markup(head: bytes, name: str) -> None:
    lowered = head.lstrip(b"\xef\xbb\xbf").lower()
    if _MARKUP_START.match(lowered) or b"<svg" in lowered or b"<html" in lowered:
        if _ACTIVE_MARKUP.search(lowered):
            raise Unsupported("active_content", "markup with script is not kept")


@dataclass(frozen=True)
class Uploader:
    user_id: str
    display_name: str


class FileView(BaseModel):
    id: str
    room: str
    name: str
    kind: str
    content_type: str
    size: int
    width: int | None
    height: int | None
    taken_at: str | None
    uploaded_at: str
    uploader_id: str
    uploader_name: str
    message_id: str | None
    variants: list[str]


def file_view(stored: StoredFile) -> FileView:
    return FileView(
        id=stored.id,
        room=stored.room,
        name=stored.name,
        kind=stored.kind,
        content_type=stored.content_type,
        size=stored.size,
        width=stored.width,
        height=stored.height,
        taken_at=stored.taken_at.isoformat() if stored.taken_at else None,
        uploaded_at=stored.created_at.isoformat(),
        uploader_id=stored.uploader_id,
        uploader_name=stored.uploader_name,
        message_id=stored.message_id,
        variants=sorted(stored.variants),
    )


class FilePage(BaseModel):
    files: list[FileView]
    #: pass as `before` for the next (older) page; null when there is none
    next_before: str | None


class FileStore:
    """Files of every room on one node: GridFS, quotas, the upload directory, the image pool."""

    def __init__(
        self,
        database: AsyncDatabase[dict[str, Any]],
        quota: FileQuota,
        settings: FileSettings,
        data_dir: Path,
        node_name: str = "node-1",
    ) -> None:
        self.bucket = AsyncGridFSBucket(
            database, bucket_name=BUCKET, chunk_size_bytes=GRID_CHUNK_BYTES
        )
        self.chunks = database[f"{BUCKET}.chunks"]
        self.grid_files = database[f"{BUCKET}.files"]
        self.quota = quota
        self.settings = settings
        self.upload_dir = data_dir / "uploads"
        # Several nodes may share one data_dir: each names its temporary files after itself
        # (and its process), so on start it removes only its own leftovers.
        # The random part: a restarted node given its killed predecessor's pid still tells
        # that one's leftovers from its own.
        self.temp_prefix = f"{upload_prefix(node_name)}{os.getpid()}.{secrets.token_hex(4)}-"
        self._own_prefix = upload_prefix(node_name)
        self._images = asyncio.Semaphore(settings.image_workers)

    async def prepare(self) -> int:
        """The chunks' index (GridFS's own): reads by file and number, each chunk once; and
        this node's temporary files left by an earlier run (killed mid-upload) removed.
        Returns how many were removed."""
        await self.chunks.create_index([("files_id", 1), ("n", 1)], unique=True)
        return await asyncio.to_thread(self.sweep_leftovers)

    def sweep_leftovers(self) -> int:
        """Remove this node's temporary upload files untouched for `files.stale_upload_s`:
        an upload writes to its file as bytes arrive, so a live one is never that old. Other
        nodes' files (a shared data_dir) and this process's own are left alone."""
        cutoff = time.time() - self.settings.stale_upload_s
        removed = 0
        try:
            entries = list(os.scandir(self.upload_dir))
        except FileNotFoundError:
            return 0
        for entry in entries:
            name = entry.name
            if not name.startswith(self._own_prefix) or name.startswith(self.temp_prefix):
                continue
            with suppress(OSError):
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
        if removed:
            log.info("files.leftovers_removed", extra={"files": removed})
        return removed

    def _temp(self) -> tuple[IO[bytes], Path]:
        self.upload_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile(
            dir=self.upload_dir, prefix=self.temp_prefix, delete=False
        )
        return handle, Path(handle.name)

    async def _seed(self, room: str, user_id: str) -> None:
        room_bytes = sum(f.size for f in await StoredFile.find(StoredFile.room == room).to_list())
        user_bytes = sum(
            f.size for f in await StoredFile.find(StoredFile.uploader_id == user_id).to_list()
        )
        await self.quota.seed(room, user_id, room_bytes, user_bytes)

    async def _reserve(self, room: str, user_id: str, n: int) -> None:
        try:
            try:
                await self.quota.reserve(room, user_id, n)
            except NotSeeded:
                await self._seed(room, user_id)
                await self.quota.reserve(room, user_id, n)
        except QuotaExceeded as error:
            raise TooLarge(
                f"{error.which}_quota_exceeded",
                f"this upload would pass the {error.which}'s storage quota",
            ) from error

    async def receive(
        self, room: Room, uploader: Uploader, raw_name: str | None, body: AsyncIterator[bytes]
    ) -> tuple[StoredFile, bool]:
        """Keep the upload `body` in `room`: the stored file and whether it is new (False:
        the same bytes were already there, and nothing more is kept)."""
        name = clean_name(raw_name)
        limit = self.settings.max_file_bytes
        reserved = 0
        size = 0
        digest = hashlib.sha256()
        handle, path = self._temp()
        written: list[ObjectId] = []
        keep = False
        try:
            batch = bytearray()
            with handle:
                async for chunk in body:
                    size += len(chunk)
                    if size > limit:
                        raise TooLarge("file_too_large", f"a file may be at most {limit} bytes")
                    batch += chunk
                    if len(batch) >= BATCH_BYTES:
                        await self._reserve(room.slug, uploader.user_id, len(batch))
                        reserved += len(batch)
                        digest.update(batch)
                        handle.write(batch)
                        batch.clear()
                if batch:
                    await self._reserve(room.slug, uploader.user_id, len(batch))
                    reserved += len(batch)
                    digest.update(batch)
                    handle.write(batch)
            if size == 0:
                raise Invalid("empty_file", "the upload is empty")
            sha = digest.hexdigest()
            dedup_key = f"{room.slug}\n{sha}"
            existing = await StoredFile.find_one(StoredFile.dedup_key == dedup_key)
            if existing is not None:
                return existing, False
            stored = await self._keep(room, uploader, name, path, size, sha, written)
            try:
                await stored.insert()
            except DuplicateKeyError:
                # The same bytes arrived through another node a moment ago: theirs stay.
                existing = await StoredFile.find_one(StoredFile.dedup_key == dedup_key)
                if existing is None:
                    raise
                return existing, False
            keep = True
            # The room's storage after this upload: a log line per room, where a metric label
            # per room would not do (`sfumesh cluster files` lists them all).
            room_bytes, _ = await self.quota.used(room.slug, uploader.user_id)
            log.info(
                "files.stored",
                extra={
                    "room": room.slug,
                    "file": stored.id,
                    "bytes": size,
                    "kind": stored.kind,
                    "room_bytes": room_bytes,
                },
            )
            return stored, True
        finally:
            with suppress(OSError):
                path.unlink()
            if not keep:
                # Refused, cut, failed or a duplicate: neither bytes nor quota stay taken.
                await asyncio.shield(self._undo(room.slug, uploader.user_id, reserved, written))

    async def _undo(self, room: str, user_id: str, reserved: int, written: list[ObjectId]) -> None:
        for grid_id in written:
            with suppress(NoFile):
                await self.bucket.delete(grid_id)
        await self.quota.release(room, user_id, reserved)

    async def _put(
        self, source: bytes | IO[bytes], content_type: str, etag: str, written: list[ObjectId]
    ) -> FileVariant:
        """One GridFS file, written a few chunks at a time. Not pymongo's GridIn: it gathers
        up to 32 MB of chunks before each insert, and a 200 MB upload then held that, and
        its encoded copy, in the node's memory. The file document comes last, so a reader
        never sees a file that is still being written; `_undo` deletes chunks without one."""
        grid_id = ObjectId()
        written.append(grid_id)
        read = io.BytesIO(source).read if isinstance(source, bytes) else source.read
        length = 0
        number = 0
        while True:
            batch = []
            for _ in range(CHUNKS_PER_INSERT):
                data = read(GRID_CHUNK_BYTES)
                if not data:
                    break
                batch.append({"files_id": grid_id, "n": number, "data": Binary(data)})
                number += 1
                length += len(data)
            if batch:
                await self.chunks.insert_many(batch)
            if len(batch) < CHUNKS_PER_INSERT:
                break
        await self.grid_files.insert_one(
            {
                "_id": grid_id,
                "length": Int64(length),
                "chunkSize": GRID_CHUNK_BYTES,
                "uploadDate": utcnow(),
                "filename": etag,
                "metadata": {"content_type": content_type},
            }
        )
        return FileVariant(grid_id=grid_id, content_type=content_type, size=length, etag=etag)

    async def _keep(
        self,
        room: Room,
        uploader: Uploader,
        name: str,
        path: Path,
        size: int,
        sha: str,
        written: list[ObjectId],
    ) -> StoredFile:
        settings = self.settings
        # The room's creator opted in, and the operator lets rooms do so: the uploaded bytes
        # are the original (display and thumb are re-encoded, stripped, either way).
        keep_exif = room.keep_original_exif and settings.keep_original_exif_allowed
        head = await asyncio.to_thread(_read_head, path)
        async with self._images:
            try:
                image = await asyncio.to_thread(is_image, path, settings.max_image_pixels)
                rendered = (
                    await asyncio.to_thread(
                        render,
                        path,
                        settings.max_image_pixels,
                        settings.thumb_px,
                        settings.display_px,
                    )
                    if image
                    else None
                )
            except ImageRefused as error:
                raise Invalid(error.code, error.message) from error
        variants: dict[str, FileVariant] = {}
        fields: dict[str, Any] = {}
        if rendered is not None:
            for variant, (data, content_type) in rendered.variants.items():
                if variant == "original" and keep_exif:
                    continue
                etag = hashlib.sha256(data).hexdigest()[:32]
                variants[variant] = await self._put(data, content_type, etag, written)
            if keep_exif:
                with path.open("rb") as source:
                    variants["original"] = await self._put(
                        source, rendered.content_type, sha[:32], written
                    )
            kind, content_type = "image", rendered.content_type
            fields = {
                "width": rendered.width,
                "height": rendered.height,
                "taken_at": rendered.taken_at,
            }
        else:
            if name.lower().endswith(_IMAGE_SUFFIXES) and not head[4:8] == b"ftyp":
                raise Invalid("not_an_image", "the name says image, the bytes are not one")
            _check_markup(head, name)
            content_type = sniff(head)
            kind = "file"
            with path.open("rb") as source:
                variants["original"] = await self._put(source, content_type, sha[:32], written)
        now = utcnow()
        stored = StoredFile(
            room=room.slug,
            dedup_key=f"{room.slug}\n{sha}",
            uploader_id=uploader.user_id,
            uploader_name=uploader.display_name,
            name=name,
            kind=kind,
            content_type=content_type,
            size=size,
            sha256=sha,
            sort_at=fields.get("taken_at") or now,
            created_at=now,
            variants=variants,
            **fields,
        )
        stored.gallery_key = gallery_key(stored.sort_at, stored.id)
        return stored

    async def get(self, file_id: str) -> StoredFile:
        stored = await StoredFile.get(file_id) if len(file_id) <= 64 else None
        if stored is None:
            raise NotFound("file_not_found", "no such file")
        return stored

    async def open(self, variant: FileVariant) -> Any:
        return await self.bucket.open_download_stream(variant.grid_id)

    async def delete(self, stored: StoredFile, room: Room, by: User) -> None:
        """Gone from storage, the gallery and the chat history; the quota given back."""
        if str(by.id) not in (stored.uploader_id, room.creator_id):
            raise Forbidden("forbidden", "only the uploader or the room's creator may delete it")
        await stored.delete()
        for variant in stored.variants.values():
            with suppress(NoFile):
                await self.bucket.delete(variant.grid_id)
        if stored.message_id is not None:
            with suppress(Exception):
                message = await Message.get(ObjectId(stored.message_id))
                if message is not None:
                    await message.delete()
        await self.quota.release(stored.room, stored.uploader_id, stored.size)
        log.info("files.deleted", extra={"room": stored.room, "file": stored.id})

    async def page(self, room: Room, before: str | None, limit: int, kind: str | None) -> FilePage:
        """Newest taken first; the cursor is a file id; order is (sort_at, id), kept in
        `gallery_key`."""
        # One plain filter document: Beanie joins several expressions with `$and`, which
        # nx-27017 answers by scanning the collection instead of using the index.
        query: dict[str, Any] = {"room": room.slug}
        if kind is not None:
            query["kind"] = kind
        if before is not None:
            anchor = await StoredFile.get(before) if len(before) <= 64 else None
            if anchor is None or anchor.room != room.slug:
                raise Invalid("invalid_cursor", "before: no such file in this room")
            query["gallery_key"] = {"$lt": anchor.gallery_key}
        found = (
            await StoredFile.find(query)
            .sort([("gallery_key", SortDirection.DESCENDING)])
            .limit(limit + 1)
            .to_list()
        )
        more = len(found) > limit
        found = found[:limit]
        return FilePage(
            files=[file_view(f) for f in found],
            next_before=found[-1].id if more and found else None,
        )


def upload_prefix(node_name: str) -> str:
    """The start of a node's temporary upload file names: its name, made safe for a file
    name (and unambiguous: anything but letters, digits, `.`, `_` is escaped)."""
    safe = "".join(
        c if (c.isascii() and c.isalnum()) or c in "._" else f"-{ord(c):x}-" for c in node_name
    )
    return f"up~{safe}~"


def _read_head(path: Path) -> bytes:
    with path.open("rb") as source:
        return source.read(_SNIFF_BYTES)


def file_ref(stored: StoredFile) -> FileRef:
    return stored.ref()

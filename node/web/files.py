"""Memories over HTTP (issue 15): upload, list, serve and delete a room's files.

Upload: `POST /api/rooms/{slug}/files?name=NAME` with the file's bytes as the raw body (any
Content-Type; it decides nothing) and a session token of one of the room's people. The
token is checked before a byte of the body is read (`authenticated`); the body streams to
node/store/files.py, which counts it against `files.max_file_bytes` (413 `file_too_large`)
and the quotas (413 `room_quota_exceeded` / `user_quota_exceeded`). Only this route's body
may pass the node's `max_body_bytes`, and only up to `files.max_file_bytes`.

Serving: `GET /api/files/{id}` (the original: EXIF stripped, unless the photo was uploaded
while its room's creator opted in to keeping it), `/display` and `/thumb`, to
the room's people only. A page's `<img src>` cannot send an Authorization header, so these
also take `?t=` a *file token*: signed (node/web/tokens.py, purpose `file`), bound to one
room and its holder, short-lived (`tokens.file_ttl_s`), bought with a session token at
`POST /api/rooms/{slug}/files/token`, revoked with the login like every other token. A file
of another room, or a holder who is no longer one of the room's people, gets 404, exactly as
an id nobody has: ids are never confirmed to outsiders.

Everything not known to be a passive image, audio or video type is served as an attachment
with `Content-Security-Policy: sandbox` and `nosniff`: an HTML or SVG page uploaded to a
room can never run as the node's origin.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import quote, unquote

from prometheus_client import Counter, Gauge
from pydantic import BaseModel, ConfigDict, Field, model_validator
from quart import Blueprint, Quart, Response, current_app, request
from quart.wrappers.request import Body
from quart_schema import validate_querystring, validate_response
from redis.exceptions import RedisError
from werkzeug.exceptions import RequestEntityTooLarge

from node.errors import DomainError, Invalid, NotFound, TooLarge
from node.runtime.chat import Poster, post_file, unshare_file
from node.state.quota import FileQuota, bytes_by_room
from node.store.files import INLINE_TYPES, FilePage, FileStore, FileView, Uploader, file_view
from node.store.models import StoredFile
from node.store.rooms import get_room, is_person, room_person
from node.web.auth import (
    AUTH_ATTRIBUTE,
    Auth,
    authenticated,
    authenticated_user,
    token_user,
)
from node.web.context import node_context
from node.web.errors import APIError
from node.web.tokens import Purpose, TokenError

log = logging.getLogger(__name__)

files_blueprint = Blueprint("files", __name__, url_prefix="/api")

FILES_EXTENSION = "sfumesh-files"
METRICS_EXTENSION = "sfumesh-files-metrics"


@dataclass(frozen=True)
class FileMetrics:
    uploads: Counter
    upload_bytes: Counter
    refusals: Counter
    stored_bytes: Gauge
    rooms_with_files: Gauge


#: storage figures are read from Redis at most this often (a scrape in between sees the last)
STORAGE_REFRESH_S = 15.0


def storage_refresher(redis: Any, metrics: FileMetrics) -> Callable[[], Awaitable[None]]:
    """Storage over the cluster (issue 15, item 7), summed: one label per room would grow
    the series without end (as `metrics.per_session` is off by default for media); storage
    per room is the operator's `sfumesh cluster files`."""
    last = [-STORAGE_REFRESH_S]

    async def refresh() -> None:
        now = time.monotonic()
        if now - last[0] < STORAGE_REFRESH_S:
            return
        last[0] = now
        try:
            rooms = await bytes_by_room(redis)
        except (RedisError, OSError) as error:
            log.warning("files.storage_unread", extra={"error": str(error)})
            return
        metrics.stored_bytes.set(sum(rooms.values()))
        metrics.rooms_with_files.set(len(rooms))

    return refresh


_UPLOAD_PATH_PARTS = ("api", "rooms", "files")
_READ_BYTES = 255 * 1024
VARIANTS = ("original", "display", "thumb")


def file_store() -> FileStore:
    store: FileStore = current_app.extensions[FILES_EXTENSION]
    return store


def _is_upload(method: str, path: str) -> bool:
    parts = path.strip("/").split("/")
    return (
        method == "POST"
        and len(parts) == 4
        and (parts[0], parts[1], parts[3]) == _UPLOAD_PATH_PARTS
    )


#: an upload's bytes received but not yet taken by its handler, at most (about)
BODY_HIGH_WATER = 1024 * 1024
_GATE = "sfumesh.upload_gate"


class _Gate:
    """Open while the upload's body buffer is below its high-water mark."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.open.set()


class FlowBody(Body):
    """Quart's request body, with backpressure: Quart appends whatever the client sends as
    fast as it comes, so a client faster than the handler (GridFS, disk) would fill the
    node's memory with the file. Past the high-water mark the gate closes and the ASGI
    receive (wrapped in `install_files`) waits until the handler has taken the buffer."""

    gate: _Gate | None = None

    def append(self, data: bytes) -> None:
        super().append(data)
        if self.gate is not None and len(self._data) >= BODY_HIGH_WATER:
            self.gate.open.clear()

    async def __anext__(self) -> bytes:
        try:
            return await super().__anext__()
        finally:
            if self.gate is not None:
                self.gate.open.set()


def install_files(app: Quart) -> None:
    """The routes, the larger body limit of the upload route alone, and the file store."""
    base = app.request_class
    settings_ref: dict[str, int] = {}

    class UploadRequest(base):  # type: ignore[misc, valid-type]
        """The upload route's body may be as large as a file; every other route keeps
        `max_body_bytes` (the limit is fixed when the request is made, before routing)."""

        def __init__(self, method: str, scheme: str, path: str, *args: Any, **kwargs: Any):
            upload = _is_upload(method, path) and "max" in settings_ref
            if upload:
                kwargs["max_content_length"] = settings_ref["max"]
                self.body_class = FlowBody
            super().__init__(method, scheme, path, *args, **kwargs)
            if upload and isinstance(self.body, FlowBody):
                self.body.gate = self.scope.get(_GATE)

    app.request_class = UploadRequest
    inner = app.asgi_app

    async def gated(scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or not _is_upload(scope["method"], scope["path"]):
            await inner(scope, receive, send)
            return
        gate = _Gate()

        async def gated_receive() -> Any:
            await gate.open.wait()
            return await receive()

        await inner({**scope, _GATE: gate}, gated_receive, send)  # type: ignore[arg-type]

    app.asgi_app = gated  # type: ignore[method-assign]
    app.register_blueprint(files_blueprint)

    @app.before_serving
    async def _open_files() -> None:
        context = app.extensions["sfumesh"]
        settings = context.settings
        settings_ref["max"] = settings.files.max_file_bytes
        quota = FileQuota(
            context.redis, settings.files.room_quota_bytes, settings.files.user_quota_bytes
        )
        store = FileStore(
            context.store[settings.database],
            quota,
            settings.files,
            settings.data_dir,
            settings.node_name,
        )
        await store.prepare()
        app.extensions[FILES_EXTENSION] = store
        registry = context.metrics.registry
        metrics = FileMetrics(
            uploads=Counter(
                "sfumesh_file_uploads_total", "Files kept, by kind", ["kind"], registry=registry
            ),
            upload_bytes=Counter(
                "sfumesh_file_upload_bytes_total", "Bytes of files kept", registry=registry
            ),
            refusals=Counter(
                "sfumesh_file_refusals_total",
                "Uploads refused, by reason (the error code)",
                ["reason"],
                registry=registry,
            ),
            stored_bytes=Gauge(
                "sfumesh_file_stored_bytes",
                "Bytes of files kept (or being uploaded) in every room, from the quota counters",
                registry=registry,
            ),
            rooms_with_files=Gauge(
                "sfumesh_file_rooms_with_files",
                "Rooms keeping at least one byte of files",
                registry=registry,
            ),
        )
        app.extensions[METRICS_EXTENSION] = metrics
        context.metrics.refreshers.append(storage_refresher(context.redis, metrics))


class UploadResult(FileView):
    #: false: the same bytes were already kept in this room (this is that file)
    created: bool


async def _body(limit: int) -> AsyncIterator[bytes]:
    try:
        async for chunk in request.body:
            yield chunk
    except RequestEntityTooLarge as error:
        # Quart's own count (a Content-Length over the limit is refused before any byte).
        raise TooLarge("file_too_large", f"a file may be at most {limit} bytes") from error


@files_blueprint.post("/rooms/<slug>/files")
@authenticated(Purpose.SESSION)
async def upload_file(slug: str, auth: Auth) -> tuple[dict[str, Any], int]:
    claims, user = auth.claims, auth.user
    room = await room_person(slug, str(user.id))
    name = request.args.get("name")
    if name is None and "X-File-Name" in request.headers:
        try:
            name = unquote(request.headers["X-File-Name"], errors="strict")
        except UnicodeDecodeError as error:
            raise Invalid("invalid_name", "X-File-Name: not percent-encoded UTF-8") from error
    store = file_store()
    metrics: FileMetrics = current_app.extensions[METRICS_EXTENSION]
    try:
        stored, created = await store.receive(
            room,
            Uploader(str(user.id), user.display_name),
            name,
            _body(store.settings.max_file_bytes),
        )
    except DomainError as error:
        metrics.refusals.labels(error.code).inc()
        log.info(
            "files.refused", extra={"room": room.slug, "user_id": str(user.id), "code": error.code}
        )
        raise
    if created:
        metrics.uploads.labels(stored.kind).inc()
        metrics.upload_bytes.inc(stored.size)
    if created:
        assert claims.session_id is not None
        poster = Poster(claims.session_id, str(user.id), user.display_name, in_room_now=False)
        message, _ = await post_file(node_context().live, room, poster, stored.ref())
        stored.message_id = str(message.id)
        await stored.save()
    result = UploadResult(created=created, **file_view(stored).model_dump())
    return result.model_dump(mode="json"), 201 if created else 200


class FileQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    before: Annotated[str, Field(max_length=64)] | None = None
    limit: Annotated[int, Field(ge=1, le=1000)] = 50
    kind: Annotated[str, Field(pattern="^(image|file)$")] | None = None

    @model_validator(mode="before")
    @classmethod
    def _empty_means_default(cls, values: Any) -> Any:
        if isinstance(values, dict):
            return {key: value for key, value in values.items() if value != ""}
        return values


@files_blueprint.get("/rooms/<slug>/files")
@authenticated(Purpose.SESSION)
@validate_querystring(FileQuery)
@validate_response(FilePage)
async def list_files(slug: str, query_args: FileQuery, auth: Auth) -> FilePage:
    room = await room_person(slug, str(auth.user.id))
    store = file_store()
    limit = min(query_args.limit, store.settings.max_page)
    return await store.page(room, query_args.before, limit, query_args.kind)


class FileToken(BaseModel):
    file_token: str
    expires_at: datetime


@files_blueprint.post("/rooms/<slug>/files/token")
@authenticated(Purpose.SESSION)
@validate_response(FileToken, 201)
async def file_token(slug: str, auth: Auth) -> tuple[FileToken, int]:
    claims, user = auth.claims, auth.user
    room = await room_person(slug, str(user.id))
    issued = node_context().tokens.issue(
        Purpose.FILE,
        str(user.id),
        session_id=claims.session_id,
        room=room.slug,
        family=claims.family,
        generation=user.token_generation,
        authenticated_at=claims.authenticated_at,
    )
    return FileToken(file_token=issued.token, expires_at=issued.expires_at), 201


def _no_such_file() -> NotFound:
    return NotFound("file_not_found", "no such file")


async def _readable(file_id: str) -> StoredFile:
    """The file, if the request's holder may read it (session token or `?t=` file token)."""
    if "Authorization" in request.headers:
        _, user = await authenticated_user(Purpose.SESSION)
        bound_room = None
    else:
        token = request.args.get("t", "")
        if not token:
            raise APIError(
                401,
                "unauthorized",
                "a session token (Authorization: Bearer) or a file token (?t=) is required",
                headers={"WWW-Authenticate": "Bearer"},
            )
        try:
            claims = node_context().tokens.verify(token, Purpose.FILE)
            user = await token_user(claims)
        except TokenError as error:
            raise APIError(
                401, "unauthorized", str(error), headers={"WWW-Authenticate": "Bearer"}
            ) from error
        bound_room = claims.room
    stored = await file_store().get(file_id)
    if bound_room is not None and stored.room != bound_room:
        raise _no_such_file()
    room = await get_room(stored.room)
    if not await is_person(room, str(user.id)):
        raise _no_such_file()
    return stored


def _disposition(kind: str, name: str) -> str:
    ascii_name = "".join(
        c if c.isascii() and c.isprintable() and c not in '"\\;' else "_" for c in name
    )
    return f"{kind}; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name, safe='')}"


async def _serve(file_id: str, variant_name: str, named: bool = False) -> Response:
    stored = await _readable(file_id)
    if named and variant_name not in ("display", "thumb"):
        raise NotFound("not_found", "no such route")
    variant = stored.variants.get(variant_name)
    if variant is None:
        raise NotFound("no_variant", f"this file has no {variant_name} form")
    etag = variant.etag
    inline = variant.content_type in INLINE_TYPES and request.args.get("download") is None
    headers = {
        "ETag": f'"{etag}"',
        "Cache-Control": "private, max-age=3600",
        "Accept-Ranges": "bytes",
        "X-Content-Type-Options": "nosniff",
        "Content-Disposition": _disposition("inline" if inline else "attachment", stored.name),
        # Never a document of the node's origin, whatever the bytes are.
        "Content-Security-Policy": "sandbox; default-src 'none'; frame-ancestors 'none'",
    }
    if request.if_none_match.contains(etag):
        return Response(b"", 304, headers)
    size = variant.size
    start, stop, status = 0, size, 200
    byte_range = request.range
    if byte_range is not None:
        span = byte_range.range_for_length(size) if len(byte_range.ranges) == 1 else None
        if span is None or byte_range.units != "bytes":
            headers["Content-Range"] = f"bytes */{size}"
            raise APIError(416, "range_not_satisfiable", "no such byte range", headers=headers)
        start, stop = span
        status = 206
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    grid_out = await file_store().open(variant)
    if start:
        await grid_out.seek(start)

    async def chunks() -> AsyncIterator[bytes]:
        left = stop - start
        try:
            while left > 0:
                data = await grid_out.read(min(_READ_BYTES, left))
                if not data:
                    break
                left -= len(data)
                yield data
        finally:
            await grid_out.close()

    headers["Content-Length"] = str(stop - start)
    response = Response(chunks(), status, headers, content_type=variant.content_type)
    return response


@files_blueprint.get("/files/<file_id>")
async def get_file(file_id: str) -> Response:
    return await _serve(file_id, "original")


@files_blueprint.get("/files/<file_id>/<variant>")
async def get_file_variant(file_id: str, variant: str) -> Response:
    return await _serve(file_id, variant, named=True)


# Checked first thing in `_readable` (a session token, or a file token in the query), so
# marked as behind a token like the routes `authenticated` wraps.
for _view in (get_file, get_file_variant):
    setattr(_view, AUTH_ATTRIBUTE, Purpose.FILE)


@files_blueprint.delete("/files/<file_id>")
@authenticated(Purpose.SESSION)
async def delete_file(file_id: str, auth: Auth) -> tuple[str, int]:
    store = file_store()
    stored = await store.get(file_id)
    room = await get_room(stored.room)
    if not await is_person(room, str(auth.user.id)):
        raise _no_such_file()
    await store.delete(stored, room, auth.user)
    await unshare_file(node_context().live, room, stored.message_id, stored.id)
    return "", 204

"""Memories (issue 15): upload, serve and delete a room's files through a real in-process
node on the embedded store (or MONGODB_TEST_URI), GridFS counted before and after."""

from __future__ import annotations

import asyncio
import io
from contextlib import AsyncExitStack
from typing import Any
from urllib.parse import quote

import pytest
from PIL import Image
from pymongo import AsyncMongoClient

from node.state import keys
from node.store.files import FileStore
from node.store.models import Message, StoredFile
from node.store.rooms import get_room, remember_person
from tests.conftest import Api, bearer, error_of
from tests.node.runtime.test_live_inprocess import connect

GPS_IFD = 0x8825


def photo(
    width: int = 640, height: int = 480, fmt: str = "JPEG", gps: bool = True, orientation: int = 1
) -> bytes:
    """A photo as a phone would send it: EXIF with a location, a time taken, an orientation."""
    image = Image.new("RGB", (width, height), (200, 40, 40))
    for x in range(0, width, 7):
        image.putpixel((x, x % height), (x % 255, 90, 200))
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x0110] = "SecretPhone 9"
    exif.get_ifd(0x8769)[36867] = "2024:07:14 18:30:00"
    if gps:
        exif.get_ifd(GPS_IFD).update({1: "N", 2: (48.0, 51.0, 29.0), 3: "E", 4: (2.0, 17.0, 40.0)})
    out = io.BytesIO()
    image.save(out, fmt, exif=exif.tobytes())
    return out.getvalue()


def has_gps(data: bytes) -> bool:
    with Image.open(io.BytesIO(data)) as image:
        exif = image.getexif()
        return bool(exif.get_ifd(GPS_IFD)) or GPS_IFD in exif


class Room:
    """A room with its creator (alice) and a member (bob); carol is not one of its people."""

    def __init__(self, api: Api, database: Any) -> None:
        self.api = api
        self.client = api.client
        self.database = database
        self.alice = self.bob = self.carol = ""
        #: user tokens (for the room's settings, `PATCH /api/rooms/{slug}`)
        self.alice_user = self.bob_user = ""

    async def setup(self, slug: str = "trip") -> Room:
        api = self.api
        alice, bob, carol = [await api.user_token(n) for n in ("alice", "bob", "carol")]
        await api.create_room(alice, slug)
        self.slug = slug
        self.alice_user, self.bob_user = alice, bob
        self.alice = await api.session_token(alice)
        self.bob = await api.session_token(bob)
        self.carol = await api.session_token(carol)
        me = await api.client.get("/api/users/me", headers=bearer(bob))
        await remember_person(await get_room(slug), (await me.get_json())["id"])
        return self

    async def upload(
        self, data: bytes, name: str = "photo.jpg", token: str | None = None, slug: str = ""
    ) -> Any:
        return await self.client.post(
            f"/api/rooms/{slug or self.slug}/files?name={quote(name)}",
            data=data,
            headers={**bearer(token or self.alice), "Content-Type": "image/jpeg"},
        )

    async def keep_exif(self, user_token: str, body: Any) -> Any:
        """The room's setting: `body` is the JSON sent (True/False, or anything to refuse)."""
        json = {"keep_original_exif": body} if isinstance(body, bool) else body
        return await self.client.patch(
            f"/api/rooms/{self.slug}", json=json, headers=bearer(user_token)
        )

    async def grid(self) -> tuple[int, int]:
        # Ids alone: nx-27017 counts chunks by reading them (count_documents fails there).
        files = await self.database["files.files"].find({}, {"_id": 1}).to_list()
        chunks = await self.database["files.chunks"].find({}, {"_id": 1}).to_list()
        return len(files), len(chunks)


@pytest.fixture
async def room(make_app: Any, backing: Any) -> Any:
    app = await make_app(files__max_file_bytes=2_000_000)
    api = Api(app.test_client())
    settings = app.app.extensions["sfumesh"].settings
    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(backing.mongodb_uri)
    yield await Room(api, mongo[settings.database]).setup()
    await mongo.close()


async def test_photo_round_trip_exif_stripped_range_etag_delete(room: Room, redis: Any) -> None:
    upload = photo(orientation=6)
    assert has_gps(upload)
    response = await room.upload(upload)
    assert response.status_code == 201, await response.get_data(as_text=True)
    stored = await response.get_json()
    assert stored["kind"] == "image" and stored["content_type"] == "image/jpeg"
    # Orientation 6 (turned 90 degrees): served upright, so width and height swap.
    assert (stored["width"], stored["height"]) == (480, 640)
    assert stored["taken_at"].startswith("2024-07-14T18:30")
    file_id = stored["id"]
    served: dict[str, bytes] = {}
    for path in ("", "/display", "/thumb"):
        got = await room.client.get(f"/api/files/{file_id}{path}", headers=bearer(room.bob))
        assert got.status_code == 200, path
        body = await got.get_data(as_text=False)
        assert got.headers["Content-Length"] == str(len(body))
        assert got.headers["Content-Type"].startswith("image/")
        assert got.headers["X-Content-Type-Options"] == "nosniff"
        assert not has_gps(body), path
        assert b"SecretPhone" not in body
        served[path] = body
    with Image.open(io.BytesIO(served["/thumb"])) as thumb:
        assert max(thumb.size) <= 320 and thumb.size[0] < thumb.size[1]
    original = served[""]
    # ETag: 304 without a body.
    etag = (await room.client.get(f"/api/files/{file_id}", headers=bearer(room.bob))).headers[
        "ETag"
    ]
    again = await room.client.get(
        f"/api/files/{file_id}", headers={**bearer(room.bob), "If-None-Match": etag}
    )
    assert again.status_code == 304 and await again.get_data() == b""
    # Range: a slice of the same bytes.
    part = await room.client.get(
        f"/api/files/{file_id}", headers={**bearer(room.bob), "Range": "bytes=100-1099"}
    )
    assert part.status_code == 206
    assert part.headers["Content-Range"] == f"bytes 100-1099/{len(original)}"
    assert await part.get_data() == original[100:1100]
    bad = await room.client.get(
        f"/api/files/{file_id}", headers={**bearer(room.bob), "Range": "bytes=999999-"}
    )
    assert bad.status_code == 416
    # The chat has it, as a message of kind file.
    history = await room.client.get(f"/api/rooms/{room.slug}/messages", headers=bearer(room.bob))
    (message,) = (await history.get_json())["messages"]
    assert message["file"]["id"] == file_id and message["text"] == ""
    # The same bytes again: stored once.
    before = await room.grid()
    same = await room.upload(upload, name="copy.jpg", token=room.bob)
    assert same.status_code == 200 and (await same.get_json())["id"] == file_id
    assert await room.grid() == before
    assert await StoredFile.find_all().count() == 1
    # Bob did not upload it and did not create the room: he may not delete it.
    denied = await room.client.delete(f"/api/files/{file_id}", headers=bearer(room.bob))
    assert denied.status_code == 403
    gone = await room.client.delete(f"/api/files/{file_id}", headers=bearer(room.alice))
    assert gone.status_code == 204
    assert await room.grid() == (0, 0)
    assert await StoredFile.find_all().count() == 0 and await Message.find_all().count() == 0
    used = await redis.get(keys.files_room_bytes(room.slug))
    assert int(used) == 0
    missing = await room.client.get(f"/api/files/{file_id}", headers=bearer(room.bob))
    assert missing.status_code == 404


def html_page() -> bytes:
    return b"<!DOCTYPE html><html><body><script>alert(document.cookie)</script></body></html>"


def bomb() -> bytes:
    # 30000 x 30000 pixels of one colour: a few kilobytes of PNG, 2.7 GB decoded.
    out = io.BytesIO()
    Image.new("1", (30000, 30000)).save(out, "PNG")
    return out.getvalue()


async def test_bad_uploads_are_refused_and_leave_nothing(room: Room, redis: Any) -> None:
    svg = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'
    cases: list[tuple[bytes, str, str | None, int, str]] = [
        (b"x" * 2_000_001, "big.bin", None, 413, "file_too_large"),
        (html_page(), "cat.jpg", None, 422, "not_an_image"),
        (svg, "logo.svg", None, 415, "active_content"),
        (bomb(), "bomb.png", None, 422, "image_too_large"),
        (photo()[:-3000], "cut.jpg", None, 422, "bad_image"),
        (photo(), "../../etc/passwd.jpg", None, 422, "invalid_name"),
        (photo(), "a\x00b.jpg", None, 422, "invalid_name"),
        (photo(), "gpj\u202eexe.jpg", None, 422, "invalid_name"),
        (photo(), "ok.jpg", room.carol, 403, "not_joined"),
        (b"", "empty.txt", None, 422, "empty_file"),
    ]
    for data, name, token, status, code in cases:
        response = await room.upload(data, name=name, token=token)
        assert response.status_code == status, (name, await response.get_data(as_text=True))
        assert (await error_of(response))["code"] == code, name
        assert await room.grid() == (0, 0), name
        assert await StoredFile.find_all().count() == 0
    used = await redis.get(keys.files_room_bytes(room.slug))
    assert used is None or int(used) == 0
    metrics = await (await room.client.get("/metrics")).get_data(as_text=True)
    assert 'sfumesh_file_refusals_total{reason="image_too_large"} 1.0' in metrics
    # An expired or missing token: 401 before the body is read.
    anonymous = await room.client.post(f"/api/rooms/{room.slug}/files", data=b"abc")
    assert anonymous.status_code == 401
    assert await Message.find_all().count() == 0


async def test_an_animated_gif_stays_animated(room: Room) -> None:
    frames = [Image.new("RGB", (60, 40), colour) for colour in ("red", "green", "blue")]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    stored = await (await room.upload(out.getvalue(), name="wave.gif")).get_json()
    assert stored["content_type"] == "image/gif"
    got = await room.client.get(f"/api/files/{stored['id']}", headers=bearer(room.bob))
    with Image.open(io.BytesIO(await got.get_data(as_text=False))) as served:
        assert getattr(served, "n_frames", 1) == 3


async def test_markup_without_script_is_an_attachment_in_a_sandbox(room: Room) -> None:
    page = b"<html><body><h1>menu</h1></body></html>"
    response = await room.upload(page, name="menu.html")
    assert response.status_code == 201
    stored = await response.get_json()
    assert stored["kind"] == "file" and stored["content_type"] == "application/octet-stream"
    got = await room.client.get(f"/api/files/{stored['id']}", headers=bearer(room.bob))
    assert got.status_code == 200
    assert got.headers["Content-Disposition"].startswith("attachment;")
    assert "sandbox" in got.headers["Content-Security-Policy"]
    assert got.headers["X-Content-Type-Options"] == "nosniff"
    assert await got.get_data() == page
    # Not a member: told no such file, exactly as for an id nobody has.
    assert (
        await room.client.get(f"/api/files/{stored['id']}", headers=bearer(room.carol))
    ).status_code == 404


async def test_file_token_in_the_url_is_bound_to_its_room(room: Room) -> None:
    stored = await (await room.upload(photo())).get_json()
    grant = await room.client.post(f"/api/rooms/{room.slug}/files/token", headers=bearer(room.bob))
    assert grant.status_code == 201
    token = (await grant.get_json())["file_token"]
    thumb = await room.client.get(f"/api/files/{stored['id']}/thumb?t={token}")
    assert thumb.status_code == 200
    assert (await room.client.get(f"/api/files/{stored['id']}/thumb")).status_code == 401
    # A session token is not a file token, nor the reverse.
    assert (
        await room.client.get(f"/api/files/{stored['id']}/thumb?t={room.bob}")
    ).status_code == 401
    # Carol may not buy one.
    refused = await room.client.post(
        f"/api/rooms/{room.slug}/files/token", headers=bearer(room.carol)
    )
    assert refused.status_code == 403


async def test_cut_upload_leaves_no_chunk_and_no_quota(
    room: Room, redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    undone: list[int] = []
    undo = FileStore._undo

    async def recording_undo(self: FileStore, slug: str, user: str, n: int, ids: Any) -> None:
        undone.append(n)
        await undo(self, slug, user, n, ids)

    monkeypatch.setattr(FileStore, "_undo", recording_undo)
    async with room.client.request(
        f"/api/rooms/{room.slug}/files?name=big.bin",
        method="POST",
        headers={**bearer(room.alice), "Content-Length": "1000000"},
    ) as connection:
        await connection.send(b"y" * 600_000)
        await asyncio.sleep(0.2)
        await connection.disconnect()
    await asyncio.sleep(0.2)
    # The handler had the first bytes (reserved against the quota), then gave them back.
    assert undone and undone[0] > 0, undone
    assert await room.grid() == (0, 0)
    assert await StoredFile.find_all().count() == 0
    used = await redis.get(keys.files_room_bytes(room.slug))
    assert used is None or int(used) == 0


@pytest.mark.redis_paths
async def test_quota_counters_lost_with_redis_are_counted_again_from_the_store(
    make_app: Any, backing: Any, redis: Any
) -> None:
    app = await make_app(files__room_quota_bytes=500_000)
    settings = app.app.extensions["sfumesh"].settings
    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(backing.mongodb_uri)
    room = await Room(Api(app.test_client()), mongo[settings.database]).setup()
    assert (await room.upload(b"a" * 300_000, name="a.bin")).status_code == 201
    await redis.delete(keys.files_room_bytes(room.slug))
    refused = await room.upload(b"b" * 300_000, name="b.bin")
    assert refused.status_code == 413
    assert (await error_of(refused))["code"] == "room_quota_exceeded"
    assert int(await redis.get(keys.files_room_bytes(room.slug))) == 300_000
    await mongo.close()


@pytest.mark.redis_paths
async def test_racing_uploads_cannot_pass_the_room_quota(make_app: Any, backing: Any) -> None:
    """Two app instances (two nodes' worth of handlers) on one Redis and one store: ten
    uploads at once, room quota for three: three are kept, never more."""
    first = await make_app(files__room_quota_bytes=3 * 300_000 + 1000)
    second = await make_app(files__room_quota_bytes=3 * 300_000 + 1000)
    api = Api(first.test_client())
    settings = first.app.extensions["sfumesh"].settings
    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(backing.mongodb_uri)
    room = await Room(api, mongo[settings.database]).setup()
    clients = [first.test_client(), second.test_client()]

    async def one(i: int) -> int:
        response = await clients[i % 2].post(
            f"/api/rooms/{room.slug}/files?name=f{i}.bin",
            data=bytes([i]) * 300_000,
            headers=bearer(room.alice if i % 2 else room.bob),
        )
        status: int = response.status_code
        return status

    codes = await asyncio.gather(*(one(i) for i in range(10)))
    assert codes.count(201) == 3 and codes.count(413) == 7, codes
    assert await StoredFile.find_all().count() == 3
    assert await Message.find_all().count() == 3
    files, _ = await room.grid()
    assert files == 3
    # The same photo through both at once: kept once, shared once; the other is told so.
    await room.client.delete(
        f"/api/files/{(await StoredFile.find_all().first_or_none()).id}",  # type: ignore[union-attr]
        headers=bearer(room.alice),
    )
    same = photo()
    replies = await asyncio.gather(
        *(
            clients[i].post(
                f"/api/rooms/{room.slug}/files?name=same{i}.jpg",
                data=same,
                headers=bearer(room.alice),
            )
            for i in range(2)
        )
    )
    assert sorted(r.status_code for r in replies) == [200, 201]
    assert len({(await r.get_json())["id"] for r in replies}) == 1
    assert (
        await StoredFile.find(StoredFile.name == "same0.jpg").count()
        + await StoredFile.find(StoredFile.name == "same1.jpg").count()
        == 1
    )
    assert await Message.find_all().count() == 3
    files, _ = await room.grid()
    assert files == 2 + 3  # two plain files, and the photo's three forms
    await mongo.close()


async def test_upload_appears_live_in_the_room_and_in_the_gallery(room: Room) -> None:
    async with AsyncExitStack() as stack:
        watcher = await connect(stack, room.api, room.bob)
        await watcher.join(room.slug)
        response = await room.upload(photo(), name="beach.jpg")
        stored = await response.get_json()
        chat = await watcher.next("chat")
        assert chat["kind"] == "file" and chat["file"]["id"] == stored["id"]
        assert chat["file"]["name"] == "beach.jpg"
        await room.upload(photo(width=300, height=200), name="second.jpg")
        await room.upload(b"%PDF-1.4 tickets", name="tickets.pdf")
        page = await room.client.get(
            f"/api/rooms/{room.slug}/files?kind=image&limit=1", headers=bearer(room.bob)
        )
        assert page.status_code == 200
        first = await page.get_json()
        assert len(first["files"]) == 1 and first["next_before"]
        rest = await room.client.get(
            f"/api/rooms/{room.slug}/files?kind=image&before={first['next_before']}",
            headers=bearer(room.bob),
        )
        names = {f["name"] for f in (await rest.get_json())["files"] + first["files"]}
        assert names == {"beach.jpg", "second.jpg"}
        gone = await room.client.delete(f"/api/files/{stored['id']}", headers=bearer(room.alice))
        assert gone.status_code == 204
        deleted = await watcher.next("chat-deleted")
        assert deleted["file"] == stored["id"]


async def test_the_original_with_its_exif_only_when_the_room_keeps_it(
    make_app: Any, backing: Any
) -> None:
    # Was the operator-wide `files.keep_original_exif`; now the room's creator opts in.
    app = await make_app()
    settings = app.app.extensions["sfumesh"].settings
    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(backing.mongodb_uri)
    room = await Room(Api(app.test_client()), mongo[settings.database]).setup()
    assert (await room.keep_exif(room.alice_user, True)).status_code == 200
    upload = photo()
    stored = await (await room.upload(upload)).get_json()
    original = await room.client.get(f"/api/files/{stored['id']}", headers=bearer(room.bob))
    assert await original.get_data() == upload
    thumb = await room.client.get(f"/api/files/{stored['id']}/thumb", headers=bearer(room.bob))
    assert not has_gps(await thumb.get_data(as_text=False))
    await mongo.close()


async def served(room: Room, file_id: str) -> dict[str, bytes]:
    """Every variant of a file as one of the room's people (bob) gets it."""
    found = {}
    for variant, path in (("original", ""), ("display", "/display"), ("thumb", "/thumb")):
        response = await room.client.get(f"/api/files/{file_id}{path}", headers=bearer(room.bob))
        assert response.status_code == 200, variant
        found[variant] = await response.get_data(as_text=False)
    return found


async def test_only_the_rooms_creator_opts_in_to_keeping_exif_from_then_on(room: Room) -> None:
    info = await (await room.client.get(f"/api/rooms/{room.slug}")).get_json()
    assert info["keep_original_exif"] is False
    before = photo(width=600)
    earlier = await (await room.upload(before, "before.jpg")).get_json()
    # The default room: nothing served carries a location.
    assert not any(has_gps(data) for data in (await served(room, earlier["id"])).values())

    refused = await room.keep_exif(room.bob_user, True)
    assert refused.status_code == 403
    assert (await error_of(refused))["code"] == "not_room_creator"
    for bad in ({"keep_original_exif": "yes"}, {"keep_original_exif": 1}, {}, {"other": True}):
        response = await room.keep_exif(room.alice_user, bad)
        assert response.status_code == 422, bad
        await error_of(response)
    broken = await room.client.patch(
        f"/api/rooms/{room.slug}",
        data=b"{",
        headers={**bearer(room.alice_user), "Content-Type": "application/json"},
    )
    # Not JSON at all: the node's rule for every route (400 `malformed_json`).
    assert broken.status_code == 400
    assert (await error_of(broken))["code"] == "malformed_json"
    nowhere = await room.client.patch(
        "/api/rooms/nowhere", json={"keep_original_exif": True}, headers=bearer(room.alice_user)
    )
    assert nowhere.status_code == 404
    with_session = await room.keep_exif(room.alice, True)  # a session token is not a login's
    assert with_session.status_code == 401
    info = await (await room.client.get(f"/api/rooms/{room.slug}")).get_json()
    assert info["keep_original_exif"] is False  # nothing written by a refusal

    enabled = await room.keep_exif(room.alice_user, True)
    assert enabled.status_code == 200
    assert (await enabled.get_json())["keep_original_exif"] is True
    upload = photo()
    assert has_gps(upload)
    after = await (await room.upload(upload, "after.jpg")).get_json()
    variants = await served(room, after["id"])
    assert variants["original"] == upload and has_gps(variants["original"])
    assert not has_gps(variants["display"]) and not has_gps(variants["thumb"])
    # Not retroactive: the photo uploaded before stays stripped.
    assert not has_gps((await served(room, earlier["id"]))["original"])

    assert (await room.keep_exif(room.alice_user, False)).status_code == 200
    later = await (await room.upload(photo(width=500), "later.jpg")).get_json()
    assert not any(has_gps(data) for data in (await served(room, later["id"])).values())
    # Opting out is not retroactive either: what was kept with its EXIF stays so.
    assert has_gps((await served(room, after["id"]))["original"])


async def test_the_operator_can_forbid_rooms_to_keep_exif(make_app: Any, backing: Any) -> None:
    app = await make_app(files__keep_original_exif_allowed=False)
    settings = app.app.extensions["sfumesh"].settings
    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(backing.mongodb_uri)
    room = await Room(Api(app.test_client()), mongo[settings.database]).setup()
    refused = await room.keep_exif(room.alice_user, True)
    assert refused.status_code == 403
    assert (await error_of(refused))["code"] == "original_exif_not_allowed"
    # A room that opted in before the operator forbade it: its new uploads are stripped.
    await opt_in_behind_the_api(room.slug)
    stored = await (await room.upload(photo())).get_json()
    assert not any(has_gps(data) for data in (await served(room, stored["id"])).values())
    await mongo.close()


async def opt_in_behind_the_api(slug: str) -> None:
    document = await get_room(slug)
    document.keep_original_exif = True
    await document.save()


async def test_storage_is_a_total_in_metrics_never_a_label_per_room(room: Room) -> None:
    first = photo(width=600)
    await room.upload(first, "one.jpg")
    data = b"%PDF-1.4 not much of a document" * 100
    await room.upload(data, "two.pdf")
    text = await (await room.client.get("/metrics")).get_data(as_text=True)
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line.startswith("sfumesh_file_")
    }
    assert values["sfumesh_file_stored_bytes"] == len(first) + len(data)
    assert values["sfumesh_file_rooms_with_files"] == 1
    assert f'"{room.slug}"' not in text  # no label names the room

"""sfumesh itself as a system under test for `sfumesh bench forward`.

`SfumeshSystem` (driver side; `simulcast=True` for `sfumesh-simulcast`: the synthetic
simulcast publisher, tiles given to the subscribers in turn) starts Redis and the
MongoDB-compatible store as in `sfumesh bench api` (children of the driver, not measured),
then one real node process (`node.local.launch.start_node`, without a mesh: `serf.mode =
"off"`), whose PID is the one measured. The node gathers ICE candidates on the bench
address only (`media.host_addresses`), lets one user be in a room from many
sessions at once (`duplicate_policy = "allow"`: the room counts people, so every client can
use the one bench account), and has a long WebSocket idle timeout. The driver signs the
bench user up, logs in and creates the room; `spec()` carries the node's URL, the user token
and the room.

`SfumeshSignalling` (client side) speaks the node's WebSocket protocol: a session token
(`POST /api/sessions`), the WebSocket (`hello`), the HTTP join and the `join` frame; then
`offer {pc: "publish"}` -> `answer` for the publisher, and for a subscriber the node's
`offer {pc: "subscribe"}` answered with `answer {pc: "subscribe"}` (renegotiations are
answered the same way until `close`). A `ping` every 15 s keeps the socket alive.

For simulcast (issue 14): `offer_filter` edits the publish offer before it is sent (the
synthetic simulcast publisher's RIDs, `node.bench.forward.simulcast`), `on_layers` hears
which of its encodings the node wants sent (`layers`), and a subscriber
with a `tile` (width, height) tells the node after each answer that every video track it
receives shows in a tile of that size (`view`), so the node picks the layer that fits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import httpx
from aiortc import RTCPeerConnection, RTCSessionDescription
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from node.bench.forward.systems import SIGNALLING
from node.config import new_key
from node.local.launch import LocalNode, start_node
from node.runtime.services import BackingServices

log = logging.getLogger(__name__)

ROOM: Final = "bench-forward"
USERNAME: Final = "benchforward"
PING_INTERVAL_S: Final = 15.0
#: `sfumesh-simulcast`: subscriber N shows the video in tile N % 3 of these (device pixels):
#: the node sends it the quarter, half or full size encoding
SIMULCAST_TILES: Final = ((320, 180), (640, 360), (1280, 720))
REQUEST_TIMEOUT_S: Final = 30.0
#: The simulcast publisher sends all three encodings at every K, not obeying the node's
#: `layers` (which switch unwatched encodings off, as in a browser). Obeying, K = 1
#: (one small tile) ingests the smallest encoding only and K >= 3 all three (~220 packets/s
#: more; at the ingest fit's ~88 us per ingested packet that is ~20 us per forwarded packet
#: of a K = 1, 8 fit): the slope is meant to be the forwarding, with the same ingest in
#: every window (the ingest fit measures that).
SIMULCAST_ALL_LAYERS: Final = True


class SfumeshError(RuntimeError):
    """The node refused a step of the bench's set-up or signalling."""


class SfumeshSystem:
    """One sfumesh node process (plus the backing services it needs)."""

    name = "sfumesh"

    def __init__(
        self,
        address: str,
        workdir: Path,
        *,
        log_level: str = "WARNING",
        simulcast: bool = False,
        channels: int = 1,
    ) -> None:
        if channels < 1:
            raise ValueError("channels must be >= 1")
        self.address = address
        #: the publisher sends three encodings and subscribers' tiles choose among them
        self.simulcast = simulcast
        self.workdir = Path(workdir)
        self.log_level = log_level
        #: independent publisher/subscriber pairs (ingest runs): one room each
        self.channels = channels
        self._services: BackingServices | None = None
        self._node: LocalNode | None = None
        self._user_token = ""

    @property
    def pid(self) -> int:
        if self._node is None or self._node.process.pid is None:
            raise SfumeshError("the sfumesh node is not running")
        return self._node.process.pid

    @property
    def service_pids(self) -> list[int]:
        """The embedded Redis's and store's PIDs (none when not running)."""
        children = [] if self._services is None else self._services.children
        return [child.pid for child in children if child.pid is not None]

    @property
    def url(self) -> str:
        if self._node is None:
            raise SfumeshError("the sfumesh node is not running")
        return self._node.url

    def spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "system": "sfumesh",
            "url": self.url,
            "user_token": self._user_token,
            "room": ROOM,
        }
        if self.simulcast:
            tiles = [list(tile) for tile in SIMULCAST_TILES]
            # every encoding sent at every K: see SIMULCAST_ALL_LAYERS
            spec.update(simulcast=True, tiles=tiles, all_layers=SIMULCAST_ALL_LAYERS)
        if self.channels > 1:
            spec["channels"] = [{"room": channel_room(n)} for n in range(self.channels)]
        return spec

    async def start(self) -> None:
        await asyncio.to_thread(self._start)

    def _start(self) -> None:
        try:
            self._services = BackingServices.start("", "", self.workdir / "services")
            extra_env = {
                "SFUMESH_MEDIA_HOST_ADDRESSES": json.dumps([self.address]),
                "SFUMESH_ICE_SERVERS": "[]",
                "SFUMESH_DUPLICATE_POLICY": "allow",
                "SFUMESH_WS_IDLE_TIMEOUT_S": "600",
                # Every subscriber is a session of one user, all from this machine.
                "SFUMESH_WS_MAX_PER_USER": "100000",
                "SFUMESH_WS_MAX_PER_ADDRESS": "100000",
                "SFUMESH_BCRYPT_COST": "4",
                # `sfumesh bench scale` makes a room per step of its ramp
                "SFUMESH_ROOM_CREATIONS_PER_WINDOW": "100000",
                "SFUMESH_LOG_LEVEL": self.log_level,
                "SFUMESH_DATABASE": f"bench_forward_{secrets.token_hex(4)}",
                # one node, no mesh: no Serf agent beside it, no gossip in the window
                "SFUMESH_SERF_MODE": "off",
            }
            if self.simulcast:
                # the tiles choose the layers: the aiortc subscribers' delay-based estimates
                # on one loaded machine would otherwise pick them (and make the runs differ)
                extra_env["SFUMESH_MEDIA_SIMULCAST_FOLLOW_BANDWIDTH"] = "false"
            self._node = start_node(
                self._services,
                {"bench": new_key()},
                name="bench-node",
                data_dir=self.workdir / "node",
                extra_env=extra_env,
            )
            self._user_token = self._set_up_room(self._node.url, self.channels)
        except BaseException:
            self._stop()
            raise

    @staticmethod
    def _set_up_room(url: str, channels: int = 1) -> str:
        password = secrets.token_urlsafe(16)
        with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as http:
            signup = {
                "username": USERNAME,
                "email": f"{USERNAME}@example.org",
                "password": password,
                "display_name": "Bench",
            }
            _expect(http.post("/api/users", json=signup), 201)
            login = _expect(
                http.post("/api/auth/login", json={"login": USERNAME, "password": password}), 200
            )
            token = str(login["user_token"])
            for channel in range(channels):
                room = {"slug": channel_room(channel), "name": "Forward bench", "capacity": 100}
                _expect(http.post("/api/rooms", json=room, headers=_bearer(token)), 201)
        return token

    async def stop(self) -> None:
        await asyncio.to_thread(self._stop)

    def _stop(self) -> None:
        if self._node is not None:
            self._node.stop()
            self._node = None
        if self._services is not None:
            self._services.stop()
            self._services = None


def channel_room(channel: int) -> str:
    """The room of publisher/subscriber pair `channel` (pair 0: the bench's one room)."""
    return ROOM if channel == 0 else f"{ROOM}-{channel}"


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _expect(response: httpx.Response, status: int) -> dict[str, Any]:
    if response.status_code != status:
        raise SfumeshError(
            f"{response.request.method} {response.request.url.path}: HTTP "
            f"{response.status_code}: {response.text[:300]}"
        )
    body: dict[str, Any] = response.json()
    return body


class SfumeshSignalling:
    """One client of the node: its own session, WebSocket and membership of the room."""

    def __init__(
        self, spec: Mapping[str, Any], role: str, *, timeout: float = REQUEST_TIMEOUT_S
    ) -> None:
        self.url = str(spec["url"])
        self.user_token = str(spec["user_token"])
        self.room = str(spec["room"])
        self.role = role
        self.timeout = timeout
        self.pc: RTCPeerConnection | None = None
        #: the connection the node's subscribe offers are answered on (a participant of
        #: `sfumesh bench scale` publishes on `pc` and receives on this one)
        self.subscribe_pc: RTCPeerConnection | None = None
        self.offers = 0
        #: edits the publish offer's SDP before it is sent (None: sent as aiortc made it)
        self.offer_filter: Callable[[str], str] | None = None
        #: the tile (device pixels) every received video track is shown in (None: no `view`)
        self.tile: tuple[int, int] | None = None
        #: called with a `layers` message's mid and active RIDs (the node switches a
        #: simulcast publisher's unwatched encodings off and on, as it tells a browser)
        self.on_layers: Callable[[str, list[str]], None] | None = None
        self.errors: list[dict[str, Any]] = []
        self._ws: ClientConnection | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._counter = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._answered = asyncio.Event()
        self._offer_lock = asyncio.Lock()
        self._closed = False
        self._opened: asyncio.Future[None] | None = None

    async def join(self) -> None:
        """Open the session and join the room, with no media (once, however often called)."""
        if self._opened is None:
            self._opened = asyncio.ensure_future(self._open())
        await asyncio.shield(self._opened)

    async def publish(self, pc: RTCPeerConnection) -> None:
        self.pc = pc
        await self.join()
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        if self.offer_filter is not None:
            sdp = self.offer_filter(sdp)
        reply = await self._request("offer", pc="publish", sdp=sdp)
        if reply.get("type") != "answer":
            raise SfumeshError(f"publish offer refused: {reply}")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=reply["sdp"], type="answer"))

    async def subscribe(self, pc: RTCPeerConnection) -> None:
        self.subscribe_pc = pc
        await self.join()
        await asyncio.wait_for(self._answered.wait(), self.timeout)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._request("leave"), 5.0)
            with contextlib.suppress(Exception):
                await self._ws.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ----------------------------------------------------------------- internals

    async def _open(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=self.timeout) as http:
            grant = _expect(await http.post("/api/sessions", headers=_bearer(self.user_token)), 201)
            session_token = str(grant["session_token"])
            ws_url = self.url.replace("http", "ws", 1) + f"/ws?session_token={session_token}"
            self._ws = await connect(ws_url, open_timeout=self.timeout, max_size=None)
            hello = json.loads(await asyncio.wait_for(self._ws.recv(), self.timeout))
            if not isinstance(hello, dict) or hello.get("type") != "hello":
                raise SfumeshError(f"the first message was not hello: {hello}")
            path = f"/api/rooms/{quote(self.room, safe='')}/join"
            room_grant = _expect(await http.post(path, headers=_bearer(session_token)), 200)
        self._spawn(self._read())
        reply = await self._request("join", room_token=str(room_grant["room_token"]))
        if reply.get("type") != "ack":
            raise SfumeshError(f"join refused: {reply}")
        self._spawn(self._ping())

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _request(self, frame_type: str, **fields: Any) -> dict[str, Any]:
        ws = self._ws
        if ws is None:
            raise SfumeshError("the WebSocket is not open")
        self._counter += 1
        frame_id = f"{self.role[0]}{self._counter}"
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[frame_id] = waiter
        try:
            await ws.send(json.dumps({"type": frame_type, "id": frame_id, **fields}))
            reply = await asyncio.wait_for(waiter, self.timeout)
        finally:
            self._pending.pop(frame_id, None)
        if reply.get("type") == "error":
            raise SfumeshError(f"{frame_type}: {reply.get('code')}: {reply.get('message')}")
        return reply

    async def _read(self) -> None:
        ws = self._ws
        assert ws is not None
        try:
            async for raw in ws:
                message = json.loads(raw)
                if not isinstance(message, dict):
                    continue
                waiter = self._pending.get(str(message.get("id")))
                if waiter is not None and not waiter.done():
                    waiter.set_result(message)
                    continue
                kind = message.get("type")
                if kind == "offer" and message.get("pc") == "subscribe":
                    tracks = message.get("tracks")
                    video = (
                        [
                            str(mid)
                            for mid, track in tracks.items()
                            if isinstance(track, dict) and track.get("kind") == "video"
                        ]
                        if isinstance(tracks, dict)
                        else []
                    )
                    self._spawn(self._answer(str(message.get("sdp", "")), video))
                elif kind == "layers" and self.on_layers is not None:
                    active = message.get("active")
                    if isinstance(active, list):
                        self.on_layers(str(message.get("mid")), [str(rid) for rid in active])
                elif kind == "error":
                    log.warning("node error: %s", message)
                    self.errors.append(message)
        except ConnectionClosed:
            if not self._closed:
                log.warning("the node closed the WebSocket")
        finally:
            for waiter in self._pending.values():
                if not waiter.done():
                    waiter.set_exception(ConnectionError("the WebSocket closed"))

    async def _answer(self, sdp: str, video_mids: list[str] | None = None) -> None:
        pc = self.subscribe_pc
        if pc is None:
            return
        async with self._offer_lock:
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
                await pc.setLocalDescription(await pc.createAnswer())
                self.offers += 1
                await self._request("answer", pc="subscribe", sdp=pc.localDescription.sdp)
            except Exception:
                log.exception("answering the node's subscribe offer failed")
                return
        if self.tile is not None and video_mids:
            width, height = self.tile
            tile = {"width": width, "height": height, "visible": True}
            try:
                await self._request("view", tiles=dict.fromkeys(video_mids[-64:], tile))
            except Exception:
                log.exception("telling the node the tile size failed")
        self._answered.set()

    async def _ping(self) -> None:
        while True:
            await asyncio.sleep(PING_INTERVAL_S)
            with contextlib.suppress(Exception):
                await self._request("ping")


def _signalling(spec: dict[str, Any], role: str) -> SfumeshSignalling:
    return SfumeshSignalling(spec, role)


SIGNALLING["sfumesh"] = _signalling

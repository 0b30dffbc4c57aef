"""Janus VideoRoom as a system under test for `sfumesh bench forward`.

`JanusSystem` (driver side) runs Debian's `janus` as a child process on a private copy of
its configuration: only the VideoRoom plugin and the HTTP transport are loaded (the plugin
and transport folders in the work dir hold symlinks to just those two libraries; the event
handler and logger folders are empty), the Janus API listens on 127.0.0.1 at a free port and
the admin API on another with a random secret. Janus refuses to gather ICE candidates on
loopback, so it gathers only on the address given (the veth pair that `node.local.netns` makes in
a private namespace), with mDNS candidates ignored and no STUN. One static room (VP8 + Opus,
no recording) is defined in the plugin's configuration and checked after start.

`JanusSignalling` (client side) speaks the Janus REST API over HTTP with httpx: one session
and one VideoRoom handle per client, asynchronous plugin events (the JSEP answers and
offers) through a long-poll GET on the session, keepalives every 25 s. aiortc gathers its
candidates before it returns the local description, so no trickle is sent; candidates Janus
trickles (if any) are added to the peer connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import secrets
import shutil
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.sdp import candidate_from_sdp

from mesh.process import ManagedProcess, free_port
from node.bench.forward.systems import SIGNALLING

log = logging.getLogger(__name__)

#: the VideoRoom room every bench uses, and the publisher's fixed feed id in it
ROOM_ID: Final = 1234
FEED_ID: Final = 1
VIDEOROOM: Final = "janus.plugin.videoroom"
PLUGIN_LIBRARY: Final = "libjanus_videoroom.so"
TRANSPORT_LIBRARY: Final = "libjanus_http.so"
#: UDP ports Janus may use for media: below Linux's ephemeral range (32768-60999), so
#: the free TCP ports picked for the API never collide in intent with them
RTP_PORT_RANGE: Final = "20000-29999"
#: room bitrate cap (bit/s) Janus announces in REMB: well above a ~1.5 Mbit/s VP8 stream
ROOM_BITRATE: Final = 4_000_000
#: error code of the VideoRoom plugin when the feed to subscribe to is not published yet
ERROR_NO_SUCH_FEED: Final = 428
KEEPALIVE_INTERVAL_S: Final = 25.0
#: Janus holds a long-poll for 30 s before it answers with a keepalive
LONG_POLL_READ_TIMEOUT_S: Final = 45.0

_LIBRARY_DIRS: Final = (
    "/usr/lib/*/janus",
    "/usr/lib/janus",
    "/usr/local/lib/janus",
    "/opt/janus/lib/janus",
)


class JanusError(RuntimeError):
    """Janus could not start, or answered a request with an error."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


def janus_library_dir() -> Path:
    """The folder holding Janus's `plugins/` and `transports/` (Debian: multiarch lib)."""
    for pattern in _LIBRARY_DIRS:
        for candidate in sorted(glob.glob(pattern)):
            path = Path(candidate)
            if (path / "plugins" / PLUGIN_LIBRARY).exists() and (
                path / "transports" / TRANSPORT_LIBRARY
            ).exists():
                return path
    raise JanusError(
        f"Janus's {PLUGIN_LIBRARY} and {TRANSPORT_LIBRARY} not found under "
        f"{', '.join(_LIBRARY_DIRS)} (Debian: apt-get install janus)"
    )


def _quote(value: str) -> str:
    """A libconfig (jcfg) string literal."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _transaction() -> str:
    return secrets.token_hex(8)


@dataclass(frozen=True)
class JanusCounters:
    """Media counters summed over every handle and medium (admin API `handle_info`,
    `webrtc.media.*.stats` and `.rtcp.main`)."""

    handles: int
    packets_in: int
    packets_out: int
    bytes_in: int
    bytes_out: int
    #: NACKs Janus received (from subscribers) and sent (to the publisher)
    nacks_in: int
    nacks_out: int
    #: retransmissions Janus received
    retransmissions_in: int
    #: packets lost as Janus's RTCP saw them, both directions
    lost: int
    lost_by_remote: int


class JanusSystem:
    """Janus VideoRoom, one static room, run as a child process and stopped by PID.

    `event_loops`: None for Janus's default (a thread and loop per handle), N for
    `event_loops = N` (handles share N loops). `address`: where Janus gathers ICE candidates
    (`nat.ice_enforce_list`: an IP address such as `netns.VETH_ADDRESS`, or an interface
    name such as "veth0"; never loopback, which Janus skips). `workdir` holds the private
    configuration and `janus.log` (Janus's stdout and stderr).
    """

    def __init__(
        self,
        event_loops: int | None,
        address: str,
        workdir: Path,
        *,
        debug_level: int = 2,
        start_timeout: float = 20.0,
        channels: int = 1,
    ) -> None:
        if event_loops is not None and event_loops < 1:
            raise ValueError("event_loops must be >= 1 (None: one loop per handle)")
        if channels < 1:
            raise ValueError("channels must be >= 1")
        #: independent publisher/subscriber pairs (ingest runs): one feed each in the room
        self.channels = channels
        self.event_loops = event_loops
        self.address = address
        self.workdir = Path(workdir)
        self.debug_level = debug_level
        self.start_timeout = start_timeout
        self.name = "janus" if event_loops is None else f"janus-event-loops-{event_loops}"
        self.room = ROOM_ID
        self.feed = FEED_ID
        self.http_port = 0
        self.admin_port = 0
        self._admin_secret = secrets.token_urlsafe(24)
        self._process: ManagedProcess | None = None
        #: seconds from launch until the API answered and the room existed
        self.startup_s: float | None = None

    # ------------------------------------------------------------------ System protocol

    @property
    def pid(self) -> int:
        pid = None if self._process is None else self._process.pid
        if pid is None:
            raise JanusError(f"{self.name} is not running")
        return pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/janus"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}/admin"

    @property
    def log_path(self) -> Path:
        return self.workdir / "janus.log"

    def spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "system": "janus",
            "url": self.url,
            "room": self.room,
            "feed": self.feed,
        }
        if self.channels > 1:
            spec["channels"] = [{"feed": self.feed + n} for n in range(self.channels)]
        return spec

    async def start(self) -> None:
        if self._process is not None and self._process.exit_code() is None:
            raise JanusError(f"{self.name} already runs (pid {self._process.pid})")
        binary = shutil.which("janus")
        if binary is None:
            raise JanusError("`janus` is not installed (Debian: apt-get install janus)")
        self.http_port = free_port()
        self.admin_port = free_port()
        while self.admin_port == self.http_port:
            self.admin_port = free_port()
        self.write_config()
        self.log_path.unlink(missing_ok=True)  # the tail in errors is this run's only
        argv = [binary, "-F", str(self.workdir), "-C", str(self.workdir / "janus.jcfg")]
        self._process = ManagedProcess(self.name, argv, self.log_path, env=dict(os.environ))
        began = time.monotonic()
        self._process.start()
        log.info(
            "janus.starting",
            extra={"system": self.name, "pid": self._process.pid, "port": self.http_port},
        )
        try:
            await self._wait_until_serving(began + self.start_timeout)
        except BaseException:
            await self.stop()
            raise
        self.startup_s = time.monotonic() - began
        log.info(
            "janus.started",
            extra={"system": self.name, "pid": self.pid, "startup_s": round(self.startup_s, 3)},
        )

    async def stop(self) -> None:
        process = self._process
        if process is None:
            return
        # SIGTERM, SIGKILL after 5 s, reaped either way (ManagedProcess.stop, by PID).
        await asyncio.to_thread(process.stop, 5.0)
        log.info("janus.stopped", extra={"system": self.name, "code": process.exit_code()})

    # ------------------------------------------------------------------ configuration

    def write_config(self) -> None:
        """The private configuration in `workdir` (secret inside: files are 0600)."""
        library = janus_library_dir()
        self.workdir.mkdir(parents=True, exist_ok=True)
        for folder, keep in (
            ("plugins", PLUGIN_LIBRARY),
            ("transports", TRANSPORT_LIBRARY),
            ("events", None),
            ("loggers", None),
        ):
            target = self.workdir / folder
            if target.is_symlink() or target.is_file():
                target.unlink()
            elif target.is_dir():
                shutil.rmtree(target)
            target.mkdir()
            if keep is not None:
                (target / keep).symlink_to(library / folder / keep)
        loops = "" if self.event_loops is None else f"\tevent_loops = {self.event_loops}\n"
        work = str(self.workdir)
        files = {
            "janus.jcfg": (
                "general: {\n"
                f"\tconfigs_folder = {_quote(work)}\n"
                f"\tplugins_folder = {_quote(work + '/plugins')}\n"
                f"\ttransports_folder = {_quote(work + '/transports')}\n"
                f"\tevents_folder = {_quote(work + '/events')}\n"
                f"\tloggers_folder = {_quote(work + '/loggers')}\n"
                "\tlog_to_stdout = true\n"
                f"\tdebug_level = {self.debug_level}\n"
                "\tdebug_timestamps = true\n"
                "\tdebug_colors = false\n"
                f"\tadmin_secret = {_quote(self._admin_secret)}\n"
                '\tserver_name = "sfumesh-bench"\n'
                "\tsession_timeout = 60\n"
                f"{loops}"
                "}\n"
                "certificates: {\n}\n"
                "media: {\n"
                "\tipv6 = false\n"
                f"\trtp_port_range = {_quote(RTP_PORT_RANGE)}\n"
                "}\n"
                "nat: {\n"
                "\tnice_debug = false\n"
                "\tfull_trickle = false\n"
                "\tignore_mdns = true\n"
                f"\tice_enforce_list = {_quote(self.address)}\n"
                "}\n"
                "plugins: {\n}\n"
                "transports: {\n}\n"
                "loggers: {\n}\n"
                "events: {\n\tbroadcast = false\n}\n"
            ),
            "janus.transport.http.jcfg": (
                "general: {\n"
                "\tevents = false\n"
                '\tjson = "compact"\n'
                '\tbase_path = "/janus"\n'
                "\thttp = true\n"
                f"\tport = {self.http_port}\n"
                '\tip = "127.0.0.1"\n'
                "\thttps = false\n"
                "}\n"
                "admin: {\n"
                '\tadmin_base_path = "/admin"\n'
                "\tadmin_http = true\n"
                f"\tadmin_port = {self.admin_port}\n"
                '\tadmin_ip = "127.0.0.1"\n'
                "\tadmin_https = false\n"
                "}\n"
                "cors: {\n}\n"
            ),
            "janus.plugin.videoroom.jcfg": (
                "general: {\n}\n"
                f"room-{self.room}: {{\n"
                '\tdescription = "sfumesh bench forward"\n'
                "\tis_private = true\n"
                f"\tpublishers = {max(2, self.channels)}\n"
                f"\tbitrate = {ROOM_BITRATE}\n"
                '\taudiocodec = "opus"\n'
                '\tvideocodec = "vp8"\n'
                "\trecord = false\n"
                "\tnotify_joining = false\n"
                "}\n"
            ),
        }
        for filename, text in files.items():
            path = self.workdir / filename
            path.write_text(text)
            path.chmod(0o600)

    # ------------------------------------------------------------------ start-up

    async def _wait_until_serving(self, deadline: float) -> None:
        assert self._process is not None
        process = self._process
        last_error = "no answer yet"
        async with httpx.AsyncClient(trust_env=False, timeout=2.0) as http:
            while True:
                code = process.exit_code()
                if code is not None:
                    raise JanusError(
                        f"janus exited with code {code} while starting:\n{process.log_tail(30)}"
                    )
                if time.monotonic() > deadline:
                    raise JanusError(
                        f"janus did not serve {self.url} within {self.start_timeout} s "
                        f"({last_error}):\n{process.log_tail(30)}"
                    )
                try:
                    info = (
                        await http.post(self.url, json={"janus": "info", "transaction": "i"})
                    ).json()
                except (httpx.HTTPError, ValueError) as error:
                    last_error = f"{type(error).__name__}: {error}"
                    await asyncio.sleep(0.05)
                    continue
                if info.get("janus") == "server_info":
                    break
                last_error = f"unexpected answer {info!r}"
                await asyncio.sleep(0.05)
            plugins = info.get("plugins") or {}
            transports = info.get("transports") or {}
            if VIDEOROOM not in plugins:
                raise JanusError(
                    f"janus runs without {VIDEOROOM} (plugins: {sorted(plugins)}):\n"
                    f"{process.log_tail(30)}"
                )
            extra = sorted(set(plugins) - {VIDEOROOM}) + sorted(
                set(transports) - {"janus.transport.http"}
            )
            if extra:
                log.warning("janus.extra_modules", extra={"modules": extra})
            await self._check_room(http)

    async def _check_room(self, http: httpx.AsyncClient) -> None:
        """The static room exists (the plugin read our configuration)."""
        assert self._process is not None
        session = await _post(http, self.url, {"janus": "create"})
        session_id = int(session["data"]["id"])
        try:
            handle = await _post(
                http, f"{self.url}/{session_id}", {"janus": "attach", "plugin": VIDEOROOM}
            )
            handle_id = int(handle["data"]["id"])
            answer = await _post(
                http,
                f"{self.url}/{session_id}/{handle_id}",
                {"janus": "message", "body": {"request": "exists", "room": self.room}},
            )
            data = answer.get("plugindata", {}).get("data", {})
            if not data.get("exists"):
                raise JanusError(
                    f"room {self.room} missing from janus ({data!r}):\n{self._process.log_tail(30)}"
                )
        finally:
            with contextlib.suppress(httpx.HTTPError, JanusError):
                await _post(http, f"{self.url}/{session_id}", {"janus": "destroy"})

    # ------------------------------------------------------------------ admin API

    async def _admin(self, http: httpx.AsyncClient, path: str, request: str) -> dict[str, Any]:
        return await _post(
            http,
            self.admin_url + path,
            {"janus": request, "admin_secret": self._admin_secret},
        )

    async def packet_counters(self) -> JanusCounters:
        """Media counters summed over every handle (admin API: one request per session and
        per handle, so read them between measurement windows, not during one)."""
        totals = dict.fromkeys(
            (
                "handles",
                "packets_in",
                "packets_out",
                "bytes_in",
                "bytes_out",
                "nacks_in",
                "nacks_out",
                "retransmissions_in",
                "lost",
                "lost_by_remote",
            ),
            0,
        )
        async with httpx.AsyncClient(trust_env=False, timeout=5.0) as http:
            sessions = (await self._admin(http, "", "list_sessions")).get("sessions") or []
            for session in sessions:
                try:
                    listed = await self._admin(http, f"/{session}", "list_handles")
                except JanusError:
                    continue  # gone between the two requests
                for handle in listed.get("handles") or []:
                    try:
                        info = await self._admin(http, f"/{session}/{handle}", "handle_info")
                    except JanusError:
                        continue
                    totals["handles"] += 1
                    for medium in _media_entries(info.get("info") or {}):
                        stats = medium.get("stats") or {}
                        stats_in, stats_out = stats.get("in") or {}, stats.get("out") or {}
                        rtcp = (medium.get("rtcp") or {}).get("main") or {}
                        totals["packets_in"] += _int(stats_in, "packets")
                        totals["packets_out"] += _int(stats_out, "packets")
                        totals["bytes_in"] += _int(stats_in, "bytes")
                        totals["bytes_out"] += _int(stats_out, "bytes")
                        totals["nacks_in"] += _int(stats_in, "nacks")
                        totals["nacks_out"] += _int(stats_out, "nacks")
                        totals["retransmissions_in"] += _int(stats_in, "retransmissions")
                        totals["lost"] += _int(rtcp, "lost")
                        totals["lost_by_remote"] += _int(rtcp, "lost-by-remote")
        return JanusCounters(**totals)


def _media_entries(info: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The per-medium blocks of one `handle_info` (Janus 1.1: `webrtc.media`, an object
    keyed by m-line index)."""
    media = (info.get("webrtc") or {}).get("media") or {}
    if isinstance(media, Mapping):
        media = list(media.values())
    return [m for m in media if isinstance(m, Mapping)]


def _int(stats: Mapping[str, Any], key: str) -> int:
    value = stats.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


async def _post(
    http: httpx.AsyncClient,
    url: str,
    payload: dict[str, Any],
    request_timeout: float | None = None,
) -> dict[str, Any]:
    """One Janus API request; its synchronous answer, or JanusError."""
    body = {**payload, "transaction": payload.get("transaction") or _transaction()}
    response = await http.post(url, json=body, timeout=request_timeout or http.timeout)
    response.raise_for_status()
    answer: dict[str, Any] = response.json()
    if answer.get("janus") == "error":
        error = answer.get("error") or {}
        raise JanusError(
            f"janus {payload.get('janus')} at {url}: {error.get('reason')} "
            f"(code {error.get('code')})",
            error.get("code"),
        )
    return answer


class JanusSignalling:
    """One aiortc client of the VideoRoom over the Janus REST API (a `Signalling`)."""

    def __init__(self, spec: Mapping[str, Any], role: str, *, timeout: float = 30.0) -> None:
        if role not in ("publisher", "subscriber"):
            raise ValueError(f"role must be publisher or subscriber, not {role!r}")
        self.url = str(spec["url"]).rstrip("/")
        self.room = int(spec["room"])
        self.feed = int(spec["feed"])
        self.role = role
        self.timeout = timeout
        self._http: httpx.AsyncClient | None = None
        self._session_id: int | None = None
        self._handle_id: int | None = None
        self._pc: RTCPeerConnection | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        #: set once Janus reports the PeerConnection up (`webrtcup`)
        self.webrtc_up = asyncio.Event()

    # ------------------------------------------------------------------ Signalling

    async def publish(self, pc: RTCPeerConnection) -> None:
        if self.role != "publisher":
            raise JanusError("publish() on a subscriber signalling")
        self._pc = pc
        await self._open()
        await self._request(
            {
                "request": "join",
                "ptype": "publisher",
                "room": self.room,
                "id": self.feed,
                "display": "bench-publisher",
            }
        )
        await pc.setLocalDescription(await pc.createOffer())
        local = pc.localDescription
        event = await self._request(
            {"request": "publish", "audiocodec": "opus", "videocodec": "vp8"},
            jsep={"type": local.type, "sdp": local.sdp},
        )
        jsep = event.get("jsep")
        if not jsep or jsep.get("type") != "answer":
            raise JanusError(f"janus publish gave no JSEP answer: {event!r}")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=jsep["sdp"], type="answer"))
        # Janus lists the feed (subscribers may join it) only once ICE and DTLS are up.
        try:
            await asyncio.wait_for(self.webrtc_up.wait(), self.timeout)
        except TimeoutError:
            raise JanusError(
                f"janus publisher: PeerConnection not up within {self.timeout} s "
                f"(ICE state {pc.iceConnectionState})"
            ) from None
        log.debug("janus.published", extra={"feed": self.feed})

    async def subscribe(self, pc: RTCPeerConnection) -> None:
        if self.role != "subscriber":
            raise JanusError("subscribe() on a publisher signalling")
        self._pc = pc
        await self._open()
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                event = await self._request(
                    {
                        "request": "join",
                        "ptype": "subscriber",
                        "room": self.room,
                        "streams": [{"feed": self.feed}],
                    }
                )
                break
            except JanusError as error:
                # The publisher may still be negotiating: its feed appears once published.
                if error.code != ERROR_NO_SUCH_FEED or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        jsep = event.get("jsep")
        if not jsep or jsep.get("type") != "offer":
            raise JanusError(f"janus subscriber join gave no JSEP offer: {event!r}")
        await self._answer(jsep["sdp"])
        log.debug("janus.subscribed", extra={"feed": self.feed})

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        http = self._http
        try:
            if http is not None and self._session_id is not None:
                if self._handle_id is not None:
                    with contextlib.suppress(JanusError, httpx.HTTPError, TimeoutError):
                        await asyncio.wait_for(self._request({"request": "leave"}), 5.0)
                with contextlib.suppress(JanusError, httpx.HTTPError):
                    await _post(http, self._session_url, {"janus": "destroy"}, request_timeout=5.0)
        finally:
            for task in list(self._tasks):
                task.cancel()
            for task in list(self._tasks):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self._fail_pending(JanusError("signalling closed"))
            if http is not None:
                await http.aclose()
            self._http = None

    # ------------------------------------------------------------------ internals

    @property
    def _session_url(self) -> str:
        return f"{self.url}/{self._session_id}"

    async def _open(self) -> None:
        if self._http is not None:
            raise JanusError("signalling already opened")
        self._http = httpx.AsyncClient(trust_env=False, timeout=self.timeout)
        try:
            created = await _post(self._http, self.url, {"janus": "create"})
            self._session_id = int(created["data"]["id"])
            attached = await _post(
                self._http, self._session_url, {"janus": "attach", "plugin": VIDEOROOM}
            )
            self._handle_id = int(attached["data"]["id"])
        except httpx.HTTPError as error:
            raise JanusError(f"janus at {self.url} unreachable: {error}") from error
        self._spawn(self._long_poll())
        self._spawn(self._keepalive())

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _request(
        self, body: dict[str, Any], jsep: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """A VideoRoom request; its event (synchronous answer, or the asynchronous event
        delivered through the long-poll). Plugin errors raise JanusError."""
        if self._http is None or self._handle_id is None:
            raise JanusError("signalling not open")
        transaction = _transaction()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        # Registered before the POST: the event may come through the long-poll first.
        self._pending[transaction] = future
        payload: dict[str, Any] = {"janus": "message", "body": body, "transaction": transaction}
        if jsep is not None:
            payload["jsep"] = jsep
        try:
            answer = await _post(self._http, f"{self._session_url}/{self._handle_id}", payload)
            if answer.get("janus") == "ack":
                try:
                    answer = await asyncio.wait_for(future, self.timeout)
                except TimeoutError:
                    raise JanusError(
                        f"janus {body.get('request')} ({self.role}): no event within "
                        f"{self.timeout} s"
                    ) from None
        except httpx.HTTPError as error:
            raise JanusError(f"janus {body.get('request')} ({self.role}): {error}") from error
        finally:
            self._pending.pop(transaction, None)
        data = (answer.get("plugindata") or {}).get("data") or {}
        if "error" in data or "error_code" in data:
            raise JanusError(
                f"janus videoroom {body.get('request')} ({self.role}): {data.get('error')} "
                f"(code {data.get('error_code')})",
                data.get("error_code"),
            )
        return answer

    async def _answer(self, offer_sdp: str) -> None:
        """Apply Janus's offer, answer it with a `start`."""
        pc = self._pc
        assert pc is not None
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        local = pc.localDescription
        await self._request({"request": "start"}, jsep={"type": local.type, "sdp": local.sdp})

    async def _renegotiate(self, offer_sdp: str) -> None:
        try:
            await self._answer(offer_sdp)
        except Exception:
            if not self._closed:
                log.exception("janus.renegotiation_failed", extra={"role": self.role})

    async def _keepalive(self) -> None:
        while self._http is not None:
            await asyncio.sleep(KEEPALIVE_INTERVAL_S)
            try:
                await _post(self._http, self._session_url, {"janus": "keepalive"})
            except (JanusError, httpx.HTTPError) as error:
                log.warning("janus.keepalive_failed", extra={"error": str(error)})

    async def _long_poll(self) -> None:
        """Until cancelled: fetch the session's events, route them."""
        http = self._http
        assert http is not None
        timeout = httpx.Timeout(self.timeout, read=LONG_POLL_READ_TIMEOUT_S)
        try:
            while True:
                response = await http.get(
                    self._session_url,
                    params={"maxev": "10", "rid": str(int(time.time() * 1000))},
                    timeout=timeout,
                )
                response.raise_for_status()
                answer = response.json()
                events = answer if isinstance(answer, list) else [answer]
                for event in events:
                    if isinstance(event, dict):
                        await self._on_event(event)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            if not self._closed:
                log.warning(
                    "janus.long_poll_failed", extra={"role": self.role, "error": repr(error)}
                )
            self._fail_pending(JanusError(f"janus event stream ended: {error!r}"))

    def _fail_pending(self, error: Exception) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)

    async def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("janus")
        if kind == "error":
            error = event.get("error") or {}
            self._fail_pending(JanusError(f"janus session error: {error.get('reason')}"))
            return
        transaction = event.get("transaction")
        future = self._pending.get(transaction) if isinstance(transaction, str) else None
        if future is not None and kind in ("event", "success") and not future.done():
            future.set_result(event)
            return
        if kind == "webrtcup":
            self.webrtc_up.set()
        elif kind == "trickle":
            await self._on_trickle(event.get("candidate") or {})
        elif kind in ("hangup", "detached"):
            log.info("janus.hangup", extra={"role": self.role, "reason": event.get("reason")})
        elif kind == "event":
            jsep = event.get("jsep") or {}
            if jsep.get("type") == "offer" and self.role == "subscriber" and not self._closed:
                self._spawn(self._renegotiate(jsep["sdp"]))

    async def _on_trickle(self, candidate: Mapping[str, Any]) -> None:
        pc = self._pc
        line = candidate.get("candidate")
        if pc is None or not isinstance(line, str) or candidate.get("completed"):
            return
        parsed = candidate_from_sdp(
            line.split(":", 1)[1] if line.startswith("candidate:") else line
        )
        parsed.sdpMid = candidate.get("sdpMid")
        parsed.sdpMLineIndex = candidate.get("sdpMLineIndex")
        try:
            await pc.addIceCandidate(parsed)
        except Exception:
            log.exception("janus.trickle_failed", extra={"role": self.role})


SIGNALLING["janus"] = JanusSignalling

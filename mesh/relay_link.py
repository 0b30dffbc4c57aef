"""A node-to-node media link built from aiortc's ORTC objects, without SDP.

One `RelayLink` per node pair carries the raw RTP of any number of tracks in each direction
over one ICE transport and one DTLS-SRTP transport (no SCTP, no SDP, no m-lines). Each side
sends the other only a compact description (see `encode_description`), a JSON object such as

    {"v":1,"u":"Ab3d","p":"<22 chars>","f":"<base64 sha-256>","d":"s",
     "c":["<foundation> 1 udp <priority> 10.0.0.5 40123 typ host"],
     "t":[[2868917342,"room/alice:0","v",97,"VP8"],[1170334582,"room/alice:1","a",96,"opus"]]}

* `u`/`p`: ICE usernameFragment and password; `c`: the host candidates (no STUN, no TURN:
  candidates come from the addresses `node.media.adapter.set_host_addresses` configured).
* `f`: the DTLS certificate's SHA-256 fingerprint (base64, 44 characters instead of 95).
* `d`: the sender's DTLS role, "s" (server) or "c" (client).
* `t`: what the sender sends: [SSRC, track id, kind "a"/"v", payload type, codec name].

Roles are fixed by the node names, so glare cannot happen: the node whose name sorts first
(`is_controlling`) is ICE-controlling and therefore, by aiortc's ORTC rule for a DTLS role of
"auto" (`RTCDtlsTransport.start`), the DTLS server; the other is ICE-controlled and DTLS
client. Each side checks that the other claims the opposite role.

Tracks can be added and removed after the link is up without touching ICE or DTLS: the
sender starts an `RTCRtpSender` on the existing transport at once and sends the peer a new
description (only `t` matters; `apply_remote_tracks` registers receivers for new SSRCs and
stops those that disappeared). Packets of an SSRC the receiver does not know yet are dropped.

Sending uses `node.media.adapter.tap_sender` (the `SenderTap.write` hot path, RTP history
for NACK answers, PLI -> `on_keyframe_request`); receiving uses `adapter.tap_rtp` (raw RTP,
NACK generation for video, receiver reports, REMB; nothing depayloaded or decoded).

Two private aiortc accesses are needed (ICE role of an ORTC ICE transport; the RTCP SSRC
of an ORTC receiver): both live in `node.media.adapter` (`set_ice_controlling`,
`set_rtcp_ssrc`) and are checked at start-up with the rest.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from aiortc import (
    RTCCertificate,
    RTCDtlsFingerprint,
    RTCDtlsParameters,
    RTCDtlsTransport,
    RTCIceGatherer,
    RTCIceParameters,
    RTCIceTransport,
    RTCRtpReceiver,
    RTCRtpSender,
)
from aiortc.rtcrtpparameters import (
    RTCRtcpFeedback,
    RTCRtcpParameters,
    RTCRtpCodecCapability,
    RTCRtpCodecParameters,
    RTCRtpDecodingParameters,
    RTCRtpHeaderExtensionParameters,
    RTCRtpReceiveParameters,
    RTCRtpSendParameters,
)
from aiortc.rtp import RtpPacket
from aiortc.sdp import candidate_from_sdp, candidate_to_sdp

from node.media import adapter
from node.media.adapter import RtpTap, SenderTap

log = logging.getLogger(__name__)

DESCRIPTION_VERSION: Final = 1
#: an encoded description must not be longer than this (Serf messages stay under ~1 KB)
MAX_DESCRIPTION_BYTES: Final = 1000
MAX_CANDIDATES: Final = 8
MAX_CANDIDATE_CHARS: Final = 160
MAX_TRACK_ID_CHARS: Final = 64
MAX_TRACKS: Final = 64
CONNECT_TIMEOUT_S: Final = 15.0

_ICE_CHARS: Final = re.compile(r"[A-Za-z0-9+/]+")
_TRACK_ID: Final = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces
_KINDS: Final = {"a": "audio", "v": "video"}
_KIND_CODES: Final = {kind: code for code, kind in _KINDS.items()}
_FIELDS: Final = ("v", "u", "p", "f", "d", "c", "t")


@dataclass(frozen=True)
class _Codec:
    kind: str
    mime_type: str
    clock_rate: int
    channels: int | None = None
    parameters: Mapping[str, str | int] = field(default_factory=dict)

    def capability(self) -> RTCRtpCodecCapability:
        return RTCRtpCodecCapability(
            mimeType=self.mime_type,
            clockRate=self.clock_rate,
            channels=self.channels,
            parameters=dict(self.parameters),
        )


_VIDEO_FEEDBACK: Final = (
    RTCRtcpFeedback(type="nack"),
    RTCRtcpFeedback(type="nack", parameter="pli"),
    RTCRtcpFeedback(type="goog-remb"),
)

#: codec names a description may carry (what aiortc itself can packetise / forward)
CODECS: Final[Mapping[str, _Codec]] = {
    "VP8": _Codec("video", "video/VP8", 90000),
    "H264": _Codec(
        "video",
        "video/H264",
        90000,
        parameters={"packetization-mode": "1", "level-asymmetry-allowed": "1"},
    ),
    "opus": _Codec("audio", "audio/opus", 48000, channels=2),
    "PCMU": _Codec("audio", "audio/PCMU", 8000, channels=1),
    "PCMA": _Codec("audio", "audio/PCMA", 8000, channels=1),
    "G722": _Codec("audio", "audio/G722", 8000, channels=1),
}

#: the same ids on every sender and receiver of a link: the DTLS transport keeps one map.
#: No MID (the link routes by SSRC); abs-send-time feeds the receiver's REMB estimator.
HEADER_EXTENSIONS: Final = (
    RTCRtpHeaderExtensionParameters(id=2, uri="urn:ietf:params:rtp-hdrext:ssrc-audio-level"),
    RTCRtpHeaderExtensionParameters(
        id=3, uri="http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"
    ),
)


def is_controlling(local_node: str, remote_node: str) -> bool:
    """The deterministic role rule: the node whose name sorts first controls ICE (and is
    therefore the DTLS server)."""
    if local_node == remote_node:
        raise ValueError(f"a relay link needs two different nodes, got {local_node!r} twice")
    return local_node < remote_node


def codec_parameters(name: str, payload_type: int) -> RTCRtpCodecParameters:
    """aiortc codec parameters for a codec name of a description."""
    spec = CODECS[name]
    return RTCRtpCodecParameters(
        mimeType=spec.mime_type,
        clockRate=spec.clock_rate,
        channels=spec.channels,
        payloadType=payload_type,
        rtcpFeedback=list(_VIDEO_FEEDBACK) if spec.kind == "video" else [],
        parameters=dict(spec.parameters),
    )


# --------------------------------------------------------------------------- description


@dataclass(frozen=True)
class TrackInfo:
    """One track a side of the link sends: its SSRC, the mesh-wide track id and codec."""

    ssrc: int
    track_id: str
    kind: str
    payload_type: int
    codec: str

    def wire(self) -> list[int | str]:
        return [self.ssrc, self.track_id, _KIND_CODES[self.kind], self.payload_type, self.codec]


@dataclass(frozen=True)
class RelayDescription:
    """What one side of a link tells the other (validated)."""

    ice_ufrag: str
    ice_password: str
    fingerprint_sha256: bytes
    dtls_role: str  # "server" | "client"
    candidates: tuple[str, ...]
    tracks: tuple[TrackInfo, ...]

    def wire(self) -> dict[str, Any]:
        return {
            "v": DESCRIPTION_VERSION,
            "u": self.ice_ufrag,
            "p": self.ice_password,
            "f": base64.b64encode(self.fingerprint_sha256).decode("ascii"),
            "d": "s" if self.dtls_role == "server" else "c",
            "c": list(self.candidates),
            "t": [track.wire() for track in self.tracks],
        }

    @property
    def fingerprint_hex(self) -> str:
        """The fingerprint as DTLS compares it (upper-case hex pairs joined by colons)."""
        return ":".join(f"{b:02X}" for b in self.fingerprint_sha256)


def _string(value: object, name: str, pattern: re.Pattern[str], low: int, high: int) -> str:
    if not isinstance(value, str):
        raise ValueError(f"relay description: {name} must be a string, got {type(value).__name__}")
    if not low <= len(value) <= high:
        raise ValueError(f"relay description: {name} must be {low}-{high} characters long")
    if not pattern.fullmatch(value):
        raise ValueError(f"relay description: {name} has characters that are not allowed")
    return value


def _integer(value: object, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"relay description: {name} must be an integer")
    if not low <= value <= high:
        raise ValueError(f"relay description: {name} must be in {low}..{high}, got {value}")
    return value


def _candidate(value: object, index: int) -> str:
    name = f"candidate {index}"
    if not isinstance(value, str):
        raise ValueError(f"relay description: {name} must be a string")
    if len(value) > MAX_CANDIDATE_CHARS:
        raise ValueError(f"relay description: {name} is longer than {MAX_CANDIDATE_CHARS}")
    bits = value.split()
    if len(bits) < 8 or bits[6] != "typ":
        raise ValueError(f"relay description: {name} is not an ICE candidate: {value!r}")
    try:
        candidate = candidate_from_sdp(value)
    except (AssertionError, ValueError, IndexError) as exc:
        raise ValueError(f"relay description: {name} is not an ICE candidate: {value!r}") from exc
    if candidate.component != 1 or candidate.protocol.lower() not in ("udp", "tcp"):
        raise ValueError(f"relay description: {name} must be RTP component 1 over udp/tcp")
    if not 0 < candidate.port < 65536:
        raise ValueError(f"relay description: {name} has a bad port")
    return value


def parse_track(value: object, index: int) -> TrackInfo:
    """One validated track entry ([ssrc, id, kind, payload type, codec])."""
    name = f"track {index}"
    if not isinstance(value, list) or len(value) != 5:
        raise ValueError(
            f"relay description: {name} must be [ssrc, track id, kind, payload type, codec]"
        )
    ssrc = _integer(value[0], f"{name} ssrc", 1, 0xFFFFFFFF)
    track_id = _string(value[1], f"{name} id", _TRACK_ID, 1, MAX_TRACK_ID_CHARS)
    kind_code = value[2]
    if not isinstance(kind_code, str) or kind_code not in _KINDS:
        raise ValueError(f'relay description: {name} kind must be "a" or "v"')
    payload_type = _integer(value[3], f"{name} payload type", 0, 127)
    if 72 <= payload_type <= 76:
        raise ValueError(f"relay description: {name} payload type {payload_type} clashes with RTCP")
    codec = value[4]
    if not isinstance(codec, str) or codec not in CODECS:
        raise ValueError(
            f"relay description: {name} codec must be one of {', '.join(CODECS)}, got {codec!r}"
        )
    kind = _KINDS[kind_code]
    if CODECS[codec].kind != kind:
        raise ValueError(f"relay description: {name} codec {codec} is not {kind}")
    return TrackInfo(ssrc, track_id, kind, payload_type, codec)


def parse_description(value: object) -> RelayDescription:
    """Validate a decoded description (a dict); ValueError says what is wrong."""
    if not isinstance(value, dict):
        raise ValueError("relay description must be a JSON object")
    missing = [key for key in _FIELDS if key not in value]
    if missing:
        raise ValueError(f"relay description: missing field(s) {', '.join(missing)}")
    unknown = sorted(str(key) for key in value if key not in _FIELDS)
    if unknown:
        raise ValueError(f"relay description: unknown field(s) {', '.join(unknown)}")
    if value["v"] != DESCRIPTION_VERSION or isinstance(value["v"], bool):
        raise ValueError(f"relay description: unsupported version {value['v']!r}")
    ufrag = _string(value["u"], "ICE usernameFragment (u)", _ICE_CHARS, 4, 256)
    password = _string(value["p"], "ICE password (p)", _ICE_CHARS, 22, 256)
    encoded = value["f"]
    if not isinstance(encoded, str):
        raise ValueError("relay description: fingerprint (f) must be a base64 string")
    try:
        fingerprint = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("relay description: fingerprint (f) is not valid base64") from exc
    if len(fingerprint) != 32:
        raise ValueError("relay description: fingerprint (f) must be a SHA-256 digest (32 bytes)")
    role = value["d"]
    if role not in ("s", "c"):
        raise ValueError('relay description: DTLS role (d) must be "s" or "c"')
    candidates = value["c"]
    if not isinstance(candidates, list):
        raise ValueError("relay description: candidates (c) must be a list")
    if not 1 <= len(candidates) <= MAX_CANDIDATES:
        raise ValueError(f"relay description: 1-{MAX_CANDIDATES} candidates (c) are needed")
    tracks = value["t"]
    if not isinstance(tracks, list):
        raise ValueError("relay description: tracks (t) must be a list")
    if len(tracks) > MAX_TRACKS:
        raise ValueError(f"relay description: more than {MAX_TRACKS} tracks (t)")
    parsed_tracks = tuple(parse_track(track, index) for index, track in enumerate(tracks))
    if len({track.ssrc for track in parsed_tracks}) != len(parsed_tracks):
        raise ValueError("relay description: two tracks share an SSRC")
    if len({track.track_id for track in parsed_tracks}) != len(parsed_tracks):
        raise ValueError("relay description: two entries share a track id")
    return RelayDescription(
        ice_ufrag=ufrag,
        ice_password=password,
        fingerprint_sha256=fingerprint,
        dtls_role="server" if role == "s" else "client",
        candidates=tuple(_candidate(c, index) for index, c in enumerate(candidates)),
        tracks=parsed_tracks,
    )


def encode_description(description: Mapping[str, Any] | RelayDescription) -> bytes:
    """Compact JSON (UTF-8) of a validated description; ValueError if it is invalid or
    longer than `MAX_DESCRIPTION_BYTES`."""
    parsed = (
        description
        if isinstance(description, RelayDescription)
        else parse_description(dict(description))
    )
    data = json.dumps(parsed.wire(), separators=(",", ":"), ensure_ascii=True).encode()
    if len(data) > MAX_DESCRIPTION_BYTES:
        raise ValueError(
            f"relay description is {len(data)} bytes, more than {MAX_DESCRIPTION_BYTES} "
            f"({len(parsed.tracks)} tracks, {len(parsed.candidates)} candidates)"
        )
    return data


def decode_description(data: bytes | str) -> dict[str, Any]:
    """Parse and validate an encoded description; ValueError on anything wrong with it."""
    size = len(data.encode() if isinstance(data, str) else data)
    if size > MAX_DESCRIPTION_BYTES:
        raise ValueError(f"relay description is {size} bytes, more than {MAX_DESCRIPTION_BYTES}")
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"relay description is not JSON: {exc}") from exc
    return parse_description(value).wire()


# --------------------------------------------------------------------------- the link


@dataclass(eq=False)
class RemoteTrack:
    """A track the peer sends over the link, received raw through `tap`."""

    info: TrackInfo
    receiver: RTCRtpReceiver
    tap: RtpTap

    @property
    def ssrc(self) -> int:
        return self.info.ssrc

    @property
    def track_id(self) -> str:
        return self.info.track_id


@dataclass(eq=False)
class LocalTrack:
    """A track this side sends over the link through `tap` (a tapped RTCRtpSender)."""

    info: TrackInfo
    sender: RTCRtpSender
    tap: SenderTap


#: called for every raw RTP packet received over the link, with the track it belongs to
RtpCallback = Callable[[RemoteTrack, RtpPacket], Awaitable[None]]
#: called once when the link ends (closed, ICE or DTLS failure), with a reason
EndedCallback = Callable[[str], None]


class RelayLink:
    """One media link between two nodes (see the module docstring)."""

    def __init__(
        self,
        controlling: bool,
        on_rtp: RtpCallback,
        on_ended: EndedCallback | None = None,
    ) -> None:
        self.controlling = controlling
        self._on_rtp = on_rtp
        self._on_ended = on_ended
        self._gatherer = RTCIceGatherer(iceServers=[])  # no STUN: host candidates only
        self._ice = RTCIceTransport(self._gatherer)
        adapter.set_ice_controlling(self._ice, controlling)
        self._dtls = RTCDtlsTransport(self._ice, [RTCCertificate.generateCertificate()])
        self._dtls.on("statechange", self._dtls_state_changed)
        self._ice.on("statechange", self._ice_state_changed)
        self._cname = secrets.token_hex(8)
        #: the SSRC this side's receivers send RTCP (RR, NACK, PLI, REMB) from
        self._rtcp_ssrc = secrets.randbits(32) or 1
        self.local_tracks: dict[str, LocalTrack] = {}
        self.remote_tracks: dict[int, RemoteTrack] = {}
        self.connected = False
        self.closed = False
        self.ended_reason: str | None = None

    @property
    def dtls_role(self) -> str:
        """aiortc's ORTC rule for role "auto": ICE-controlling -> DTLS server."""
        return "server" if self.controlling else "client"

    @property
    def ice_state(self) -> str:
        return self._ice.state

    @property
    def dtls_state(self) -> str:
        return self._dtls.state

    # ---------------------------------------------------------------- description

    async def local_description(self) -> dict[str, Any]:
        """This side's compact description (gathers host candidates the first time)."""
        await self._gatherer.gather()
        ice = self._gatherer.getLocalParameters()
        fingerprint = next(
            f for f in self._dtls.getLocalParameters().fingerprints if f.algorithm == "sha-256"
        )
        candidates = tuple(candidate_to_sdp(c) for c in self._gatherer.getLocalCandidates())
        if not candidates:
            raise RuntimeError(
                "the relay link gathered no ICE candidates: configure host addresses "
                "(node.media.adapter.set_host_addresses)"
            )
        description = RelayDescription(
            ice_ufrag=ice.usernameFragment or "",
            ice_password=ice.password or "",
            fingerprint_sha256=bytes.fromhex(fingerprint.value.replace(":", "")),
            dtls_role=self.dtls_role,
            candidates=candidates,
            tracks=tuple(track.info for track in self.local_tracks.values()),
        )
        encode_description(description)  # validates and checks the size
        return description.wire()

    # ---------------------------------------------------------------- tracks

    async def add_track(self, track_id: str, kind: str, codec: str, payload_type: int) -> SenderTap:
        """Declare a track this side sends; returns the handle to write its raw RTP with.

        Before `connect` the track goes into the next `local_description`; afterwards the
        sender starts at once and the peer must get a fresh description (`apply_remote_tracks`
        on its side) before it accepts the packets: no ICE/DTLS renegotiation.
        """
        if self.closed:
            raise RuntimeError("the relay link is closed")
        if track_id in self.local_tracks:
            raise ValueError(f"track {track_id!r} is already on the link")
        if kind not in _KIND_CODES:
            raise ValueError(f"kind must be audio or video, got {kind!r}")
        sender = RTCRtpSender(kind, self._dtls)
        tap = adapter.tap_sender(sender)
        info = parse_track([tap.ssrc, track_id, _KIND_CODES[kind], payload_type, codec], 0)
        self.local_tracks[track_id] = LocalTrack(info, sender, tap)
        if self.connected:
            await self._start_sender(self.local_tracks[track_id])
        return tap

    async def remove_track(self, track_id: str) -> None:
        """Stop sending a track (its sender's RTCP BYE tells the peer)."""
        track = self.local_tracks.pop(track_id, None)
        if track is not None:
            await self._stop_sender(track)

    async def _start_sender(self, track: LocalTrack) -> None:
        parameters = RTCRtpSendParameters(
            codecs=[codec_parameters(track.info.codec, track.info.payload_type)],
            headerExtensions=list(HEADER_EXTENSIONS),
            muxId="",
            rtcp=RTCRtcpParameters(cname=self._cname, mux=True, ssrc=track.tap.ssrc),
        )
        await track.sender.send(parameters)

    async def _stop_sender(self, track: LocalTrack) -> None:
        sender_track = track.sender.track
        try:
            await track.sender.stop()
        finally:
            if sender_track is not None:
                sender_track.stop()

    async def apply_remote_tracks(self, remote: Mapping[str, Any] | RelayDescription) -> None:
        """Receive exactly the tracks a (new) peer description lists: start receivers for
        new SSRCs, stop those no longer listed. ICE and DTLS are not touched."""
        description = (
            remote if isinstance(remote, RelayDescription) else parse_description(dict(remote))
        )
        await self.set_remote_tracks(description.tracks)

    async def set_remote_tracks(self, tracks: Iterable[TrackInfo]) -> None:
        """Receive exactly `tracks` (the peer's whole list after a `tracks` update)."""
        wanted = {track.ssrc: track for track in tracks}
        for ssrc in [s for s, t in self.remote_tracks.items() if wanted.get(s) != t.info]:
            await self.remote_tracks.pop(ssrc).receiver.stop()
        for ssrc, info in wanted.items():
            if ssrc not in self.remote_tracks:
                await self._start_receiver(info)

    async def _start_receiver(self, info: TrackInfo) -> None:
        receiver = RTCRtpReceiver(info.kind, self._dtls)
        adapter.set_rtcp_ssrc(receiver, self._rtcp_ssrc)
        remote: RemoteTrack

        async def handler(packet: RtpPacket) -> None:
            await self._on_rtp(remote, packet)

        tap = adapter.tap_rtp(receiver, handler)
        remote = RemoteTrack(info, receiver, tap)
        self.remote_tracks[info.ssrc] = remote
        await receiver.receive(
            RTCRtpReceiveParameters(
                codecs=[codec_parameters(info.codec, info.payload_type)],
                headerExtensions=list(HEADER_EXTENSIONS),
                muxId="",
                rtcp=RTCRtcpParameters(mux=True, ssrc=info.ssrc),
                encodings=[RTCRtpDecodingParameters(ssrc=info.ssrc, payloadType=info.payload_type)],
            )
        )

    async def request_keyframe(self, track_id: str) -> bool:
        """Send a PLI over the link for a received track (the peer's `SenderTap`
        `on_keyframe_request` fires). False if the track is unknown or not started."""
        for remote in self.remote_tracks.values():
            if remote.track_id == track_id:
                return await adapter.request_keyframe(remote.receiver, remote.ssrc)
        return False

    # ---------------------------------------------------------------- connection

    async def connect(self, remote: Mapping[str, Any], within_s: float = CONNECT_TIMEOUT_S) -> None:
        """Connect to the peer described by `remote` (ICE, then DTLS), then start the
        receivers of its tracks and the senders of ours. ValueError on a bad description
        (or one claiming the same role as ours); ConnectionError when ICE or DTLS fails."""
        if self.closed:
            raise RuntimeError("the relay link is closed")
        if self.connected:
            raise RuntimeError("the relay link is already connected")
        description = parse_description(dict(remote))
        if description.dtls_role == self.dtls_role:
            raise ValueError(
                f"both sides of the relay link claim the DTLS {self.dtls_role} role "
                "(the role rule must give the two nodes opposite roles)"
            )
        await self._gatherer.gather()
        try:
            await asyncio.wait_for(self._connect(description), within_s)
        except TimeoutError as exc:
            raise ConnectionError(f"the relay link did not connect within {within_s} s") from exc

    async def _connect(self, description: RelayDescription) -> None:
        for line in description.candidates:
            await self._ice.addRemoteCandidate(candidate_from_sdp(line))
        await self._ice.addRemoteCandidate(None)
        await self._ice.start(
            RTCIceParameters(
                usernameFragment=description.ice_ufrag, password=description.ice_password
            )
        )
        if self._ice.state != "completed":
            raise ConnectionError(f"ICE failed (state {self._ice.state})")
        await self._dtls.start(
            RTCDtlsParameters(
                fingerprints=[
                    RTCDtlsFingerprint(algorithm="sha-256", value=description.fingerprint_hex)
                ],
                role=description.dtls_role,
            )
        )
        if self._dtls.state != "connected":
            raise ConnectionError(f"DTLS failed (state {self._dtls.state})")
        self.connected = True
        # Receivers first, so that the peer's first packets find them.
        await self.apply_remote_tracks(description)
        for track in self.local_tracks.values():
            await self._start_sender(track)

    def _dtls_state_changed(self) -> None:
        if self._dtls.state in ("closed", "failed"):
            self._ended(f"dtls-{self._dtls.state}")

    def _ice_state_changed(self) -> None:
        if self._ice.state == "failed":
            self._ended("ice-failed")

    def _ended(self, reason: str) -> None:
        if self.ended_reason is None:
            self.ended_reason = reason
            log.info("mesh.relay_link_ended", extra={"reason": reason})
            if self._on_ended is not None:
                self._on_ended(reason)

    async def close(self) -> None:
        """Stop every sender and receiver, then DTLS and ICE. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for track in list(self.local_tracks.values()):
            try:
                await self._stop_sender(track)
            except Exception:
                log.exception("relay link: stopping a sender failed")
        for remote in list(self.remote_tracks.values()):
            try:
                await remote.receiver.stop()
            except Exception:
                log.exception("relay link: stopping a receiver failed")
        self.remote_tracks.clear()
        await self._dtls.stop()
        await self._ice.stop()
        self._ended("closed")

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
* `t`: what the sender sends: [SSRC, track id, kind "a"/"v", payload type, codec name]. Each
  layer of a simulcast track is an entry of its own ("<track id>~L", `node.relay.manager`).

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

Setup under loss (issue 22): with `setup_rto_s` the link's ICE checks and DTLS flights are
sent again after that long without an answer, doubling (`adapter.hasten_ice_checks`,
`adapter.DtlsFlightResender`), instead of aioice's 0.5 s and OpenSSL's 1 s: at 2% loss on a
35 ms path a handshake loses a packet about one time in ten, and each such loss cost 0.5-1 s
of setup.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
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

from mesh.relay_description import (
    CODEC_KINDS,
    KIND_CODES,
    RelayDescription,
    TrackInfo,
    parse_description,
    parse_track,
)
from node.media import adapter
from node.media.adapter import RtpTap, SenderTap

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S: Final = 15.0


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


assert set(CODECS) == set(CODEC_KINDS), "every codec a description names has parameters here"


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
RtpCallback = Callable[[RemoteTrack, RtpPacket], None]
#: called once when the link ends (closed, ICE or DTLS failure), with a reason
EndedCallback = Callable[[str], None]


class RelayLink:
    """One media link between two nodes (see the module docstring)."""

    def __init__(
        self,
        controlling: bool,
        on_rtp: RtpCallback,
        on_ended: EndedCallback | None = None,
        setup_rto_s: float | None = None,
    ) -> None:
        """`setup_rto_s`: the first retransmission time of ICE checks and DTLS flights
        (None: aioice's and OpenSSL's own, 0.5 s and 1 s)."""
        self.controlling = controlling
        self.setup_rto_s = setup_rto_s
        self._resender: adapter.DtlsFlightResender | None = None
        #: Test hook: given to the DTLS flight resender (`DtlsFlightResender.drop`): DTLS
        #: datagrams it returns True for are lost on the way. Never set in production.
        self.setup_loss: Callable[[bytes], bool] | None = None
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
        #: monotonic times of the setup phases (`connect`): started, ICE completed, DTLS up
        self.connect_started_at: float | None = None
        self.ice_done_at: float | None = None
        self.dtls_done_at: float | None = None
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
        """This side's compact description (gathers host candidates the first time), with
        every local track: it may be longer than one Serf message (see `fit_description`)."""
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
        # Validated, but not held to the message size: with many tracks the whole list does
        # not fit in one Serf message, and the manager sends what fits in the offer or answer
        # (`mesh.relay_signal.fit_description`) and the rest as `tracks` updates.
        wire = description.wire()
        parse_description(wire)
        return wire

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
        if kind not in KIND_CODES:
            raise ValueError(f"kind must be audio or video, got {kind!r}")
        sender = RTCRtpSender(kind, self._dtls)
        tap = adapter.tap_sender(sender)
        info = parse_track([tap.ssrc, track_id, KIND_CODES[kind], payload_type, codec], 0)
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

        def handler(packet: RtpPacket) -> None:
            self._on_rtp(remote, packet)

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
        self.connect_started_at = time.monotonic()
        await self._gatherer.gather()
        if self.setup_rto_s:
            adapter.hasten_ice_checks(self._ice, self.setup_rto_s)
            self._resender = adapter.DtlsFlightResender(self._dtls, self.setup_rto_s)
            self._resender.drop = self.setup_loss
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
        self.ice_done_at = time.monotonic()
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
        self.dtls_done_at = time.monotonic()
        self.connected = True
        # Receivers first, so that the peer's first packets find them.
        await self.apply_remote_tracks(description)
        for track in self.local_tracks.values():
            await self._start_sender(track)

    @property
    def dtls_seen(self) -> frozenset[bytes]:
        """The peer's DTLS handshake datagrams this side received (each once)."""
        return frozenset() if self._resender is None else frozenset(self._resender.seen)

    @property
    def dtls_resent(self) -> int:
        """DTLS handshake datagrams sent again before OpenSSL's own timer would have."""
        return 0 if self._resender is None else self._resender.resent

    def setup_phases_ms(self, opened_at: float) -> dict[str, float] | None:
        """How the setup time splits, in ms: `signalling` (from `opened_at`, when the
        relay was asked for, until the peer's description was in hand and `connect`
        began), `ice` (gathering and checks until completed) and `dtls` (handshake until
        connected). None until the link is up."""
        started, ice, dtls = self.connect_started_at, self.ice_done_at, self.dtls_done_at
        if started is None or ice is None or dtls is None:
            return None
        return {
            "signalling": round((started - opened_at) * 1000, 1),
            "ice": round((ice - started) * 1000, 1),
            "dtls": round((dtls - ice) * 1000, 1),
        }

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
        if self._resender is not None:
            self._resender.uninstall()
        await self._dtls.stop()
        await self._ice.stop()
        self._ended("closed")

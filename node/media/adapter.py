"""The one module allowed to touch aiortc / aioice private attributes (aiortc==1.16.0).

Everything the node needs from aiortc's internals goes through the small functions and
classes here, so that an aiortc upgrade breaks in one place, and `check_aiortc()` (called at
start-up) refuses to run with a clear message when something this module relies on is gone.

What is tapped, and why (read from aiortc 1.16.0's source):

* Receive side (T1, raw RTP). `RTCDtlsTransport` decrypts SRTP, parses the packet and awaits
  `receiver._handle_rtp_packet(packet, arrival_time_ms)`. aiortc's version then feeds the
  bandwidth estimator (REMB), RTCP statistics, unwraps RTX, generates NACKs, depayloads the
  codec payload, runs a jitter buffer and puts complete frames on the decoder queue.
  `tap_rtp()` replaces that method on the instance with a copy of the first half (REMB,
  statistics for receiver reports, RTX unwrap, NACK generation) that hands the raw packet to
  the node instead of depayloading it: no depayload, no jitter buffer, nothing queued to a
  decoder. aiortc's own RTCP task (`_run_rtcp`, receiver reports) keeps running from the
  statistics we feed. Not kept: `getSynchronizationSources()` data (costs a datetime per
  packet) and the jitter buffer's own PLI on a frame gap (the SFU asks for keyframes itself).
* Receive fast path (issue 19). aiortc hands every datagram through an `asyncio.Queue`:
  aioice's `StunProtocol.datagram_received` first tries to parse it as STUN (an exception
  per RTP packet), `Connection.data_received` queues it, and the DTLS transport's reader
  task wakes up on the next loop turn and awaits four coroutine layers before the packet
  reaches the receiver. On a transport whose receivers are tapped, `RtpTap` installs
  `_FastReceive` (once per DTLS transport): SRTP packets (not SRTCP) that arrive while the
  DTLS transport is connected are handled at once, synchronously, in the datagram callback:
  the same byte/packet counters, `_rx_srtp.unprotect`, `RtpPacket.parse`, the router, then
  the tap's `on_packet` (REMB and NACKs it sends are scheduled, not awaited). The STUN
  parse is skipped for datagrams whose first byte says RTP/RTCP (RFC 7983), which STUN
  cannot have, and the rest of a burst (a video frame's packets) is read in the same
  callback from a duplicate of the socket (`TransportSocket.dup`, closed with the
  transport) instead of one event-loop turn per datagram (asyncio reads one per turn).
  Everything else (STUN, DTLS, SRTCP, packets before the handshake) takes aiortc's own
  path, so receiver reports, NACK answers and the DTLS resender are unchanged.
  A packet routed to an untapped receiver (none on a node) is handed to its own coroutine.
<<<<<<< HEAD
* The REMB estimator (issue 19, `lighten_estimator`, on every tapped receiver). aiortc's
  `RemoteBitrateEstimator` runs per received packet; two of its parts cost time that grows
  with the gap between packets or with its history, not with the work: the incoming-bitrate
  `RateCounter` keeps one bucket per millisecond and walks every millisecond since the
  previous packet (twice per packet: `rate` then `add`; ~17 steps per packet for a 58
  packets/s relayed track), and `OveruseEstimator.update_min_frame_period` takes the minimum
  of its last 60 frame deltas with a Python loop per frame. `_WindowRate` keeps the same
  1000 ms window as a queue of (ms, bytes) and `_min_frame_period` uses the built-in `min`:
  the same figures (the same REMB), checked side by side with aiortc's in the tests.
=======
* Arrival stamps (issue 18, benches' clients only: `stamp_arrivals()`). A bench client that
  receives dozens of streams on one busy core handles a datagram well after it arrived; a
  latency read from the clock in its handler counts that backlog. In a process that stamps
  arrivals, the fast path's datagram callback asks the kernel when each datagram was
  received (`ioctl(SIOCGSTAMPNS)` on the socket right after it is read) and the tap handler
  reads it (`arrival_time()`) while that packet is handled. Nodes never turn it on.
>>>>>>> scale
* `RTCRtpReceiver.receive()` always starts a decoder thread. `tap_rtp()` also replaces
  `receive` on the instance with a copy that registers the receiver with its transport and
  starts the RTCP task, but starts no decoder thread. As belt and braces the decoder queue is
  replaced by one that counts (in `CODEC_WORK`) and drops anything put on it.
  Consequence: the node-side `RemoteStreamTrack` never yields frames nor ends by itself (its
  end is signalled by aiortc's decoder thread, which never runs); the node learns that a
  track ended from the peer connection / transceiver state instead.
* Send side. A sender whose track is `None` polls every 20 ms; `tap_sender()` gives it a
  `ParkedTrack` whose `recv()` waits until stopped, so the sender's RTP loop stays parked and
  never creates an encoder. `SenderTap.write()` is the forwarding hot path, synchronous: it
  packs the RTP header and the one-byte header extensions (MID, abs-send-time, audio level,
  with ids from the sender's negotiated map) itself instead of building an `RtpPacket` and
  serialising it, SRTP-protects with the DTLS transport's `_tx_srtp` and writes to the
  nominated ICE pair's socket directly, instead of awaiting the `_send_rtp` -> ICE `send` ->
  `sendto` -> `send_data` coroutine chain (measured: ~21 -> ~14 us per forwarded copy). It
  keeps the DTLS transport's byte/packet counters and the sender-report counters right and
  stores a light `_Kept` record in the sender's RTP history, which aiortc's `_retransmit`
  serialises (RTX-wrapped when negotiated) only when a subscriber NACKs it; `_retransmit`
  is wrapped on the instance only to count the NACKed sequence numbers and the answers.
  `SenderTap.drop` is a test hook: it simulates loss on the way to the subscriber after the
  packet entered the history (None, the default, in production). A subscriber's PLI/FIR
  calls `sender._send_keyframe()` (which only sets a flag the pack path never reads):
  replaced on the instance by a callback. A subscriber's REMB sets `encoder.target_bitrate`:
  the encoder slot holds a counting wrapper that records it.
* Simulcast (issue 14). aiortc offers and accepts only the MID and abs-send-time header
  extensions for video; `enable_simulcast_extensions()` adds rtp-stream-id and
  repaired-rtp-stream-id to its `HEADER_EXTENSIONS` table (which its answers intersect with
  the offer), so a browser may send its encodings with their RIDs. A simulcast publisher
  signals no SSRCs: the tap learns each encoding's SSRC from the first packet that carries
  its RID (and an RTX SSRC from the repaired RID), keeps one NACK generator per SSRC
  (aiortc's follows a single sequence) and tells the node the layer (`on_layer`). aiortc's
  `RtpRouter.route_rtp` routes an unknown SSRC only by payload type, which two video tracks
  of one codec share: the counting wrapper of `count_unrouted` routes it by the packet's MID
  extension then.
* RTX routing (issue 20, the three-node freezes): aiortc registers only a receiver's media
  SSRC with the router, never the RTX SSRC the remote description declares
  (`ssrc-group:FID`), so a connection receiving two video tracks drops every
  retransmission as ambiguous by payload type. `route_declared_rtx()` registers the declared
  RTX SSRCs too (clients, and the node's own connections).
* A simulcast *client* (issue 14: the benches' synthetic publisher, never the node):
  `tap_simulcast_sender()` makes one tapped sender send several encodings the way Chromium
  does, each on an SSRC of its own carrying its RID (rtp-stream-id) in every packet. aiortc
  knows one SSRC per sender: the layers' SSRCs are added to the DTLS transport's RTCP
  router (`RtpRouter.register_sender`) and the sender's `_handle_rtcp_packet` is wrapped
  on the instance, so a PLI/FIR or a NACK naming a layer's SSRC is answered for that layer
  (its own RTP history) and everything else goes on to aiortc.
* What a subscriber's receiver reports acknowledge (issue 14, probes on a silent link):
  aiortc keeps a report's loss, jitter and RTT but not its highest sequence number, and a
  probe of the downlink (`node.media.estimate`) must know the receiver heard the probe's
  packets: no NACK from a link that delivers nothing is no verdict. `SenderTap` wraps its
  sender's `_handle_rtcp_packet` on the instance and keeps `reported_sequence_number`.
* ICE: aioice's `get_host_addresses()` skips 127.0.0.1; `set_host_addresses()` replaces it
  (process-wide) with a fixed list, so loopback works and production nodes announce only the
  addresses they are configured with.
* NACK retries (issue 20, "why a packet stays unrepaired"): aiortc's receiver NACKs missing
  packets only when a packet arrives past a new gap (`NackGenerator.add`); a NACK or a
  retransmission that is lost too is asked for again only at the next gap, on average a
  second or more later at 2% loss and ~50 video packets/s, by which time the client's
  jitter buffer has stalled (the freezes over 2 s in the lab). `retry_nacks()` wraps a
  receiver's `_send_rtcp_nack` on the instance to note what was asked for, and asks again
  for what is still missing every `NACK_RETRY_S`, up to `NACK_RETRY_TRIES` times per packet.
  Node-side taps get it for video (`tap_rtp`); the shared participant uses it too.
* Setup timers of node-to-node relay links (issue 22): a lost packet during setup costs what
  the retransmission timer says, and aioice's STUN transactions start at a fixed 0.5 s
  (`stun.RETRY_RTO`), OpenSSL's DTLS handshake timer at 1 s, whatever the path. Neither is a
  parameter: `hasten_ice_checks()` gives one ICE transport's connectivity checks their own
  first retransmission time (a copy of `StunProtocol.request` that sets the `Transaction`'s
  first delay; consent checks keep aioice's timing), and `DtlsFlightResender` re-sends the
  last DTLS flight verbatim when no new datagram answers it within its own time (OpenSSL's
  timer cannot be shortened through pyOpenSSL: no `DTLS_set_timer_cb`). A verbatim copy
  carries the same record sequence numbers, so a peer that got the first copy drops it as a
  replay; a peer that did not processes it as the original.
* ICE consent (issue 20, the lost connections): aioice's `Connection.query_consent` sends a
  check every 4-6 s with no retransmission and a fixed 0.5 s wait, and closes the connection
  after 6 checks in a row without an answer in time. An answer that comes later than 0.5 s
  is thrown away, so a peer whose answers are slow (a round trip over 0.5 s, or, as in the
  lab, a loaded process whose socket holds a backlog of media ahead of the check) lost its
  connection about 30 s after the slowness began although it answered every check.
  `keep_consent()` (process-wide, idempotent: `check_aiortc` and `rtc_configuration` run
  it) replaces that method on the class with RFC 7675's rule: consent lapses
  `CONSENT_EXPIRY_S` (30 s) after the last authenticated answer, each check is re-sent on
  aioice's STUN timer (0.5 s, 1 s, 2 s) and its answer awaited 7.5 s. A dead peer is still
  given up after 30-40 s, now with a warning (`media.ice_consent_expired`); an answer aioice
  would have thrown away is logged (`media.ice_consent_late`, INFO).
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import ipaddress
import logging
import queue
import random
import secrets
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import aioice
import aioice.ice
import aioice.stun
import aiortc
import aiortc.codecs
import aiortc.jitterbuffer
import aiortc.rate
import aiortc.rtcdtlstransport
import aiortc.rtcicetransport
import aiortc.rtcpeerconnection
import aiortc.rtcrtpreceiver
import aiortc.rtcrtpsender
import pylibsrtp
from aiortc import RTCBundlePolicy, RTCConfiguration, RTCIceServer, RTCRtpReceiver, RTCRtpSender
from aiortc.codecs import get_encoder, is_rtx
from aiortc.codecs.base import Encoder
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rate import OveruseEstimator, RateCounter, RemoteBitrateEstimator
from aiortc.rtcrtpparameters import (
    RTCRtpCodecParameters,
    RTCRtpHeaderExtensionParameters,
    RTCRtpReceiveParameters,
    RTCRtpSendParameters,
)
from aiortc.rtcrtpreceiver import NackGenerator, StreamStatistics
from aiortc.rtp import (
    RTCP_PSFB_APP,
    RTCP_PSFB_FIR,
    RTCP_PSFB_PLI,
    RTCP_RTPFB_NACK,
    RTP_HISTORY_SIZE,
    HeaderExtensions,
    HeaderExtensionsMap,
    RtcpPsfbPacket,
    RtcpRrPacket,
    RtcpRtpfbPacket,
    RtcpSrPacket,
    RtpPacket,
    is_rtcp,
    pack_remb_fci,
    unwrap_rtx,
)
from av.frame import Frame
from av.packet import Packet

logger = logging.getLogger(__name__)

PINNED_AIORTC_VERSION: Final = "1.16.0"
PINNED_AIOICE_VERSION: Final = "0.13.0"

# Seconds between 1900-01-01 (NTP epoch) and 1970-01-01 (Unix epoch).
_NTP_UNIX_OFFSET: Final = 2_208_988_800

PacketHandler = Callable[[RtpPacket], None]
#: called with a reason ("unknown-ssrc", "unknown-payload-type", "bad-rtx", "unrouted") per
#: dropped packet
DropCallback = Callable[[str], None]


@dataclass
class CodecWork:
    """Frames the node itself handed to a decoder or an encoder. Forwarding keeps both 0."""

    decoded_frames: int = 0
    encoded_frames: int = 0

    @property
    def total(self) -> int:
        return self.decoded_frames + self.encoded_frames


#: Process-wide count of codec work done by node-side (tapped) receivers and senders.
CODEC_WORK = CodecWork()


# --------------------------------------------------------------------------- start-up check

_R = "_RTCRtpReceiver__"
_S = "_RTCRtpSender__"

# (owner, attribute, where): "member" = hasattr(owner, attribute) (methods, class attributes,
# module globals); "init" = an instance attribute assigned in owner.__init__ (name-mangled
# instance attributes are not visible on the class, so we read the names __init__ stores);
# "uses" = the global/attribute name is referenced by that function's code.
_REQUIRED: Final[tuple[tuple[Any, str, str], ...]] = (
    (RTCRtpReceiver, "receive", "member"),
    (RTCRtpReceiver, "_handle_rtp_packet", "member"),
    (RTCRtpReceiver, "_run_rtcp", "member"),
    (RTCRtpReceiver, "_send_rtcp", "member"),
    (RTCRtpReceiver, "_send_rtcp_nack", "member"),
    (RTCRtpReceiver, "_send_rtcp_pli", "member"),
    (RTCRtpReceiver, "_enabled", "init"),
    (RTCRtpReceiver, _R + "started", "init"),
    (RTCRtpReceiver, _R + "codecs", "init"),
    (RTCRtpReceiver, _R + "rtx_ssrc", "init"),
    (RTCRtpReceiver, _R + "transport", "init"),
    (RTCRtpReceiver, _R + "rtcp_task", "init"),
    (RTCRtpReceiver, _R + "rtcp_ssrc", "init"),
    (RTCRtpReceiver, _R + "remote_streams", "init"),
    (RTCRtpReceiver, _R + "remote_bitrate_estimator", "init"),
    (RTCRtpReceiver, _R + "nack_generator", "init"),
    (RTCRtpReceiver, _R + "decoder_queue", "init"),
    (RTCRtpReceiver, _R + "decoder_thread", "init"),
    (RTCRtpReceiver, _R + "jitter_buffer", "init"),
    (aiortc.jitterbuffer.JitterBuffer, "smart_remove", "member"),
    (aiortc.jitterbuffer.JitterBuffer, "_origin", "init"),
    (aiortc.jitterbuffer.JitterBuffer, "_packets", "init"),
    (aiortc.rtcrtpreceiver, "StreamStatistics", "member"),
    (StreamStatistics, "_clockrate", "init"),
    (StreamStatistics, "packets_lost", "member"),
    (StreamStatistics, "jitter", "member"),
    (aiortc.rtcrtpreceiver, "NackGenerator", "member"),
    (StreamStatistics, "add", "member"),
    (NackGenerator, "add", "member"),
    (NackGenerator, "missing", "init"),
    (RemoteBitrateEstimator, "add", "member"),
    # the REMB estimator's per-packet cuts (`lighten_estimator`)
    (RemoteBitrateEstimator, "incoming_bitrate", "init"),
    (RemoteBitrateEstimator, "estimator", "init"),
    (RemoteBitrateEstimator.add, "rate", "uses"),
    (RemoteBitrateEstimator.add, "reset", "uses"),
    (RateCounter, "rate", "member"),
    (RateCounter, "_scale", "init"),
    (RateCounter, "_window_size", "init"),
    (RateCounter.reset, "_total", "uses"),
    (aiortc.rate, "MIN_FRAME_PERIOD_HISTORY_LENGTH", "member"),
    (OveruseEstimator, "update_min_frame_period", "member"),
    (OveruseEstimator, "ts_delta_hist", "init"),
    (OveruseEstimator.update, "update_min_frame_period", "uses"),
    (RTCRtpSender, "send", "member"),
    (RTCRtpSender, "_send_keyframe", "member"),
    (RTCRtpSender, "_retransmit", "member"),
    (RTCRtpSender, "_ssrc", "init"),
    (RTCRtpSender, _S + "started", "init"),
    (RTCRtpSender, _S + "rtp_history", "init"),
    (RTCRtpSender, _S + "rtp_header_extensions_map", "init"),
    (RTCRtpSender, _S + "encoder", "init"),
    (RTCRtpSender, _S + "ntp_timestamp", "init"),
    (RTCRtpSender, _S + "rtp_timestamp", "init"),
    (RTCRtpSender, _S + "octet_count", "init"),
    (RTCRtpSender, _S + "packet_count", "init"),
    (RTCRtpSender, _S + "stats", "init"),
    (RTCRtpSender, _S + "rtx_payload_type", "init"),
    (RTCRtpSender._handle_rtcp_packet, "_send_keyframe", "uses"),
    (RTCRtpSender._handle_rtcp_packet, "target_bitrate", "uses"),
    (aiortc.rtcdtlstransport.RTCDtlsTransport, "_send_rtp", "member"),
    (aiortc.rtcdtlstransport.RTCDtlsTransport, "_register_rtp_receiver", "member"),
    (RTCRtpReceiver.receive, "_register_rtp_receiver", "uses"),
    (aiortc.rtcdtlstransport.RTCDtlsTransport, "_rtp_router", "init"),
    (aiortc.rtcdtlstransport.RtpRouter, "route_rtp", "member"),
    (aiortc.rtcdtlstransport.RTCDtlsTransport._handle_rtp_data, "route_rtp", "uses"),
    (aiortc.rtcdtlstransport.RTCDtlsTransport, "_tx_srtp", "init"),
    (aiortc.rtcdtlstransport.RTCDtlsTransport, "_state", "init"),
    (aiortc.rtcdtlstransport.RTCDtlsTransport, "_RTCDtlsTransport__tx_bytes", "init"),
    (aiortc.rtcdtlstransport.RTCDtlsTransport, "_RTCDtlsTransport__tx_packets", "init"),
    (aiortc.rtcdtlstransport.State, "CONNECTED", "member"),
    (aiortc.rtcicetransport.RTCIceTransport, "_connection", "init"),
    (HeaderExtensionsMap, "_HeaderExtensionsMap__ids", "init"),
    (RTCRtpSender._retransmit, "serialize", "uses"),
    (aioice.ice.Connection, "_nominated", "init"),
    (aioice.ice.Connection, "ice_controlling", "init"),
    (RTCRtpReceiver, "_set_rtcp_ssrc", "member"),
    (aioice.ice.CandidatePair, "protocol", "init"),
    (aioice.ice.CandidatePair, "remote_addr", "member"),
    (aioice.ice, "get_host_addresses", "member"),
    (aioice.ice.Connection.gather_candidates, "get_host_addresses", "uses"),
    (aiortc.RTCPeerConnection, "_RTCPeerConnection__localRtp", "member"),
    (aiortc.codecs, "HEADER_EXTENSIONS", "member"),
    (aiortc.rtcpeerconnection, "HEADER_EXTENSIONS", "member"),
    (aiortc.rtcpeerconnection.RTCPeerConnection.setRemoteDescription, "HEADER_EXTENSIONS", "uses"),
    (aiortc.rtcdtlstransport.RtpRouter, "mid_table", "init"),
    (aiortc.rtcdtlstransport.RtpRouter, "ssrc_table", "init"),
    (HeaderExtensions, "rtp_stream_id", "member"),
    (HeaderExtensions, "repaired_rtp_stream_id", "member"),
    (aioice.ice.Connection, "_protocols", "init"),
    (aioice.ice.StunProtocol, "transactions", "init"),
    (aioice.ice.StunProtocol.request, "Transaction", "uses"),
    (aioice.stun.Transaction, "_Transaction__timeout_delay", "init"),
    (aioice.stun.Transaction, "run", "member"),
    (aiortc.rtcicetransport.RTCIceTransport, "_send", "init"),
    (aiortc.rtcicetransport.RTCIceTransport, "_recv", "init"),
    (aiortc.rtcdtlstransport.RTCDtlsTransport._write_ssl, "_send", "uses"),
    (aiortc.rtcdtlstransport.RTCDtlsTransport._recv_next, "_recv", "uses"),
    (RTCRtpSender, "_handle_rtcp_packet", "member"),
    (aiortc.rtcdtlstransport.RtpRouter, "register_sender", "member"),
    (aiortc.rtcdtlstransport.RTCDtlsTransport._handle_rtcp_data, "_handle_rtcp_packet", "uses"),
    # the receive fast path (_FastReceive)
    (aiortc.rtcdtlstransport.RTCDtlsTransport, "_rx_srtp", "init"),
    (aiortc.rtcdtlstransport.RTCDtlsTransport, "_rtp_header_extensions_map", "init"),
    (aiortc.rtcdtlstransport.RTCDtlsTransport, "_RTCDtlsTransport__rx_bytes", "init"),
    (aiortc.rtcdtlstransport.RTCDtlsTransport, "_RTCDtlsTransport__rx_packets", "init"),
    (aiortc.rtcdtlstransport.RTCDtlsTransport._recv_next, "unprotect", "uses"),
    (aiortc.rtcdtlstransport.RTCDtlsTransport._handle_rtp_data, "parse", "uses"),
    (aiortc.rtcdtlstransport.RTCDtlsTransport._handle_rtp_data, "_handle_rtp_packet", "uses"),
    (aioice.ice.Connection, "data_received", "member"),
    (aioice.ice.StunProtocol, "datagram_received", "member"),
    (aioice.ice.StunProtocol.datagram_received, "data_received", "uses"),
    (aioice.ice.StunProtocol.datagram_received, "parse_message", "uses"),
    # RFC 7675 consent (keep_consent)
    (aioice.ice.Connection, "query_consent", "member"),
    (aioice.ice.Connection.connect, "query_consent", "uses"),
    (aioice.ice.Connection, "_query_consent_task", "init"),
    (aioice.ice.Connection, "remote_password", "init"),
    (aioice.ice.Connection, "build_request", "member"),
    (aioice.ice.StunProtocol, "request", "member"),
    (aioice.ice, "CONSENT_INTERVAL", "member"),
    (aioice.stun, "RETRY_RTO", "member"),
)

RID_URI: Final = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id"
REPAIRED_RID_URI: Final = "urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id"
# ids unused by aiortc's own table (mid 1, audio level 2, abs-send-time 3): with BUNDLE the
# id space is shared by audio and video
_SIMULCAST_EXTENSION_IDS: Final = ((RID_URI, 10), (REPAIRED_RID_URI, 11))


def enable_simulcast_extensions() -> None:
    """Let aiortc negotiate the RID header extensions for video (idempotent, process-wide):
    without them a browser refuses to send simulcast."""
    table: list[RTCRtpHeaderExtensionParameters] = aiortc.codecs.HEADER_EXTENSIONS["video"]
    present = {extension.uri for extension in table}
    for uri, extension_id in _SIMULCAST_EXTENSION_IDS:
        if uri not in present:
            table.append(RTCRtpHeaderExtensionParameters(id=extension_id, uri=uri))


def _describe(owner: Any) -> str:
    return str(getattr(owner, "__qualname__", None) or getattr(owner, "__name__", owner))


def _present(owner: Any, name: str, where: str) -> bool:
    if where == "member":
        return hasattr(owner, name)
    function = owner.__init__ if where == "init" else owner
    code = getattr(function, "__code__", None)
    return code is not None and name in code.co_names


def missing_private_api() -> list[str]:
    """Names of the private aiortc/aioice attributes this module needs that are absent."""
    return [
        f"{_describe(owner)}.{name}"
        for owner, name, where in _REQUIRED
        if not _present(owner, name, where)
    ]


def check_aiortc() -> None:
    """Refuse to start when aiortc/aioice lack a private attribute the media core uses."""
    missing = missing_private_api()
    installed = f"aiortc {aiortc.__version__}, aioice {aioice.__version__}"
    if missing:
        raise RuntimeError(
            f"the installed {installed} lacks private API the media core relies on: "
            f"{', '.join(missing)}. sfumesh is pinned to aiortc=={PINNED_AIORTC_VERSION} "
            f"(aioice=={PINNED_AIOICE_VERSION}); install those versions."
        )
    enable_simulcast_extensions()
    keep_consent()
    versions = (aiortc.__version__, aioice.__version__)
    if versions != (PINNED_AIORTC_VERSION, PINNED_AIOICE_VERSION):
        logger.warning(
            "running with %s; the media core was checked against aiortc==%s, aioice==%s",
            installed,
            PINNED_AIORTC_VERSION,
            PINNED_AIOICE_VERSION,
        )


# --------------------------------------------------------------------------- ICE configuration

_ice_module: Any = aioice.ice
_ORIGINAL_GET_HOST_ADDRESSES: Final = aioice.ice.get_host_addresses


def set_host_addresses(addresses: Sequence[str] | None) -> None:
    """Make every ICE agent in this process gather host candidates on exactly `addresses`.

    `None` restores aioice's own discovery (every interface except 127.0.0.1). Include
    "127.0.0.1" for loopback tests and demos. Takes effect for agents gathering afterwards.
    """
    if addresses is None:
        _ice_module.get_host_addresses = _ORIGINAL_GET_HOST_ADDRESSES
        return
    fixed = tuple(str(ipaddress.ip_address(address)) for address in addresses)

    def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in fixed if (use_ipv6 if ":" in a else use_ipv4)]

    _ice_module.get_host_addresses = get_host_addresses


def set_ice_controlling(transport: aiortc.RTCIceTransport, controlling: bool) -> None:
    """Give an ORTC `RTCIceTransport` its ICE role before `start()` (aiortc's ORTC API has no
    role parameter; RTCPeerConnection sets it the same way). Used by node-to-node relays."""
    connection: Any = transport._connection
    connection.ice_controlling = controlling


def set_rtcp_ssrc(receiver: RTCRtpReceiver, ssrc: int) -> None:
    """The SSRC an ORTC receiver sends its RTCP (reports, NACK, PLI, REMB) from; without it
    aiortc sends none. RTCPeerConnection does this for every transceiver's receiver."""
    receiver._set_rtcp_ssrc(ssrc)


async def start_negotiated_sender(pc: aiortc.RTCPeerConnection, transceiver: Any) -> bool:
    """Start the sender of a negotiated sending transceiver if aiortc has not: its
    `RTCPeerConnection.__connect` (run for every applied answer) starts a sender only when
    the transport is connected at that moment, so m-lines an answer adds while the first
    DTLS handshake runs are never started. True once the sender runs."""
    sender: Any = transceiver.sender
    if sender._RTCRtpSender__started:
        return True
    if transceiver.currentDirection not in ("sendonly", "sendrecv"):
        return False
    if transceiver.receiver.transport.state != "connected":
        return False
    connection: Any = pc
    await sender.send(connection._RTCPeerConnection__localRtp(transceiver))
    return True


def nominated_candidate_types(pc: aiortc.RTCPeerConnection) -> list[tuple[str, str]]:
    """(local, remote) candidate types ("host", "srflx", "prflx", "relay") of the ICE pairs
    a peer connection's transports nominated: how its media actually travels (a client
    behind a strict firewall: "relay" on its side). aiortc's stats do not say."""
    pairs = []
    for transceiver in pc.getTransceivers():
        ice: Any = transceiver.receiver.transport.transport
        for pair in ice._connection._nominated.values():
            pairs.append((pair.local_candidate.type, pair.remote_candidate.type))
    return pairs


def rtc_configuration(ice_servers: Sequence[RTCIceServer] = ()) -> RTCConfiguration:
    """An explicit configuration: without one aiortc contacts a public STUN server.

    Bundle policy "max-bundle": every transceiver uses the first one's transport from the
    start. With aiortc's default ("balanced") a transceiver takes the transport of the first
    one of its kind, and when an answer bundles that first one onto the primary transport,
    the later ones added before that answer keep the discarded transport: they never send
    (the third person joining a room quickly got no audio or video from the second).

    Every peer connection made with it keeps its ICE consent by RFC 7675 (`keep_consent`)."""
    keep_consent()
    return RTCConfiguration(iceServers=list(ice_servers), bundlePolicy=RTCBundlePolicy.MAX_BUNDLE)


# --------------------------------------------------------------------------- ICE consent

#: RFC 7675 section 5.1: consent lapses this long after the last authenticated answer
CONSENT_EXPIRY_S = 30.0
#: each consent check is sent again on aioice's STUN timer (after 0.5 s, 1 s, 2 s) and its
#: answer awaited until 7.5 s after the first send: in the loaded lab a participant's answers
#: took up to 2.6 s (its sockets held a backlog), and a 3.5 s wait still lost one connection
CONSENT_RETRANSMISSIONS: Final = 3

_connection_class: Any = aioice.ice.Connection
_AIOICE_QUERY_CONSENT: Final = aioice.ice.Connection.query_consent


async def _query_consent(connection: Any) -> None:
    """`aioice.ice.Connection.query_consent` with RFC 7675's expiry (module docstring)."""
    assert connection.remote_password is not None
    loop = asyncio.get_running_loop()
    answered = loop.time()
    while True:
        interval: float = _ice_module.CONSENT_INTERVAL
        await asyncio.sleep(interval * random.uniform(0.8, 1.2))  # noqa: S311 (RFC 7675's jitter)
        for pair in list(connection._nominated.values()):
            request = connection.build_request(pair, nominate=False)
            sent = loop.time()
            try:
                await pair.protocol.request(
                    request,
                    pair.remote_addr,
                    integrity_key=connection.remote_password.encode("utf8"),
                    retransmissions=CONSENT_RETRANSMISSIONS,
                )
            except aioice.stun.TransactionError:
                continue
            answered = loop.time()
            if answered - sent > aioice.stun.RETRY_RTO:  # aioice counted this as no answer
                logger.info(
                    "media.ice_consent_late",
                    extra={"waited_s": round(answered - sent, 2), "remote": str(pair.remote_addr)},
                )
        silent = loop.time() - answered
        if silent >= CONSENT_EXPIRY_S:
            logger.warning(
                "media.ice_consent_expired",
                extra={
                    "silent_s": round(silent, 1),
                    "remote": [str(p.remote_addr) for p in connection._nominated.values()],
                },
            )
            connection._query_consent_task = None
            await connection.close()
            return


def keep_consent() -> None:
    """Every ICE connection of this process keeps consent by RFC 7675 (idempotent)."""
    _connection_class.query_consent = _query_consent


def aioice_consent() -> None:
    """aioice's own consent checks again (tests compare the two)."""
    _connection_class.query_consent = _AIOICE_QUERY_CONSENT


# --------------------------------------------------------------------------- NACK retries

#: a packet still missing this long after its NACK is asked for again (a 35-80 ms RTT
#: answers well within; longer paths get a duplicate retransmission at worst)
NACK_RETRY_S: Final = 0.15
#: asks per missing packet beyond the first
NACK_RETRY_TRIES: Final = 4


class NackRetry:
    """Asks again for packets a receiver NACKed and still misses (see the module docstring).

    Installed on one receiver (`retry_nacks`): its `_send_rtcp_nack` is wrapped on the
    instance, so both aiortc's own gap NACKs and a tap's are noted. A timer runs only while
    something is missing."""

    def __init__(
        self,
        receiver: RTCRtpReceiver,
        interval_s: float = NACK_RETRY_S,
        tries: int = NACK_RETRY_TRIES,
    ) -> None:
        r: Any = receiver
        self._r = r
        self._nack: NackGenerator = r._RTCRtpReceiver__nack_generator
        self.interval_s = interval_s
        self.tries = tries
        self._send = r._send_rtcp_nack
        #: sequence number -> (last asked at, times asked)
        self._asked: dict[int, tuple[float, int]] = {}
        self._ssrc: int | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: NACKs sent by the timer, and the sequence numbers they named
        self.retries = 0
        self.retried_packets = 0
        #: Test hook: when set and it returns True for a NACK's sequence numbers, the NACK
        #: is not sent (simulated loss toward the sender). Never set in production.
        self.drop: Callable[[list[int]], bool] | None = None
        r._send_rtcp_nack = self._noting

    async def _noting(self, media_ssrc: int, lost: list[int]) -> None:
        now = time.monotonic()
        self._ssrc = media_ssrc
        for seq in lost:
            _, times = self._asked.get(seq, (now, 0))
            self._asked[seq] = (now, times + 1)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.interval_s, self._expired)
        if self.drop is None or not self.drop(list(lost)):
            await self._send(media_ssrc, lost)

    def _expired(self) -> None:
        self._timer = None
        missing = self._nack.missing
        for seq in [s for s in self._asked if s not in missing]:
            del self._asked[seq]  # arrived, or given up by the generator (too old)
        now = time.monotonic()
        due = sorted(
            seq
            for seq, (at, times) in self._asked.items()
            if times <= self.tries and now - at >= self.interval_s * 0.9
        )
        if due and self._ssrc is not None:
            self.retries += 1
            self.retried_packets += len(due)
            task = asyncio.ensure_future(self._noting(self._ssrc, due))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif any(times <= self.tries for _, times in self._asked.values()):
            self._timer = asyncio.get_running_loop().call_later(self.interval_s, self._expired)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._asked.clear()


def retry_nacks(receiver: RTCRtpReceiver) -> NackRetry | None:
    """Ask again for packets `receiver` still misses after its NACK (video receivers: those
    with a NACK generator); None for a receiver that never NACKs (audio)."""
    r: Any = receiver
    if r._RTCRtpReceiver__nack_generator is None:
        return None
    existing = getattr(r, "_sfumesh_nack_retry", None)
    if isinstance(existing, NackRetry):
        return existing
    retry = NackRetry(receiver)
    r._sfumesh_nack_retry = retry
    return retry


def route_declared_rtx(transport: aiortc.RTCDtlsTransport) -> None:
    """Route each receiver's RTX SSRC (the remote description's `ssrc-group:FID`) to it on
    `transport`, as a browser does. Idempotent; install before the receivers start (the
    "track" event).

    Why: aiortc registers only a receiver's media SSRC with the transport's router and
    routes any other SSRC by payload type alone, so once a connection receives two video
    tracks (every subscriber in a room of three) their retransmissions, sharing the RTX
    payload type, are dropped as ambiguous: no NACK is ever repaired, each lost packet
    froze that picture until a keyframe (the three-node lab calls' 1 s freezes, issue 20).
    """
    t: Any = transport
    if getattr(t, "_sfumesh_routes_rtx", False):
        return
    register = t._register_rtp_receiver

    def registering(receiver: Any, parameters: RTCRtpReceiveParameters) -> None:
        register(receiver, parameters)
        for encoding in parameters.encodings:
            if encoding.rtx is not None:
                t._rtp_router.ssrc_table[encoding.rtx.ssrc] = receiver

    t._register_rtp_receiver = registering
    t._sfumesh_routes_rtx = True


# --------------------------------------------------------------------------- relay setup timers


def hasten_ice_checks(transport: aiortc.RTCIceTransport, rto_s: float) -> None:
    """Make the connectivity checks of `transport` (gathered, not yet started) retransmit
    first after `rto_s`, doubling, instead of aioice's fixed 0.5 s: on a 35 ms path a lost
    check then costs ~0.15 s. Checks keep aioice's count (7 tries); consent checks (one try
    each) keep aioice's timing entirely. Applies to the transport's own sockets only."""
    connection: Any = transport._connection
    for protocol in connection._protocols:
        _hasten_protocol(protocol, rto_s)


def _hasten_protocol(protocol: Any, rto_s: float) -> None:
    original = protocol.request

    async def request(
        message: aioice.stun.Message,
        addr: tuple[str, int],
        integrity_key: bytes | None = None,
        retransmissions: int | None = None,
    ) -> tuple[aioice.stun.Message, tuple[str, int]]:
        if retransmissions is not None:
            return await original(message, addr, integrity_key, retransmissions)  # type: ignore[no-any-return]
        # aioice's StunProtocol.request, with the transaction's first delay set
        assert message.transaction_id not in protocol.transactions
        if integrity_key is not None:
            message.add_message_integrity(integrity_key)
        transaction = aioice.stun.Transaction(message, addr, protocol, integrity_key=integrity_key)
        transaction_any: Any = transaction
        transaction_any._Transaction__timeout_delay = rto_s
        protocol.transactions[message.transaction_id] = transaction
        try:
            return await transaction.run()
        finally:
            del protocol.transactions[message.transaction_id]

    protocol.request = request


def _is_dtls(data: bytes) -> bool:
    # RFC 7983: a first byte of 20-63 is DTLS; 128-191 is RTP/RTCP (SRTP here)
    return bool(data) and 19 < data[0] < 64


class DtlsFlightResender:
    """Re-sends the last DTLS flight of `dtls` after `rto_s` (doubling, at most
    `max_resends` times per flight) while the peer has not answered it, and at once when
    the peer repeats a datagram it sent before (its sign that our flight was lost, RFC 6347
    4.2.4). A flight is the DTLS datagrams sent since a new datagram last came in.

    Installed on the ICE transport before the handshake (`RTCDtlsTransport.start`); it wraps
    that transport's `_send` and `_recv` (attributes aiortc sets per instance) and puts them
    back once the peer's
    first SRTP/SRTCP shows the handshake done on both sides, or when it has nothing left to
    re-send after the handshake (the final flight of the side that finishes first is covered
    too: its loss would otherwise wait for the peer's 1 s timer)."""

    def __init__(self, dtls: aiortc.RTCDtlsTransport, rto_s: float, max_resends: int = 6) -> None:
        self.rto_s = rto_s
        self.max_resends = max_resends
        #: datagrams re-sent (timer or peer repeat)
        self.resent = 0
        self._dtls = dtls
        self._ice: Any = dtls.transport
        self._send = self._ice._send
        self._recv = self._ice._recv
        self._flight: list[bytes] = []
        self._answered = True
        self._delay = rto_s
        self._tries = 0
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._sending = self._send_wrapper
        self._receiving = self._recv_wrapper
        self._ice._send = self._sending
        self._ice._recv = self._receiving
        self.installed = True
        #: new DTLS datagrams received from the peer (repeats not counted twice)
        self.seen: set[bytes] = set()
        #: Test hook: when set and it returns True for a DTLS datagram (sent first or again),
        #: it is not written (simulated loss on the way to the peer). Never set in production.
        self.drop: Callable[[bytes], bool] | None = None

    async def _send_wrapper(self, data: bytes) -> None:
        if _is_dtls(data):
            if self._answered:
                self._flight, self._answered = [], False
                self._delay, self._tries = self.rto_s, 0
            self._flight.append(data)
            self._arm()
            if self.drop is not None and self.drop(data):
                return
        await self._send(data)

    async def _recv_wrapper(self) -> bytes:
        data: bytes = await self._recv()
        if not _is_dtls(data):
            self._cancel()
            if self._dtls.state != "connecting":
                self.uninstall()  # the peer sends media: its handshake is done
        elif data in self.seen:
            self._resend()  # the peer repeats itself: it did not get our flight
        else:
            self.seen.add(data)
            self._answered = True
            self._cancel()
        return data

    def _arm(self) -> None:
        self._cancel()
        self._timer = asyncio.get_running_loop().call_later(self._delay, self._expired)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self._dtls.state not in ("new", "connecting", "connected") or self._answered:
            return
        if self._tries >= self.max_resends:
            if self._dtls.state == "connected":
                self.uninstall()
            return
        self._tries += 1
        self._delay *= 2
        self._resend()
        self._timer = asyncio.get_running_loop().call_later(self._delay, self._expired)

    def _resend(self) -> None:
        for datagram in self._flight:
            self.resent += 1
            if self.drop is not None and self.drop(datagram):
                continue
            task = asyncio.ensure_future(self._send(datagram))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def uninstall(self) -> None:
        """Give the ICE transport its own `_send` and `_recv` back. Idempotent."""
        self._cancel()
        if not self.installed:
            return
        self.installed = False
        # aiortc binds them per instance (the ICE connection's send and recv)
        if self._ice._send is self._sending:
            self._ice._send = self._send
        if self._ice._recv is self._receiving:
            self._ice._recv = self._recv
        self._flight = []


# --------------------------------------------------------------------------- receive side


@dataclass(frozen=True)
class Reception:
    """What a receiver report says (or would say) about one stream."""

    #: cumulative packets lost (expected - received; may dip after duplicates)
    packets_lost: int
    #: interarrival jitter (RFC 3550), seconds
    jitter_s: float
    #: round-trip time from the report's LSR/DLSR, seconds; None when not known
    rtt_s: float | None = None
    #: the share lost since the receiver's previous report (its "fraction lost"); None
    #: when not known
    fraction_lost: float | None = None
    #: identifies the report (a new value: a new report arrived)
    report_id: object = None


class _DiscardingQueue(queue.Queue[Any]):
    """Stands in for a tapped receiver's decoder queue: counts and drops frames."""

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if item is not None:
            CODEC_WORK.decoded_frames += 1
            logger.error("a frame reached a tapped receiver's decoder queue (dropped)")


class RtpTap:
    """A receiver whose raw RTP goes to `handler` and is never depayloaded nor decoded."""

    def __init__(self, receiver: RTCRtpReceiver, handler: PacketHandler) -> None:
        r: Any = receiver
        if r._RTCRtpReceiver__started or r._RTCRtpReceiver__decoder_thread is not None:
            raise RuntimeError("tap_rtp() must be called before the receiver is started")
        self.receiver = receiver
        self._r = r
        self._handler = handler
        self.started = False
        #: payload type -> codec, filled when the connection starts the receiver
        self.codecs: dict[int, RTCRtpCodecParameters] = r._RTCRtpReceiver__codecs
        self._rtx_ssrc: dict[int, int] = r._RTCRtpReceiver__rtx_ssrc
        self._rtx_pts: set[int] = set()
        self._rtx_apt: dict[int, int] = {}
        self._streams: dict[int, StreamStatistics] = r._RTCRtpReceiver__remote_streams
        self._nack: NackGenerator | None = r._RTCRtpReceiver__nack_generator
        self._estimator: RemoteBitrateEstimator | None = r._RTCRtpReceiver__remote_bitrate_estimator
        #: monotonic time the tap was made (start of the first bitrate window)
        self.created = time.monotonic()
        self.packets = 0
        #: RTP payload bytes handed to the handler (after RTX unwrap)
        self.bytes = 0
        self.dropped = 0
        self.handler_errors = 0
        #: last REMB (bit/s) sent toward the publisher, None before the first
        self.remb_bitrate: int | None = None
        #: aiortc's own estimate behind that REMB (before `remb_limit` lowered it)
        self.remb_estimate: int | None = None
        #: when set, REMB toward the publisher never exceeds what it returns (if not None)
        self.remb_limit: Callable[[], int | None] | None = None
        #: when set, REMB is at least what it returns (then capped by `remb_limit`): a
        #: simulcast publisher's uplink estimate is held while encodings are off
        self.remb_floor: Callable[[], int | None] | None = None
        self.on_drop: DropCallback | None = None
        # SSRCs this receiver accepts: the ones the offer declared (media and RTX), or else
        # the first media SSRC that arrives. Anything else is dropped, so a hostile sender
        # cannot grow per-SSRC state.
        self._ssrcs: set[int] = set()
        self._declared = False
        #: simulcast: the RIDs the publisher offered (lowest layer first; empty: none) ...
        self.rids: tuple[str, ...] = ()
        #: ... the media SSRC learnt for each, and who is told (SSRC, layer index)
        self.rid_ssrcs: dict[str, int] = {}
        self.on_layer: Callable[[int, int], None] | None = None
        self._nacks: dict[int, NackGenerator] = {}
        #: RTCP sends (REMB, NACK) scheduled by `on_packet`, kept until done
        self._sends: set[asyncio.Task[None]] = set()
        if self._estimator is not None:
            lighten_estimator(self._estimator)
        r._RTCRtpReceiver__decoder_queue = _DiscardingQueue()
        r.receive = self._receive
        r._handle_rtp_packet = self._handle_rtp_packet
        # how the receive fast path finds the tap of a routed receiver
        r._sfumesh_tap = self
        #: asks again for video packets still missing after their NACK (None for audio)
        self.nack_retry = retry_nacks(receiver)

    @property
    def media_ssrcs(self) -> list[int]:
        """SSRCs seen so far, retransmission (RTX) SSRCs excluded."""
        return [ssrc for ssrc in self._streams if ssrc not in self._rtx_ssrc]

    def reception(self) -> Reception:
        """Loss and jitter of the publisher's media SSRCs, from the statistics aiortc keeps
        for its receiver reports (read, never reset: `fraction_lost` is not touched)."""
        lost = 0
        jitter = 0.0
        for ssrc, stats in self._streams.items():
            if ssrc in self._rtx_ssrc:
                continue
            lost += stats.packets_lost
            clock_rate: int = stats._clockrate
            if clock_rate:
                jitter = max(jitter, stats.jitter / clock_rate)
        return Reception(packets_lost=lost, jitter_s=jitter)

    def _drop(self, reason: str) -> None:
        self.dropped += 1
        if self.on_drop is not None:
            self.on_drop(reason)

    async def _receive(self, parameters: RTCRtpReceiveParameters) -> None:
        # RTCRtpReceiver.receive() without the decoder thread.
        r = self._r
        if r._RTCRtpReceiver__started:
            return
        for codec in parameters.codecs:
            if codec.payloadType is not None:
                self.codecs[codec.payloadType] = codec
        for encoding in parameters.encodings:
            if encoding.rtx:
                self._rtx_ssrc[encoding.rtx.ssrc] = encoding.ssrc
                self._ssrcs.add(encoding.rtx.ssrc)
            if encoding.ssrc:
                self._ssrcs.add(encoding.ssrc)
        self._declared = bool(self._ssrcs)
        for codec in parameters.codecs:
            if is_rtx(codec) and codec.payloadType is not None:
                self._rtx_pts.add(codec.payloadType)
                apt = codec.parameters.get("apt")
                if isinstance(apt, int) and apt in self.codecs:
                    self._rtx_apt[codec.payloadType] = apt
        transport = r._RTCRtpReceiver__transport
        transport._register_rtp_receiver(r, parameters)
        fast_receive(transport)
        r._RTCRtpReceiver__rtcp_task = asyncio.ensure_future(r._run_rtcp())
        r._RTCRtpReceiver__started = True
        self.started = True

    async def _handle_rtp_packet(self, packet: RtpPacket, arrival_time_ms: int) -> None:
        # aiortc's path (the DTLS transport's reader task): the same work, RTCP awaited
        sends = self._process(packet, arrival_time_ms)
        if sends:
            for send in sends:
                await send

    def on_packet(self, packet: RtpPacket, arrival_time_ms: int) -> None:
        """The receive fast path's entry: the packet handled at once; the REMB or NACK it
        calls for is sent by a task of its own."""
        sends = self._process(packet, arrival_time_ms)
        if sends:
            for send in sends:
                task = asyncio.ensure_future(send)
                self._sends.add(task)
                task.add_done_callback(self._sends.discard)

    def _process(
        self, packet: RtpPacket, arrival_time_ms: int
    ) -> list[Coroutine[Any, Any, None]] | None:
        # RTCRtpReceiver._handle_rtp_packet() up to NACK generation, then the handler; the
        # RTCP it would await is returned (None: nothing to send).
        r = self._r
        if not r._enabled:
            return None
        sends: list[Coroutine[Any, Any, None]] | None = None

        codec = self.codecs.get(packet.payload_type)
        if codec is None:
            self._drop("unknown-payload-type")
            return None
        if packet.ssrc not in self._ssrcs:
            if self.rids:
                if not self._learn_layer(packet):
                    self._drop("unknown-ssrc")
                    return None
            elif self._declared or self._ssrcs or packet.payload_type in self._rtx_pts:
                self._drop("unknown-ssrc")
                return None
            else:
                self._ssrcs.add(packet.ssrc)

        estimator = self._estimator
        if estimator is not None and packet.extensions.abs_send_time is not None:
            remb = estimator.add(
                abs_send_time=packet.extensions.abs_send_time,
                arrival_time_ms=arrival_time_ms,
                payload_size=len(packet.payload) + packet.padding_size,
                ssrc=packet.ssrc,
            )
            rtcp_ssrc = r._RTCRtpReceiver__rtcp_ssrc
            if rtcp_ssrc is not None and remb is not None:
                bitrate, ssrcs = remb
                self.remb_estimate = bitrate
                floor = self.remb_floor() if self.remb_floor is not None else None
                if floor is not None and floor > bitrate:
                    bitrate = floor
                limit = self.remb_limit() if self.remb_limit is not None else None
                if limit is not None and limit < bitrate:
                    bitrate = limit
                self.remb_bitrate = bitrate
                sends = [
                    r._send_rtcp(
                        RtcpPsfbPacket(
                            fmt=RTCP_PSFB_APP,
                            ssrc=rtcp_ssrc,
                            media_ssrc=0,
                            fci=pack_remb_fci(bitrate, ssrcs),
                        )
                    )
                ]

        # statistics for receiver reports (aiortc keeps them for RTX SSRCs too)
        stats = self._streams.get(packet.ssrc)
        if stats is None:
            stats = self._streams[packet.ssrc] = StreamStatistics(codec.clockRate)
        stats.add(packet)

        if packet.payload_type in self._rtx_pts:
            apt = self._rtx_apt.get(packet.payload_type)
            original_ssrc = self._rtx_ssrc.get(packet.ssrc)
            if len(packet.payload) < 2 and packet.padding_size:
                return sends  # a padding-only probe (bandwidth estimation): nothing to forward
            if apt is None or original_ssrc is None or len(packet.payload) < 2:
                self._drop("bad-rtx")
                return sends
            packet = unwrap_rtx(packet, payload_type=apt, ssrc=original_ssrc)

        nack = self._nack
        if nack is not None and self.rids:
            # aiortc's generator follows one sequence; each encoding has its own
            nack = self._nacks.get(packet.ssrc)
            if nack is None:
                nack = self._nacks[packet.ssrc] = NackGenerator()
        if nack is not None and nack.add(packet):
            nack_send = r._send_rtcp_nack(packet.ssrc, sorted(nack.missing))
            sends = [nack_send] if sends is None else [*sends, nack_send]

        self.packets += 1
        self.bytes += len(packet.payload)
        try:
            self._handler(packet)
        except Exception:
            # An exception here would end the DTLS transport's receive loop.
            self.handler_errors += 1
            logger.exception("RTP handler failed (packet dropped)")
        return sends

    def share_estimator(self, other: RtpTap) -> None:
        """Estimate the incoming bandwidth together with `other` (its receiver's estimator,
        which then sees both streams; its REMB names both SSRCs, so each sender hears the
        same estimate of what the two streams get together, as a browser keeps one per
        transport). The layer streams of one relayed simulcast track do: alone, each
        stream's estimate covered only itself, and a layer switched off took its share of
        the estimate with it."""
        self._estimator = other._estimator

    @property
    def handler(self) -> PacketHandler:
        """Where the raw packets go; settable (a relayed track is bound straight to its
        published track once the node knows it)."""
        return self._handler

    @handler.setter
    def handler(self, handler: PacketHandler) -> None:
        self._handler = handler

    def _learn_layer(self, packet: RtpPacket) -> bool:
        """A new SSRC of a simulcast publisher: accept it if it carries an offered RID not
        yet seen (an encoding), or, on an RTX payload type, the repaired RID of a known one."""
        extensions = packet.extensions
        if packet.payload_type in self._rtx_pts:
            media_ssrc = self.rid_ssrcs.get(extensions.repaired_rtp_stream_id or "")
            if media_ssrc is None or media_ssrc in self._rtx_ssrc.values():
                return False
            self._rtx_ssrc[packet.ssrc] = media_ssrc
            self._ssrcs.add(packet.ssrc)
            return True
        rid = extensions.rtp_stream_id
        if rid is None or rid not in self.rids or rid in self.rid_ssrcs:
            return False
        self.rid_ssrcs[rid] = packet.ssrc
        self._ssrcs.add(packet.ssrc)
        if self.on_layer is not None:
            self.on_layer(packet.ssrc, self.rids.index(rid))
        return True


class _WindowRate:
    """aiortc's `RateCounter` (`rate`, `add`, `reset`) with the same results, keeping the
    window as a queue of (ms, count, bytes), one entry per millisecond that had packets,
    instead of a bucket per millisecond walked one by one (see the module docstring)."""

    __slots__ = ("_count", "_entries", "_origin_ms", "_scale", "_value", "_window_size")

    def __init__(self, window_size: int, scale: int = 8000) -> None:
        self._window_size = window_size
        self._scale = scale
        self._entries: deque[list[int]] = deque()
        self._origin_ms: int | None = None
        self._count = 0
        self._value = 0

    def add(self, value: int, now_ms: int) -> None:
        if self._origin_ms is None:
            self._origin_ms = now_ms
        else:
            self._erase_old(now_ms)
        entries = self._entries
        if entries and entries[-1][0] == now_ms:
            last = entries[-1]
            last[1] += 1
            last[2] += value
        else:
            entries.append([now_ms, 1, value])
        self._count += 1
        self._value += value

    def rate(self, now_ms: int) -> int | None:
        if self._origin_ms is not None:
            self._erase_old(now_ms)
            active_window_size = now_ms - self._origin_ms + 1
            if self._count > 0 and active_window_size > 1:
                return round(self._scale * self._value / active_window_size)
        return None

    def reset(self) -> None:
        self._entries.clear()
        self._origin_ms = None
        self._count = 0
        self._value = 0

    def _erase_old(self, now_ms: int) -> None:
        new_origin_ms = now_ms - self._window_size + 1
        origin = self._origin_ms
        if origin is None or origin >= new_origin_ms:
            return
        entries = self._entries
        while entries and entries[0][0] < new_origin_ms:
            _, count, value = entries.popleft()
            self._count -= count
            self._value -= value
        self._origin_ms = new_origin_ms


def _min_frame_period(estimator: OveruseEstimator) -> Callable[[float], float]:
    """`OveruseEstimator.update_min_frame_period` with the built-in `min` over its history
    (a bounded deque) instead of a Python loop: the same result."""
    history: deque[float] = deque(estimator.ts_delta_hist, maxlen=_MIN_FRAME_PERIOD_HISTORY)

    def update_min_frame_period(ts_delta: float) -> float:
        # aiortc drops the oldest before taking the minimum, then appends: the minimum is of
        # the newest 59 and `ts_delta` (the deque drops the oldest on append)
        if len(history) >= _MIN_FRAME_PERIOD_HISTORY:
            history.popleft()
        found = min(history, default=ts_delta)
        history.append(ts_delta)
        return found if found < ts_delta else ts_delta

    return update_min_frame_period


_MIN_FRAME_PERIOD_HISTORY: Final = aiortc.rate.MIN_FRAME_PERIOD_HISTORY_LENGTH


def lighten_estimator(estimator: RemoteBitrateEstimator) -> None:
    """Give aiortc's REMB estimator `_WindowRate` and `_min_frame_period` (the same
    figures, less work per packet; see the module docstring). Idempotent."""
    e: Any = estimator
    if isinstance(e.incoming_bitrate, _WindowRate):
        return
    counter: Any = e.incoming_bitrate
    if counter._total.count:
        raise RuntimeError("lighten_estimator() must be called before the first packet")
    e.incoming_bitrate = _WindowRate(counter._window_size, counter._scale)
    overuse: Any = e.estimator
    overuse.update_min_frame_period = _min_frame_period(overuse)


class _FastReceive:
    """The receive fast path of one DTLS transport (see the module docstring)."""

    def __init__(self, dtls: aiortc.RTCDtlsTransport) -> None:
        t: Any = dtls
        self._dtls = t
        self._connection: Any = t.transport._connection
        self._queued = self._connection.data_received
        self._tasks: set[asyncio.Task[None]] = set()
        self._wrapped: set[int] = set()
        #: how many of the connection's protocols were looked at (-1: look again)
        self._scanned = -1
        #: RTP packets handled on the fast path (SRTP that took aiortc's path not counted)
        self.packets = 0
        #: datagrams read in a burst's callback after the one asyncio read
        self.drained = 0
        self._connection.data_received = self.data_received
        self._wrap_protocols()

    def _wrap_protocols(self) -> None:
        """Datagrams whose first byte says RTP/RTCP skip aioice's STUN parse."""
        protocols: list[Any] = self._connection._protocols
        complete = True
        for protocol in protocols:
            if type(protocol) is not aioice.ice.StunProtocol or id(protocol) in self._wrapped:
                continue
            candidate = getattr(protocol, "local_candidate", None)
            if candidate is None:
                complete = False  # still being gathered
                continue
            self._wrapped.add(id(protocol))
            stun = protocol.datagram_received
            component = candidate.component
            reader = _drain_socket(protocol)

            def one(
                data: bytes, addr: Any, stun: Callable[..., None] = stun, component: int = component
            ) -> None:
                if data and 127 < data[0] < 192:
                    self.data_received(data, component)
                else:
                    stun(data, addr)

            def datagram_received(
                data: bytes,
                addr: Any,
                one: Callable[[bytes, Any], None] = one,
                reader: socket.socket | None = reader,
                protocol: Any = protocol,
            ) -> None:
                one(data, addr)
                if reader is None:
                    return
                # the rest of a burst (a video frame's packets) in this callback, instead of
                # one event-loop turn per datagram
                for _ in range(DRAIN_MAX):
                    try:
                        data, addr = reader.recvfrom(DRAIN_SIZE)
                    except (BlockingIOError, InterruptedError):
                        return
                    except OSError as error:
                        protocol.error_received(error)
                        return
                    self.drained += 1
                    one(data, addr)

            target: Any = protocol  # an instance attribute, as asyncio calls it
            if _ARRIVALS.enabled and reader is not None:
                target.datagram_received = self._stamped(one, reader, protocol)
            else:
                target.datagram_received = datagram_received
        self._scanned = len(protocols) if complete else -1

    def _stamped(
        self, one: Callable[[bytes, Any], None], reader: socket.socket, protocol: Any
    ) -> Callable[[bytes, Any], None]:
        """The datagram callback of a process that stamps arrivals (`stamp_arrivals`): the
        same as the plain one, with each datagram's kernel receive time readable by the tap
        handlers it reaches (`arrival_time`) while it is handled."""
        fd = reader.fileno()
        kernel_receive_time(fd)  # the first query turns the socket's receive stamps on
        arrivals = _ARRIVALS

        def datagram_received(data: bytes, addr: Any) -> None:
            # asyncio read this datagram from the same socket (the duplicate shares it)
            arrivals.current = kernel_receive_time(fd)
            try:
                one(data, addr)
                for _ in range(DRAIN_MAX):
                    try:
                        data, addr = reader.recvfrom(DRAIN_SIZE)
                    except (BlockingIOError, InterruptedError):
                        return
                    except OSError as error:
                        protocol.error_received(error)
                        return
                    self.drained += 1
                    arrivals.current = kernel_receive_time(fd)
                    one(data, addr)
            finally:
                arrivals.current = None

        return datagram_received

    def data_received(self, data: bytes, component: int) -> None:
        t = self._dtls
        if (
            not data
            or not 127 < data[0] < 192
            or t._state is not _CONNECTED
            or t._rx_srtp is None
            or is_rtcp(data)
        ):
            self._queued(data, component)
            return
        if len(self._connection._protocols) != self._scanned:
            self._wrap_protocols()
        t._RTCDtlsTransport__rx_bytes += len(data)
        t._RTCDtlsTransport__rx_packets += 1
        # aiortc's clock.current_ms() (ms since the NTP epoch), without a datetime
        arrival_time_ms = int((time.time() + _NTP_UNIX_OFFSET) * 1000)
        try:
            plain = t._rx_srtp.unprotect(data)
            packet = RtpPacket.parse(plain, t._rtp_header_extensions_map)
        except (pylibsrtp.Error, ValueError):
            return  # what aiortc does with either: drop it (it logs at debug level)
        receiver = t._rtp_router.route_rtp(packet)
        if receiver is None:
            return
        self.packets += 1
        tap = getattr(receiver, "_sfumesh_tap", None)
        if isinstance(tap, RtpTap):
            tap.on_packet(packet, arrival_time_ms)
            return
        task = asyncio.ensure_future(
            receiver._handle_rtp_packet(packet, arrival_time_ms=arrival_time_ms)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


#: datagrams read in one readiness callback beyond the one asyncio read (a burst)
DRAIN_MAX: Final = 32
#: a UDP datagram's largest size
DRAIN_SIZE: Final = 65536


def _drain_socket(protocol: Any) -> socket.socket | None:
    """A duplicate of `protocol`'s UDP socket that reads the rest of a burst without the
    event loop (public asyncio API: `TransportSocket.dup`), closed with the transport; None
    when there is no socket to duplicate."""
    transport = getattr(protocol, "transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return None
    try:
        reader: socket.socket = sock.dup()
        reader.setblocking(False)
    except OSError:
        return None
    lost = protocol.connection_lost

    def connection_lost(exc: Exception | None) -> None:
        reader.close()
        lost(exc)

    protocol.connection_lost = connection_lost
    return reader


# --------------------------------------------------------------------------- arrival stamps

#: SIOCGSTAMPNS (linux/sockios.h): the kernel's receive time of the last datagram read from
#: a socket, a struct timespec on CLOCK_REALTIME (the clock of `time.time()`)
SIOCGSTAMPNS: Final = 0x8907
_TIMESPEC: Final = struct.Struct("@ll")
_TIMESPEC_BUFFER: Final = bytes(_TIMESPEC.size)


class _ArrivalStamps:
    """Whether this process stamps arrivals, and the stamp of the datagram being handled."""

    __slots__ = ("current", "enabled")

    def __init__(self) -> None:
        self.enabled = False
        self.current: float | None = None


_ARRIVALS: Final = _ArrivalStamps()


def kernel_receive_time(fd: int) -> float | None:
    """When the kernel received the last datagram read from socket `fd` (`time.time()`
    seconds); None when it cannot say (no stamp yet, not Linux, a closed socket)."""
    try:
        seconds, nanoseconds = _TIMESPEC.unpack(fcntl.ioctl(fd, SIOCGSTAMPNS, _TIMESPEC_BUFFER))
    except OSError:
        return None
    received: float = seconds + nanoseconds * 1e-9
    return received


def _kernel_stamps_work() -> bool:
    """Whether SIOCGSTAMPNS gives a datagram's receive time here: one datagram to itself
    over loopback, its stamp between its send and its read."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            probe.settimeout(1.0)
            kernel_receive_time(probe.fileno())  # turns the stamps on (ENOENT: none yet)
            sent = time.time()
            probe.sendto(b"stamp", probe.getsockname())
            probe.recvfrom(16)
            read = time.time()
            stamp = kernel_receive_time(probe.fileno())
    except OSError:
        return False
    return stamp is not None and sent - 0.001 <= stamp <= read + 0.001


def stamp_arrivals(enabled: bool = True) -> bool:
    """Process-wide, for benches' clients (a node never pays for it): datagrams of receive
    fast paths installed from now on carry the kernel's receive time to the tap handlers
    (`arrival_time`). True when kernel stamps are in use, False when turned off or when this
    system cannot give them (then `arrival_time` stays None)."""
    _ARRIVALS.enabled = enabled and _kernel_stamps_work()
    return _ARRIVALS.enabled


def arrival_time() -> float | None:
    """Inside a tap handler reached through the receive fast path of a process that stamps
    arrivals: when the kernel received the packet's datagram (`time.time()` seconds), before
    any time it waited in the socket buffer for this process. None elsewhere."""
    return _ARRIVALS.current


def fast_receive(dtls: aiortc.RTCDtlsTransport) -> _FastReceive:
    """Install the receive fast path on `dtls` (idempotent); returns it."""
    t: Any = dtls
    existing = getattr(t, "_sfumesh_fast_receive", None)
    if isinstance(existing, _FastReceive):
        return existing
    fast = _FastReceive(dtls)
    t._sfumesh_fast_receive = fast
    return fast


def tap_rtp(receiver: RTCRtpReceiver, handler: PacketHandler) -> RtpTap:
    """Send `receiver`'s raw RTP packets to `handler`; never depayload or decode them.

    Call before the peer connection starts the receiver (e.g. in the "track" event, or after
    setRemoteDescription and before the connection is established).
    """
    return RtpTap(receiver, handler)


def count_unrouted(transport: aiortc.RTCDtlsTransport, on_drop: DropCallback) -> None:
    """Call `on_drop("unrouted")` for every RTP packet `transport` discards because no
    receiver matches its SSRC or payload type (aiortc drops those silently). Idempotent."""
    t: Any = transport
    router = t._rtp_router
    if getattr(router, "_sfumesh_counted", False):
        return
    route_rtp = router.route_rtp

    def counting_route_rtp(packet: RtpPacket) -> Any:
        receiver = route_rtp(packet)
        if receiver is None:
            # an unknown SSRC whose payload type several receivers share: its MID says whose
            mid = packet.extensions.mid
            by_mid = router.mid_table.get(mid) if mid else None
            if by_mid is not None and packet.ssrc not in router.ssrc_table:
                router.ssrc_table[packet.ssrc] = by_mid
                return by_mid
            on_drop("unrouted")
        return receiver

    router.route_rtp = counting_route_rtp
    router._sfumesh_counted = True


async def request_keyframe(receiver: RTCRtpReceiver, media_ssrc: int) -> bool:
    """Send a PLI for `media_ssrc` to the peer sending to `receiver`. False if not ready."""
    r: Any = receiver
    if r._RTCRtpReceiver__rtcp_ssrc is None:
        return False
    await r._send_rtcp_pli(media_ssrc)
    return True


def remote_media_ssrcs(receiver: RTCRtpReceiver) -> list[int]:
    """The media SSRCs an (untapped, client-side) receiver has received so far, RTX
    excluded: what a PLI names."""
    r: Any = receiver
    rtx: dict[int, int] = r._RTCRtpReceiver__rtx_ssrc
    return [ssrc for ssrc in r._RTCRtpReceiver__remote_streams if ssrc not in rtx]


def skip_jitter_hole(receiver: RTCRtpReceiver) -> int:
    """Unblock a (client-side, untapped) video receiver whose jitter buffer waits behind a
    hole: drop what precedes the first missing packet, the hole and the rest of the frame
    after it, so frames flow again from the next one (a keyframe asked for meanwhile
    repairs the picture). How many slots were dropped (0: no hole, nothing done).

    Why: aiortc's jitter buffer hands out frames only in sequence, holds 512 packets of
    video, and drops what blocks it only when a packet 512 ahead arrives; its NACK generator
    forgets a missing packet 128 behind. A packet lost and not repaired in time (its NACK or
    its retransmission lost too) froze the picture for those 512 packets (8-17 s in the
    lab at 2% loss), and keyframes asked for meanwhile queued behind the hole.
    """
    r: Any = receiver
    buffer = r._RTCRtpReceiver__jitter_buffer
    origin = buffer._origin
    if origin is None:
        return 0
    capacity: int = buffer.capacity
    slots = buffer._packets
    hole = next((i for i in range(capacity) if slots[(origin + i) % capacity] is None), None)
    if hole is None or not any(
        slots[(origin + i) % capacity] is not None for i in range(hole + 1, capacity)
    ):
        return 0  # nothing missing, or nothing after the gap yet: plain waiting
    # smart_remove(n) drops n slots and then the rest of the frame the next packet is in
    buffer.smart_remove(hole + 1)
    return hole + 1


# --------------------------------------------------------------------------- send side


class ParkedTrack(MediaStreamTrack):
    """A sender track that never yields: the sender's RTP loop waits and never encodes."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self._stopped = asyncio.Event()

    async def recv(self) -> Frame | Packet[Any]:
        await self._stopped.wait()
        raise MediaStreamError

    def stop(self) -> None:
        super().stop()
        self._stopped.set()


class _CountingEncoder(Encoder):
    """Occupies a tapped sender's encoder slot: counts encodes, records REMB."""

    def __init__(self, codec: RTCRtpCodecParameters, tap: SenderTap) -> None:
        self._codec = codec
        self._tap = tap
        self._inner: Encoder | None = None

    def _encoder(self) -> Encoder:
        if self._inner is None:
            self._inner = get_encoder(self._codec)
        return self._inner

    def encode(self, frame: Frame, force_keyframe: bool = False) -> tuple[list[bytes], int]:
        CODEC_WORK.encoded_frames += 1
        logger.error("a tapped sender encoded a frame")
        return self._encoder().encode(frame, force_keyframe)

    def pack(self, packet: Packet[Any]) -> tuple[list[bytes], int]:
        return self._encoder().pack(packet)

    # RTCRtpSender._handle_rtcp_packet sets this on a subscriber's REMB.
    @property
    def target_bitrate(self) -> int | None:
        return self._tap.remb_bitrate

    @target_bitrate.setter
    def target_bitrate(self, bitrate: int) -> None:
        self._tap.remb_bitrate = bitrate


def _ntp_now() -> int:
    now = time.time()
    seconds = int(now)
    return ((seconds + _NTP_UNIX_OFFSET) << 32) | int((now - seconds) * 4294967296.0)


@dataclass(frozen=True, slots=True)
class SendStamp:
    """The send time shared by every copy of one forwarded packet (taken once per packet)."""

    #: 64-bit NTP time (what sender reports pair with the RTP timestamp)
    ntp: int
    #: the abs-send-time header extension's 3 bytes (6.18 fixed-point seconds) ...
    abs_send_time: bytes
    #: ... and their value (what the RTP history keeps for retransmissions)
    abs_send_time_value: int


def send_stamp() -> SendStamp:
    ntp = _ntp_now()
    abs_send_time = (ntp >> 14) & 0x00FFFFFF
    return SendStamp(ntp, abs_send_time.to_bytes(3, "big"), abs_send_time)


_RTP_HEADER: Final = struct.Struct("!BBHLLHH")  # fixed header + one-byte extension header
_CONNECTED: Final = aiortc.rtcdtlstransport.State.CONNECTED


class _Kept:
    """A sent packet as the RTP history keeps it: built into an `RtpPacket` only if the
    subscriber NACKs it (aiortc's `_retransmit` reads these attributes and `serialize`s)."""

    __slots__ = (
        "_abs_send_time",
        "_mid",
        "audio_level",
        "marker",
        "payload",
        "payload_type",
        "sequence_number",
        "ssrc",
        "timestamp",
    )

    csrc: ClassVar[tuple[int, ...]] = ()

    def __init__(
        self,
        payload_type: int,
        marker: int,
        sequence_number: int,
        timestamp: int,
        ssrc: int,
        payload: bytes,
        audio_level: Any,
        abs_send_time: int,
        mid: str | None,
    ) -> None:
        self.payload_type = payload_type
        self.marker = marker
        self.sequence_number = sequence_number
        self.timestamp = timestamp
        self.ssrc = ssrc
        self.payload = payload
        self.audio_level = audio_level
        self._abs_send_time = abs_send_time
        self._mid = mid

    @property
    def extensions(self) -> HeaderExtensions:
        return HeaderExtensions(
            abs_send_time=self._abs_send_time, audio_level=self.audio_level, mid=self._mid
        )

    def packet(self) -> RtpPacket:
        packet = RtpPacket(
            payload_type=self.payload_type,
            marker=self.marker,
            sequence_number=self.sequence_number,
            timestamp=self.timestamp,
            ssrc=self.ssrc,
            payload=self.payload,
        )
        packet.extensions = self.extensions
        return packet

    def serialize(self, extensions_map: HeaderExtensionsMap) -> bytes:
        return self.packet().serialize(extensions_map)


class SenderTap:
    """An `RTCRtpSender` the node writes raw RTP through (see `send`)."""

    def __init__(self, sender: RTCRtpSender) -> None:
        s: Any = sender
        if s._RTCRtpSender__started:
            raise RuntimeError("tap_sender() must be called before the sender is started")
        if sender.track is None:
            sender.replaceTrack(ParkedTrack(sender.kind))
        elif not isinstance(sender.track, ParkedTrack):
            logger.warning("tapped sender has a real track: its frames would be encoded")
        self.sender = sender
        self._s = s
        self.parameters: RTCRtpSendParameters | None = None
        #: the codec the subscriber negotiated (what forwarded packets must carry)
        self.codec: RTCRtpCodecParameters | None = None
        self.mid: str | None = None
        #: monotonic time the tap was made (start of the first bitrate window)
        self.created = time.monotonic()
        self.packets_sent = 0
        #: RTP payload bytes sent (what sender reports count as octets)
        self.bytes_sent = 0
        self.send_errors = 0
        self.keyframe_requests = 0
        #: last REMB (bit/s) the subscriber reported for this sender's SSRC
        self.remb_bitrate: int | None = None
        #: sequence numbers the subscriber NACKed, and how many were answered from history
        self.nacked = 0
        self.retransmitted = 0
        self.on_keyframe_request: Callable[[], None] | None = None
        #: the last sequence number written (where `send_padding` takes packets from)
        self.last_sequence_number: int | None = None
        #: the highest sequence number the subscriber's latest receiver report says arrived
        #: (16 bits; None before the first report)
        self.reported_sequence_number: int | None = None
        #: padding sent to probe the subscriber's downlink (payload bytes, packets)
        self.padding_bytes = 0
        self.padding_packets = 0
        self._padding_back = 0
        #: (time, sequence number) of the latest NACKed packets (`resend_nacked`)
        self._nacked_recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=64)
        #: pacing (see `pace`): the rate packets leave at (bit/s), None = as they come
        self.pace_bps: float | None = None
        #: packets that waited in the pacer, and the longest wait (seconds)
        self.paced_packets = 0
        self.paced_wait_max_s = 0.0
        self._paced: deque[tuple[float, _Queued]] = deque()
        self._paced_bytes = 0
        self._pace_at = 0.0
        self._pace_timer: asyncio.TimerHandle | None = None
        #: Test hook: when set and it returns True for a packet, `send` keeps the packet in
        #: the RTP history and counts it as sent but does not write it (simulated loss on the
        #: way to the subscriber, which a NACK then repairs). Never set in production.
        self.drop: Callable[[RtpPacket], bool] | None = None
        self._history: dict[int, Any] = s._RTCRtpSender__rtp_history
        # MID element + abs-send-time's id byte: the same in every packet of this sender
        self._leading_elements = b""
        self._abs_send_time = False
        self._audio_level_id = 0
        self._dtls: Any = None
        self._ice: Any = None
        self._extensions_map = s._RTCRtpSender__rtp_header_extensions_map
        self._original_send = s.send
        self._ready = asyncio.Event()
        s.send = self._send_parameters
        s._send_keyframe = self._keyframe_requested
        self._original_retransmit = s._retransmit
        s._retransmit = self._retransmit
        self._aiortc_rtcp = s._handle_rtcp_packet
        s._handle_rtcp_packet = self._note_receiver_reports

    @property
    def ssrc(self) -> int:
        ssrc: int = self._s._ssrc
        return ssrc

    @property
    def payload_type(self) -> int | None:
        return None if self.codec is None else self.codec.payloadType

    @property
    def ready(self) -> bool:
        return self.codec is not None

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def _note_receiver_reports(self, packet: Any) -> None:
        if isinstance(packet, (RtcpRrPacket, RtcpSrPacket)):
            ssrc = self._s._ssrc
            for report in packet.reports:
                if report.ssrc == ssrc:
                    self.reported_sequence_number = report.highest_sequence & 0xFFFF
        await self._aiortc_rtcp(packet)

    def reception(self) -> Reception | None:
        """The subscriber's latest receiver report for this sender (loss, jitter, RTT), as
        aiortc's `_handle_rtcp_packet` keeps it; None before the first report."""
        report = self._s._RTCRtpSender__stats.get(f"remote-inbound-rtp_{id(self._s)}")
        if report is None:
            return None
        clock_rate = self.codec.clockRate if self.codec is not None else 0
        jitter = report.jitter / clock_rate if clock_rate and report.jitter else 0.0
        rtt = report.roundTripTime
        fraction = report.fractionLost
        return Reception(
            packets_lost=int(report.packetsLost or 0),
            jitter_s=float(jitter),
            rtt_s=None if rtt is None else float(rtt),
            fraction_lost=None if fraction is None else min(1.0, max(0.0, fraction / 256)),
            report_id=report.timestamp,
        )

    async def _send_parameters(self, parameters: RTCRtpSendParameters) -> None:
        if self.codec is None:
            self.parameters = parameters
            self.codec = parameters.codecs[0]
            self.mid = parameters.muxId
            self._s._RTCRtpSender__encoder = _CountingEncoder(self.codec, self)
        await self._original_send(parameters)
        self._prepare_header_extensions()
        self._ready.set()

    def _prepare_header_extensions(self) -> None:
        # The one-byte-header extension elements are the same for every packet of this
        # sender except abs-send-time's value (and audio level): build the rest once.
        ids: HeaderExtensions = self._extensions_map._HeaderExtensionsMap__ids
        mid = (self.mid or "").encode()
        mid_element = (
            bytes([(ids.mid << 4) | (len(mid) - 1)]) + mid
            if ids.mid and 0 < len(mid) <= 16
            else b""
        )
        self._abs_send_time = bool(ids.abs_send_time)
        abs_prefix = bytes([(ids.abs_send_time << 4) | 2]) if ids.abs_send_time else b""
        self._leading_elements = mid_element + abs_prefix
        self._audio_level_id = ids.audio_level or 0
        dtls: Any = self.sender.transport
        self._dtls = dtls
        self._ice = dtls.transport._connection

    def _keyframe_requested(self) -> None:
        self.keyframe_requests += 1
        if self.on_keyframe_request is not None:
            self.on_keyframe_request()

    async def _retransmit(self, sequence_number: int) -> None:
        # RTCRtpSender._retransmit answers a NACKed sequence number from the RTP history.
        self.nacked += 1
        self._nacked_recent.append((time.monotonic(), sequence_number))
        kept = self._history.get(sequence_number % RTP_HISTORY_SIZE)
        if kept is not None and kept.sequence_number == sequence_number:
            self.retransmitted += 1
        await self._original_retransmit(sequence_number)

    def resend_nacked(self, within_s: float) -> int:
        """Send again (as RTX, from the history) the packets NACKed in the last `within_s`:
        after a probe overfilled the subscriber's queue, the first answers may have met it
        still full. Returns how many went."""
        since = time.monotonic() - within_s
        sequence_numbers = sorted({seq for at, seq in self._nacked_recent if at >= since})
        self._nacked_recent.clear()
        for sequence_number in sequence_numbers:
            task = asyncio.ensure_future(self._original_retransmit(sequence_number))
            _padding_tasks.add(task)
            task.add_done_callback(_padding_tasks.discard)
        return len(sequence_numbers)

    def send_padding(self, size: int) -> int:
        """Send about `size` payload bytes of padding to probe the subscriber's downlink:
        recently sent packets again, as RTX (libwebrtc pads the same way; the receiver drops
        them as repeats, its bandwidth estimator and the path carry them). Returns the
        payload bytes sent: 0 when RTX was not negotiated (no padding possible) or nothing
        was sent yet."""
        last = self.last_sequence_number
        if last is None or self._s._RTCRtpSender__rtx_payload_type is None or size <= 0:
            return 0
        sent = 0
        # walking back over the last PADDING_SPAN packets, round after round, so one packet
        # is not repeated many times in a row
        for _ in range(PADDING_SPAN):
            self._padding_back = (self._padding_back + 1) % PADDING_SPAN
            sequence_number = (last - self._padding_back) & 0xFFFF
            kept = self._history.get(sequence_number % RTP_HISTORY_SIZE)
            if kept is None or kept.sequence_number != sequence_number:
                continue
            task = asyncio.ensure_future(self._original_retransmit(sequence_number))
            _padding_tasks.add(task)
            task.add_done_callback(_padding_tasks.discard)
            sent += len(kept.payload)
            self.padding_packets += 1
            if sent >= size:
                break
        self.padding_bytes += sent
        return sent

    def write(
        self,
        payload_type: int,
        marker: int,
        sequence_number: int,
        timestamp: int,
        payload: bytes,
        audio_level: Any,
        stamp: SendStamp,
    ) -> bool:
        """Send one RTP packet as this sender, synchronously: the forwarding hot path.

        The header (this sender's SSRC; MID, abs-send-time and audio level extensions) is
        packed directly, SRTP-protected and written to the nominated ICE pair's socket
        without the coroutine chain of `RTCDtlsTransport._send_rtp`. The packet is kept for
        NACK answers and the sender-report counters are updated. False (dropped) if the
        sender is not started or not connected. While paced (`pace`), a packet that would
        leave ahead of the rate waits in the pacer instead (True: it will be sent).
        """
        if self.pace_bps is not None and not self._pace_allows(len(payload)):
            self._paced.append(
                (
                    time.monotonic(),
                    (payload_type, marker, sequence_number, timestamp, payload, audio_level),
                )
            )
            self._paced_bytes += len(payload)
            self._arm_pacer()
            return True
        return self._send_packet(
            payload_type, marker, sequence_number, timestamp, payload, audio_level, stamp
        )

    def pace(self, rate_bps: float | None) -> None:
        """Let packets leave at most at `rate_bps` (None: as they come, the queue sent at
        once). Why (issue 14, the weak link): a keyframe forwarded as it arrives is a burst
        of several kilobytes; behind a slow link's drop-tail queue (300 kbit/s x 100 ms is
        3.75 KB) its tail is cut, its repair meets the same queue, and the picture froze for
        over a second each time. Spread at the link's estimated rate, the burst fits. Audio
        and other senders are not held (each track has its own sender)."""
        if rate_bps is not None and rate_bps <= 0:
            raise ValueError("a pacing rate must be positive")
        self.pace_bps = rate_bps
        if rate_bps is None:
            self._drain_paced(flush=True)
        elif self._paced:
            self._arm_pacer()

    def _pace_allows(self, size: int) -> bool:
        """Whether a packet of `size` payload bytes may leave now (and book its time)."""
        if self._paced:
            return False
        now = time.monotonic()
        if self._pace_at > now + PACE_BURST_S:
            return False
        rate = self.pace_bps or 1.0
        self._pace_at = max(self._pace_at, now) + (size + PACKET_OVERHEAD_BYTES) * 8 / rate
        return True

    def _arm_pacer(self) -> None:
        if self._pace_timer is None:
            delay = max(0.001, self._pace_at - PACE_BURST_S - time.monotonic())
            self._pace_timer = asyncio.get_running_loop().call_later(delay, self._drain_paced)

    def _drain_paced(self, flush: bool = False) -> None:
        """Send what the rate allows by now (everything when `flush`); re-arm for the rest.
        A queue holding more than `PACE_QUEUE_S` at the rate drains faster, within that
        time (as libwebrtc's pacer does): the layer outgrew the rate, and holding it longer
        only adds delay."""
        if self._pace_timer is not None:
            self._pace_timer.cancel()
            self._pace_timer = None
        rate = self.pace_bps
        if rate is None:
            flush = True
        else:
            rate = max(rate, self._paced_bytes * 8 / PACE_QUEUE_S)
        now = time.monotonic()
        while self._paced:
            if not flush and self._pace_at > now + PACE_BURST_S:
                break
            queued_at, (payload_type, marker, seq, timestamp, payload, level) = (
                self._paced.popleft()
            )
            self._paced_bytes -= len(payload)
            if rate is not None:
                self._pace_at = max(self._pace_at, now) + (
                    (len(payload) + PACKET_OVERHEAD_BYTES) * 8 / rate
                )
            self.paced_packets += 1
            self.paced_wait_max_s = max(self.paced_wait_max_s, now - queued_at)
            # (a fresh send time: abs-send-time feeds the receiver's delay-based estimate)
            self._send_packet(payload_type, marker, seq, timestamp, payload, level, send_stamp())
        if self._paced:
            self._arm_pacer()

    def _send_packet(
        self,
        payload_type: int,
        marker: int,
        sequence_number: int,
        timestamp: int,
        payload: bytes,
        audio_level: Any,
        stamp: SendStamp,
    ) -> bool:
        dtls = self._dtls
        if dtls is None:
            return False
        s = self._s
        ssrc: int = s._ssrc
        elements = self._leading_elements
        if self._abs_send_time:
            elements += stamp.abs_send_time
        level_id = self._audio_level_id
        if level_id and audio_level is not None:
            elements += bytes(
                [(level_id << 4), (0x80 if audio_level[0] else 0) | (audio_level[1] & 0x7F)]
            )
        pad = -len(elements) & 3
        if pad:
            elements += b"\0" * pad
        data = (
            _RTP_HEADER.pack(
                0x90,
                (marker << 7) | payload_type,
                sequence_number,
                timestamp,
                ssrc,
                0xBEDE,
                len(elements) >> 2,
            )
            + elements
            + payload
        )
        self.last_sequence_number = sequence_number
        kept = self._history[sequence_number % RTP_HISTORY_SIZE] = _Kept(
            payload_type,
            marker,
            sequence_number,
            timestamp,
            ssrc,
            payload,
            audio_level,
            stamp.abs_send_time_value,
            self.mid,
        )
        drop = self.drop
        if drop is None or not drop(kept.packet()):
            pair = self._ice._nominated.get(1)
            if dtls._state is not _CONNECTED or pair is None:
                self.send_errors += 1
                return False
            protected = dtls._tx_srtp.protect(data)
            pair.protocol.transport.sendto(protected, pair.remote_addr)
            dtls._RTCDtlsTransport__tx_bytes += len(protected)
            dtls._RTCDtlsTransport__tx_packets += 1
        s._RTCRtpSender__ntp_timestamp = stamp.ntp
        s._RTCRtpSender__rtp_timestamp = timestamp
        size = len(payload)
        s._RTCRtpSender__octet_count += size
        s._RTCRtpSender__packet_count += 1
        self.packets_sent += 1
        self.bytes_sent += size
        return True


#: how far back `SenderTap.send_padding` takes packets to send again
PADDING_SPAN: Final = 32
#: a paced sender may run this far ahead of its rate (seconds): a small burst passes
PACE_BURST_S: Final = 0.02
#: a pacer holding more than this much media (seconds at its rate) drains faster
PACE_QUEUE_S: Final = 1.0
#: what a packet adds on the wire beyond its payload: RTP header with extensions, SRTP
#: tag, UDP and IPv4
PACKET_OVERHEAD_BYTES: Final = 60
#: a packet waiting in a pacer: payload type, marker, sequence number, timestamp, payload,
#: audio level
_Queued = tuple[int, int, int, int, bytes, Any]
#: padding sends under way (kept referenced until done)
_padding_tasks: set[asyncio.Future[None]] = set()


def tap_sender(sender: RTCRtpSender) -> SenderTap:
    """Prepare `sender` for raw RTP forwarding; call before the connection starts it."""
    return SenderTap(sender)


# --------------------------------------------------------------------------- test clients

_held_classes: dict[type, type] = {}


def _held_class(base: type) -> type:
    """`base` with a `target_bitrate` that never drops below the instance's `held_bitrate`."""
    held = _held_classes.get(base)
    if held is None:
        prop: property = base.target_bitrate  # type: ignore[attr-defined]
        setter = prop.fset
        assert setter is not None

        def set_target(self: Any, value: int) -> None:
            setter(self, max(int(value), self.held_bitrate))

        held = type(
            f"Held{base.__name__}",
            (base,),
            {"target_bitrate": property(prop.fget, set_target), "held_bitrate": 0},
        )
        _held_classes[base] = held
    return held


def hold_encoder_bitrate(sender: RTCRtpSender, bitrate: int) -> bool:
    """A client's (not the node's) sender encodes at no less than `bitrate` bit/s from now
    on: a REMB may raise its target (up to aiortc's codec maximum, 1.5 Mbit/s for VP8),
    not lower it. `bench geo`'s camera-like publishers hold ~1.5 Mbit/s this way, instead
    of aiortc's 500 kbit/s start and its slow REMB ramp. The encoder exists only once the
    sender encoded its first frame: False until then (call again)."""
    encoder = getattr(sender, _S + "encoder", None)
    if encoder is None or not isinstance(getattr(type(encoder), "target_bitrate", None), property):
        return False
    if type(encoder) not in _held_classes.values():
        encoder.__class__ = _held_class(type(encoder))
    encoder.held_bitrate = bitrate
    encoder.target_bitrate = bitrate
    return True


# --------------------------------------------------------------------------- simulcast clients


class SimulcastSenderTap(SenderTap):
    """A client's tapped sender that sends `rids` as separate encodings (see the module
    docstring): each layer its own SSRC (`layer_ssrcs`, lowest first) and RID header
    extension, its own RTP history for NACKs, its own keyframe requests
    (`on_layer_keyframe_request(layer)`). For the benches' synthetic publisher, never the
    node; `write` (the sender's own SSRC) is not used alongside `write_layer`."""

    def __init__(self, sender: RTCRtpSender, rids: Sequence[str]) -> None:
        super().__init__(sender)
        if not rids or len(set(rids)) != len(rids):
            raise ValueError("a simulcast sender needs distinct RIDs")
        self.rids = tuple(rids)
        taken = {self.ssrc}
        self.layer_ssrcs: list[int] = []
        while len(self.layer_ssrcs) < len(self.rids):
            ssrc = secrets.randbits(32)
            if ssrc and ssrc not in taken:
                taken.add(ssrc)
                self.layer_ssrcs.append(ssrc)
        self._layer_of = {ssrc: layer for layer, ssrc in enumerate(self.layer_ssrcs)}
        self._histories: list[dict[int, tuple[int, bytes]]] = [{} for _ in self.rids]
        self._rid_elements: list[bytes] = [b""] * len(self.rids)
        self.layer_packets = [0] * len(self.rids)
        self.layer_bytes = [0] * len(self.rids)
        self.layer_keyframe_requests = [0] * len(self.rids)
        self.on_layer_keyframe_request: Callable[[int], None] | None = None
        self._original_rtcp = self._s._handle_rtcp_packet
        self._s._handle_rtcp_packet = self._handle_rtcp_packet

    async def _send_parameters(self, parameters: RTCRtpSendParameters) -> None:
        await super()._send_parameters(parameters)
        ids: HeaderExtensions = self._extensions_map._HeaderExtensionsMap__ids
        if not ids.rtp_stream_id:
            logger.error("simulcast sender: the answer did not negotiate rtp-stream-id")
        else:
            for layer, rid in enumerate(self.rids):
                encoded = rid.encode()
                self._rid_elements[layer] = (
                    bytes([(ids.rtp_stream_id << 4) | (len(encoded) - 1)]) + encoded
                )
        router = self._dtls._rtp_router
        for ssrc in self.layer_ssrcs:
            router.register_sender(self.sender, ssrc)

    async def _handle_rtcp_packet(self, packet: Any) -> None:
        if isinstance(packet, RtcpPsfbPacket) and packet.fmt in (RTCP_PSFB_PLI, RTCP_PSFB_FIR):
            named = [packet.media_ssrc]
            if packet.fmt == RTCP_PSFB_FIR:  # FCI entries: SSRC, sequence number, reserved
                named += [
                    int.from_bytes(packet.fci[i : i + 4], "big")
                    for i in range(0, len(packet.fci) - 7, 8)
                ]
            layers = {self._layer_of[s] for s in named if s in self._layer_of}
            for layer in sorted(layers):
                self.layer_keyframe_requests[layer] += 1
                if self.on_layer_keyframe_request is not None:
                    self.on_layer_keyframe_request(layer)
            if layers:
                return
        elif isinstance(packet, RtcpRtpfbPacket) and packet.fmt == RTCP_RTPFB_NACK:
            nacked_layer = self._layer_of.get(packet.media_ssrc)
            if nacked_layer is not None:
                self._resend(nacked_layer, packet.lost)
                return
        await self._original_rtcp(packet)

    def _resend(self, layer: int, lost: Sequence[int]) -> None:
        """Answer a NACK from the layer's history: the same packet again (no RTX)."""
        history = self._histories[layer]
        for sequence_number in lost:
            self.nacked += 1
            kept = history.get(sequence_number % RTP_HISTORY_SIZE)
            if kept is not None and kept[0] == sequence_number and self._transmit(kept[1]):
                self.retransmitted += 1

    def _transmit(self, data: bytes) -> bool:
        dtls = self._dtls
        pair = self._ice._nominated.get(1) if self._ice is not None else None
        if dtls is None or dtls._state is not _CONNECTED or pair is None:
            self.send_errors += 1
            return False
        protected = dtls._tx_srtp.protect(data)
        pair.protocol.transport.sendto(protected, pair.remote_addr)
        dtls._RTCDtlsTransport__tx_bytes += len(protected)
        dtls._RTCDtlsTransport__tx_packets += 1
        return True

    def write_layer(
        self,
        layer: int,
        payload_type: int,
        marker: int,
        sequence_number: int,
        timestamp: int,
        payload: bytes,
        stamp: SendStamp,
    ) -> bool:
        """Send one RTP packet of encoding `layer` (its SSRC, MID, abs-send-time and RID
        extensions); kept for NACKs. False (dropped) if not started or not connected."""
        if self._dtls is None:
            return False
        elements = self._leading_elements
        if self._abs_send_time:
            elements += stamp.abs_send_time
        elements += self._rid_elements[layer]
        pad = -len(elements) & 3
        if pad:
            elements += b"\0" * pad
        data = (
            _RTP_HEADER.pack(
                0x90,
                (marker << 7) | payload_type,
                sequence_number,
                timestamp,
                self.layer_ssrcs[layer],
                0xBEDE,
                len(elements) >> 2,
            )
            + elements
            + payload
        )
        self._histories[layer][sequence_number % RTP_HISTORY_SIZE] = (sequence_number, data)
        if not self._transmit(data):
            return False
        self.packets_sent += 1
        self.bytes_sent += len(payload)
        self.layer_packets[layer] += 1
        self.layer_bytes[layer] += len(payload)
        return True


def tap_simulcast_sender(sender: RTCRtpSender, rids: Sequence[str]) -> SimulcastSenderTap:
    """Prepare a client's `sender` to send the encodings `rids` (lowest first) as separate
    SSRCs with their RIDs; call before the connection starts it. The offer must announce
    them (`a=rid`, `a=simulcast`: the caller edits its SDP) and `enable_simulcast_extensions`
    must have run before the offer was made."""
    return SimulcastSenderTap(sender, rids)

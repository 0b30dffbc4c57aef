"""Pure RTP forwarding logic: per-subscriber rewriting and fan-out. No I/O, no aiortc privates.

A publisher's track arrives as RTP packets with the publisher's SSRC, payload type, sequence
numbers and timestamps. Each subscriber receives the same payloads under its own SSRC and
payload type, with sequence numbers and timestamps shifted by a per-subscriber offset fixed
at the subscriber's first packet (its own random base), so gaps (losses) stay gaps and the
subscriber's NACKs name sequence numbers that map one-to-one onto the publisher's.
"""

from __future__ import annotations

import bisect
import random
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from typing import Any, Final, Generic, Protocol, TypeVar

from aiortc.rtp import RtpPacket

SEQ_MASK: Final = 0xFFFF
TS_MASK: Final = 0xFFFFFFFF
_SEQ_HALF: Final = 0x8000
_EPS: Final = 1e-6

_rng = random.SystemRandom()


class SubscriberRewriter:
    """Rewrites one publisher track's packets for one subscriber.

    The first packet passed sets the offsets: it goes out with sequence number `seq_base`
    and timestamp `ts_base` (random by default, the sequence base in the lower half of the
    range as aiortc and Chromium do). Later packets keep their distance from it, modulo
    2**16 / 2**32. Packets older than the first one are dropped (the subscriber never knew
    them). When the publisher's SSRC changes (a new source on the same track), numbering
    continues from the last packet sent, with a timestamp step of `switch_ts_step`.
    """

    __slots__ = (
        "_ext_first",
        "_ext_max",
        "_in_ssrc",
        "_last_out_seq",
        "_last_out_ts",
        "_retired",
        "_seq_offset",
        "_ts_offset",
        "payload_type",
        "ssrc",
        "switch_ts_step",
    )

    def __init__(
        self,
        ssrc: int,
        payload_type: int,
        *,
        seq_base: int | None = None,
        ts_base: int | None = None,
        switch_ts_step: int = 1,
    ) -> None:
        self.ssrc = ssrc
        self.payload_type = payload_type
        self.switch_ts_step = switch_ts_step
        self._seq_offset = _rng.randrange(_SEQ_HALF) if seq_base is None else seq_base
        self._ts_offset = _rng.randrange(TS_MASK + 1) if ts_base is None else ts_base
        self._in_ssrc: int | None = None
        self._retired: set[int] = set()  # earlier publisher SSRCs: late packets dropped
        self._ext_max = 0  # highest unwrapped input sequence number
        self._ext_first = 0  # unwrapped input sequence number of the first packet
        self._last_out_seq = 0
        self._last_out_ts = 0

    def _anchor(self, packet: RtpPacket, seq_base: int, ts_base: int) -> None:
        # Until now _seq_offset/_ts_offset held the bases; make them offsets.
        self._in_ssrc = packet.ssrc
        self._ext_first = self._ext_max = packet.sequence_number
        self._seq_offset = (seq_base - packet.sequence_number) & SEQ_MASK
        self._ts_offset = (ts_base - packet.timestamp) & TS_MASK

    def numbers(self, packet: RtpPacket) -> tuple[int, int] | None:
        """The (sequence number, timestamp) `packet` goes out with to this subscriber, or
        None to drop it for this subscriber."""
        seq = packet.sequence_number
        if packet.ssrc != self._in_ssrc:
            if self._in_ssrc is None:
                self._anchor(packet, self._seq_offset, self._ts_offset)
            elif packet.ssrc in self._retired:
                return None
            else:
                self._retired.add(self._in_ssrc)
                self._anchor(
                    packet,
                    (self._last_out_seq + 1) & SEQ_MASK,
                    (self._last_out_ts + self.switch_ts_step) & TS_MASK,
                )
            ext = self._ext_max
        else:
            # unwrap the 16-bit sequence number around the highest one seen
            delta = (seq - self._ext_max) & SEQ_MASK
            if delta < _SEQ_HALF:
                ext = self._ext_max + delta
                self._ext_max = ext
            else:
                ext = self._ext_max - (0x10000 - delta)
                if ext < self._ext_first:
                    return None
        out_seq = (ext + self._seq_offset) & SEQ_MASK
        out_ts = (packet.timestamp + self._ts_offset) & TS_MASK
        if ext == self._ext_max:
            self._last_out_seq = out_seq
            self._last_out_ts = out_ts
        return out_seq, out_ts

    def to_subscriber_seq(self, publisher_seq: int) -> int:
        """The subscriber-side sequence number of a publisher sequence number."""
        return (publisher_seq + self._seq_offset) & SEQ_MASK

    def to_publisher_seq(self, subscriber_seq: int) -> int:
        """The publisher-side sequence number of a subscriber sequence number (e.g. a NACK)."""
        return (subscriber_seq - self._seq_offset) & SEQ_MASK


# --------------------------------------------------------------------------- keyframes


def vp8_is_keyframe_start(payload: bytes) -> bool:
    """True if this VP8 RTP payload (RFC 7741) starts a keyframe."""
    n = len(payload)
    if n < 1:
        return False
    first = payload[0]
    # S bit set and partition id 0: the packet starts the frame.
    if not (first & 0x10) or (first & 0x07):
        return False
    pos = 1
    if first & 0x80:  # X: extension octet follows
        if n < 2:
            return False
        ext = payload[1]
        pos = 2
        if ext & 0x80:  # I: picture id, 7 or 15 bits
            if n <= pos:
                return False
            pos += 2 if payload[pos] & 0x80 else 1
        if ext & 0x40:  # L: TL0PICIDX
            pos += 1
        if ext & 0x30:  # T or K: TID/KEYIDX octet
            pos += 1
    # VP8 payload header: P bit (bit 0 of the first octet) is 0 for a keyframe.
    return n > pos and not (payload[pos] & 0x01)


_H264_KEY_NALS: Final = frozenset((5, 7))  # IDR slice, SPS


def h264_is_keyframe_start(payload: bytes) -> bool:
    """True if this H.264 RTP payload (RFC 6184) carries an SPS or starts an IDR picture."""
    n = len(payload)
    if n < 1:
        return False
    nal_type = payload[0] & 0x1F
    if nal_type in _H264_KEY_NALS:
        return True
    if nal_type == 24:  # STAP-A: 16-bit size + NAL unit, repeated
        pos = 1
        while pos + 2 < n:
            size = (payload[pos] << 8) | payload[pos + 1]
            if (payload[pos + 2] & 0x1F) in _H264_KEY_NALS:
                return True
            pos += 2 + size
        return False
    if nal_type == 28 and n > 1:  # FU-A: start bit and the fragmented NAL's type
        return bool(payload[1] & 0x80) and (payload[1] & 0x1F) in _H264_KEY_NALS
    return False


KEYFRAME_DETECTORS: Final[dict[str, Callable[[bytes], bool]]] = {
    "video/vp8": vp8_is_keyframe_start,
    "video/h264": h264_is_keyframe_start,
}


def keyframe_detector(mime_type: str) -> Callable[[bytes], bool] | None:
    """The keyframe-start test for a codec (None: every packet is a fine place to start)."""
    return KEYFRAME_DETECTORS.get(mime_type.lower())


class KeyframeThrottle:
    """Lets at most one keyframe request through per `interval` seconds (time passed in)."""

    __slots__ = ("_last", "interval", "suppressed")

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self._last: float | None = None
        self.suppressed = 0

    def allow(self, now: float) -> bool:
        if self._last is not None and now - self._last < self.interval:
            self.suppressed += 1
            return False
        self._last = now
        return True


class KeyframeRequests:
    """Keyframe requests toward one publisher track, bounded both ways (time passed in).

    At most one request goes out per `interval` seconds, yet a request is never lost to
    that limit: one arriving inside the interval is sent when it ends (the old throttle
    dropped it, so a subscriber whose loss came just after another's request waited for the
    encoder's next periodic keyframe: minutes). From the first request until a keyframe
    passes (`keyframe`), the wait is open: a request not answered within `retry_s` is sent
    again (the PLI itself, or the keyframe, may be lost on any hop), and after `give_up_s`
    the wait is closed and counted in `gave_up`. Each hop of a relay chain runs its own, so
    a loss anywhere is repaired by the hop before it.
    """

    __slots__ = (
        "_last_sent",
        "_pending",
        "gave_up",
        "give_up_s",
        "interval",
        "recoveries",
        "requests",
        "retries",
        "retry_s",
        "sent",
        "suppressed",
        "wait_s_total",
        "waiting_since",
    )

    def __init__(self, interval: float = 0.5, retry_s: float = 1.0, give_up_s: float = 10.0):
        self.interval = interval
        self.retry_s = max(retry_s, interval)
        self.give_up_s = give_up_s
        self._last_sent: float | None = None
        self._pending = False
        #: when the open wait began (the first unanswered request), None when none is open
        self.waiting_since: float | None = None
        self.requests = 0  # asked for (subscribers, relays, the node itself)
        self.sent = 0  # sent to the publisher (PLI)
        self.retries = 0  # of those, repeats of an unanswered request
        self.suppressed = 0  # folded into another request, or answered before sent
        self.recoveries = 0  # waits ended by a keyframe
        self.gave_up = 0  # waits closed after give_up_s without a keyframe
        self.wait_s_total = 0.0  # seconds waited, over the recoveries

    def request(self, now: float) -> None:
        self.requests += 1
        if self._pending:
            self.suppressed += 1
        self._pending = True
        if self.waiting_since is None:
            self.waiting_since = now

    def keyframe(self, now: float) -> float | None:
        """A keyframe passed: the open wait (if any) ends; how long it lasted."""
        since = self.waiting_since
        if self._pending:
            self.suppressed += 1  # answered before its own request went out
        self._pending = False
        if since is None:
            return None
        self.waiting_since = None
        wait = max(0.0, now - since)
        self.recoveries += 1
        self.wait_s_total += wait
        return wait

    def due(self, now: float) -> bool:
        """Whether to send a request now (and it is then counted as sent)."""
        since = self.waiting_since
        if since is not None and now - since > self.give_up_s:
            self.waiting_since = None
            self._pending = False
            self.gave_up += 1
            return False
        last = self._last_sent
        # (_EPS: `next_check` returns last + period, which minus last may round below it)
        retry = since is not None and last is not None and now - last >= self.retry_s - _EPS
        if not (self._pending or retry):
            return False
        if last is not None and now - last < self.interval - _EPS:
            return False
        if not self._pending:
            self.retries += 1
        self._last_sent = now
        self._pending = False
        self.sent += 1
        return True

    def next_check(self, now: float) -> float | None:
        """When `due` may next say yes (or give up); None when nothing is pending or open."""
        if not self._pending and self.waiting_since is None:
            return None
        last = self._last_sent
        if self._pending:
            at = now if last is None else max(now, last + self.interval)
        else:
            at = now if last is None else max(now, last + self.retry_s)
        if self.waiting_since is not None:
            at = min(at, self.waiting_since + self.give_up_s + 1e-3)
        return max(at, now)


class SeenWindow:
    """Which of a track's recent sequence numbers were already forwarded (the last `SIZE`).

    A packet can arrive twice: a NACK repeated before its retransmission arrived (aiortc's
    NACK generator re-lists every missing number at each new gap), a retransmission of a
    packet that was only late. Forwarding it again sends each subscriber and each relay a
    copy nobody asked for, and a relay then carries more than its publisher sent. Packets
    older than the window are refused too: no subscriber can use them (aiortc's jitter
    buffer even resets on one more than 100 behind, freezing the picture).
    """

    SIZE: Final = 1024
    #: the window's bits (built once, not per packet)
    _MASK: Final = (1 << SIZE) - 1
    __slots__ = ("_bits", "_max", "_ssrc")

    def __init__(self) -> None:
        self._ssrc: int | None = None
        self._max = 0
        self._bits = 0

    def first_time(self, ssrc: int, seq: int) -> bool:
        if ssrc != self._ssrc:
            self._ssrc = ssrc
            self._max = seq
            self._bits = 1
            return True
        delta = (seq - self._max) & SEQ_MASK
        if delta == 0:
            return False
        if delta < _SEQ_HALF:
            self._bits = ((self._bits << delta) | 1) & self._MASK
            self._max = seq
            return True
        back = 0x10000 - delta
        if back >= self.SIZE:
            return False
        bit = 1 << back
        if self._bits & bit:
            return False
        self._bits |= bit
        return True


# --------------------------------------------------------------------------- fan-out


class Sink(Hashable, Protocol):
    """Where a forwarder writes a subscriber's copy (in the node: `adapter.SenderTap`)."""

    def write(
        self,
        payload_type: int,
        marker: int,
        sequence_number: int,
        timestamp: int,
        payload: bytes,
        audio_level: Any,
        stamp: Any,
    ) -> bool: ...


K = TypeVar("K", bound=Sink)


class Forwarder(Generic[K]):
    """Fans one publisher track's packets out to its subscribers.

    `K` is a subscriber's sink, the sender its copies are written to. With a
    keyframe detector, a new subscriber gets nothing until a keyframe starts (ask the
    publisher for one when adding it). Per packet: one keyframe test only while someone
    waits, then one renumbering and one write per subscriber.
    """

    def __init__(self, is_keyframe_start: Callable[[bytes], bool] | None = None) -> None:
        self._is_keyframe_start = is_keyframe_start
        self._rewriters: dict[K, SubscriberRewriter | LayerRewriter] = {}
        self._waiting: set[K] = set()
        self._targets: tuple[tuple[K, SubscriberRewriter], ...] = ()
        self._layered: tuple[tuple[K, LayerRewriter], ...] = ()
        #: simulcast layer -> the subscribers whose rewriter takes its packets (None: to be
        #: rebuilt, after a subscriber came, went, switched or changed its target): a packet
        #: of a layer is looked at only by those, not by every subscriber of the track
        self._by_layer: dict[int, tuple[tuple[K, LayerRewriter], ...]] | None = None
        #: each simulcast layer's latest packets (seq, ts, marker, payload), shared by every
        #: subscriber's rewriter: a switch to a layer also sends what of its keyframe arrived
        #: before the keyframe's start, even before the subscriber asked for that layer
        self._layer_recent: dict[int, deque[tuple[int, int, int, bytes]]] = {}
        self._seen = SeenWindow()
        #: simulcast: publisher SSRC -> layer index (0 lowest); its packets go through the
        #: subscribers' `LayerRewriter`s, each layer with its own window of seen packets
        self.layers: dict[int, int] = {}
        self._layer_seen: dict[int, SeenWindow] = {}
        #: packets received per layer
        self.layer_packets: dict[int, int] = {}
        self.packets_in = 0
        self.packets_out = 0
        self.dropped_waiting = 0
        #: packets that arrived again (or too late to use) and were not forwarded again
        self.duplicates = 0

    @property
    def is_keyframe_start(self) -> Callable[[bytes], bool] | None:
        return self._is_keyframe_start

    def __len__(self) -> int:
        return len(self._rewriters)

    def __contains__(self, key: object) -> bool:
        return key in self._rewriters

    @property
    def waiting(self) -> frozenset[K]:
        """Subscribers still waiting for a keyframe (of their target layer, with simulcast)."""
        return frozenset(self._waiting) | {k for k, r in self._layered if r.waiting}

    def wanted_layers(self) -> set[int]:
        """The simulcast layers subscribers wait for a keyframe of (their targets)."""
        return {r.target for _, r in self._layered if r.waiting and r.target is not None}

    def selected_layers(self) -> set[int]:
        """The simulcast layers some subscriber (or relay) takes: the one it is sent and
        the one it waits to switch to (both flow until the switch)."""
        out: set[int] = set()
        for _, rewriter in self._layered:
            if rewriter.target is not None:
                out.add(rewriter.target)
                current = rewriter.current
                if current is not None:
                    out.add(current)
        return out

    def add(self, key: K, rewriter: SubscriberRewriter | LayerRewriter) -> None:
        self._rewriters[key] = rewriter
        if self._is_keyframe_start is not None and isinstance(rewriter, SubscriberRewriter):
            self._waiting.add(key)
        if isinstance(rewriter, LayerRewriter):
            rewriter.on_change = self._layers_changed
        self._rebuild()

    def remove(self, key: K) -> SubscriberRewriter | LayerRewriter | None:
        rewriter = self._rewriters.pop(key, None)
        self._waiting.discard(key)
        if isinstance(rewriter, LayerRewriter):
            rewriter.on_change = None
        self._rebuild()
        return rewriter

    def rewriter(self, key: K) -> SubscriberRewriter | None:
        rewriter = self._rewriters.get(key)
        return rewriter if isinstance(rewriter, SubscriberRewriter) else None

    def layer_rewriter(self, key: K) -> LayerRewriter | None:
        """A simulcast subscriber's rewriter (its target and current layer)."""
        rewriter = self._rewriters.get(key)
        return rewriter if isinstance(rewriter, LayerRewriter) else None

    def _rebuild(self) -> None:
        self._targets = tuple(
            (key, rewriter)
            for key, rewriter in self._rewriters.items()
            if key not in self._waiting and isinstance(rewriter, SubscriberRewriter)
        )
        self._layered = tuple(
            (key, rewriter)
            for key, rewriter in self._rewriters.items()
            if isinstance(rewriter, LayerRewriter)
        )
        self._by_layer = None

    def _layers_changed(self) -> None:
        self._by_layer = None

    def layer_subscribers(self, layer: int) -> tuple[tuple[K, LayerRewriter], ...]:
        """The simulcast subscribers (and their rewriters) a packet of `layer` goes to."""
        index = self._by_layer
        if index is None:
            grouped: dict[int, list[tuple[K, LayerRewriter]]] = {}
            for key, rewriter in self._layered:
                for taken in rewriter.layers_taken():
                    grouped.setdefault(taken, []).append((key, rewriter))
            index = self._by_layer = {taken: tuple(pairs) for taken, pairs in grouped.items()}
        return index.get(layer, ())

    def admit(self, packet: RtpPacket) -> tuple[tuple[K, SubscriberRewriter], ...]:
        """Count `packet` in, release subscribers waiting for a keyframe if it starts one;
        the (subscriber, rewriter) pairs it goes to (none for a packet already forwarded).
        The caller counts `packets_out`."""
        self.packets_in += 1
        if not self._seen.first_time(packet.ssrc, packet.sequence_number):
            self.duplicates += 1
            return ()
        if self._waiting:
            detector = self._is_keyframe_start
            if detector is not None and detector(packet.payload):
                self._waiting.clear()
                self._rebuild()
            else:
                self.dropped_waiting += len(self._waiting)
        return self._targets

    def forward(self, packet: RtpPacket, stamp: object) -> int:
        """Write `packet` to every subscriber it goes to, renumbered for each, the payload
        shared (no packet object per copy); how many copies were written. `stamp` is the
        one send time every copy carries (the sink's own type)."""
        layer = self.layers.get(packet.ssrc)
        if layer is not None:
            return self.forward_layer(layer, packet, stamp, time.monotonic())
        payload = packet.payload
        marker = packet.marker
        level = packet.extensions.audio_level
        sent = 0
        for sink, rewriter in self.admit(packet):
            numbers = rewriter.numbers(packet)
            if numbers is not None and sink.write(
                rewriter.payload_type, marker, numbers[0], numbers[1], payload, level, stamp
            ):
                sent += 1
        self.packets_out += sent
        return sent

    def forward_layer(self, layer: int, packet: RtpPacket, stamp: object, now: float) -> int:
        """Write a packet of simulcast layer `layer` to the subscribers whose stream takes it
        (see `LayerRewriter`); how many copies were written."""
        self.packets_in += 1
        self.layer_packets[layer] = self.layer_packets.get(layer, 0) + 1
        seen = self._layer_seen.get(layer)
        if seen is None:
            seen = self._layer_seen[layer] = SeenWindow()
        if not seen.first_time(packet.ssrc, packet.sequence_number):
            self.duplicates += 1
            return 0
        detector = self._is_keyframe_start
        payload = packet.payload
        keyframe = detector is not None and detector(payload)
        seq = packet.sequence_number
        ts = packet.timestamp
        marker = packet.marker
        recent = self._layer_recent.get(layer)
        if recent is None:
            recent = self._layer_recent[layer] = deque(maxlen=LayerRewriter.PENDING)
        recent.append((seq, ts, marker, payload))
        sent = 0
        for sink, rewriter in self.layer_subscribers(layer):
            for out_seq, out_ts, out_marker, out_payload in rewriter.rewrite(
                layer, seq, ts, marker, payload, keyframe, now, recent
            ):
                if sink.write(
                    rewriter.payload_type, out_marker, out_seq, out_ts, out_payload, None, stamp
                ):
                    sent += 1
        self.packets_out += sent
        return sent


# --------------------------------------------------------------------------- budget


class ByteBudget:
    """A token bucket over RTP payload bytes: `rate_bps` bits/s with `burst_s` of burst.

    `allow(size, now)` takes `size` bytes if the bucket holds them; a packet that does not fit
    is refused whole (counted in `refused`), so a publisher far above its budget loses the
    excess, not everything.
    """

    __slots__ = ("_capacity", "_level", "_rate", "_stamp", "rate_bps", "refused")

    def __init__(self, rate_bps: int, burst_s: float = 1.0) -> None:
        self.rate_bps = rate_bps
        self._rate = rate_bps / 8.0  # bytes per second
        self._capacity = self._rate * burst_s
        self._level = self._capacity
        self._stamp: float | None = None
        self.refused = 0

    def allow(self, size: int, now: float) -> bool:
        stamp = self._stamp
        if stamp is not None:
            level = self._level + (now - stamp) * self._rate
            self._level = level if level < self._capacity else self._capacity
        self._stamp = now
        if size <= self._level:
            self._level -= size
            return True
        self.refused += 1
        return False


# --------------------------------------------------------------------------- simulcast

PID_MASK_15: Final = 0x7FFF
PID_MASK_7: Final = 0x7F
TL0_MASK: Final = 0xFF


def vp8_ids(payload: bytes) -> tuple[int | None, int, int | None, int]:
    """The VP8 payload descriptor's (picture id, its mask (0x7F or 0x7FFF; 0: none),
    TL0PICIDX, its offset in the payload (-1: none)) (RFC 7741)."""
    n = len(payload)
    if n < 3 or not payload[0] & 0x80:
        return None, 0, None, -1
    ext = payload[1]
    pos = 2
    pid: int | None = None
    mask = 0
    if ext & 0x80:
        if payload[pos] & 0x80:
            if n < pos + 2:
                return None, 0, None, -1
            pid = ((payload[pos] & 0x7F) << 8) | payload[pos + 1]
            mask = PID_MASK_15
            pos += 2
        else:
            pid = payload[pos] & 0x7F
            mask = PID_MASK_7
            pos += 1
    if ext & 0x40 and n > pos:
        return pid, mask, payload[pos], pos
    return pid, mask, None, -1


#: the highest VP8 temporal layer id (TID is 2 bits)
TID_MAX: Final = 3


def vp8_temporal(payload: bytes) -> tuple[int, bool, int | None] | None:
    """The VP8 payload descriptor's (TID, Y: layer sync, TL0PICIDX) when it carries the T
    bit (a publisher sending temporal layers, e.g. `scalabilityMode: "L1T3"`); None when it
    does not (RFC 7741 4.2)."""
    n = len(payload)
    if n < 3 or not payload[0] & 0x80:
        return None
    ext = payload[1]
    if not ext & 0x20:
        return None
    pos = 2
    if ext & 0x80:
        pos += 2 if payload[pos] & 0x80 else 1
    tl0: int | None = None
    if ext & 0x40:
        if n <= pos:
            return None
        tl0 = payload[pos]
        pos += 1
    if n <= pos:
        return None
    octet = payload[pos]
    return octet >> 6, bool(octet & 0x20), tl0


class _FrameIds:
    """(TID, Y, picture id, its mask) of a VP8 payload with temporal layers, else None.
    The last answer is kept: the forwarder hands every subscriber's rewriter the same
    payload object, so the descriptor is read once per packet, not once per copy."""

    __slots__ = ("_ids", "_payload")

    def __init__(self) -> None:
        self._payload: bytes | None = None
        self._ids: tuple[int, bool, int, int] | None = None

    def __call__(self, payload: bytes) -> tuple[int, bool, int, int] | None:
        if payload is self._payload:
            return self._ids
        temporal = vp8_temporal(payload)
        pid, mask, _, _ = vp8_ids(payload)
        ids = None if temporal is None or pid is None else (temporal[0], temporal[1], pid, mask)
        self._payload = payload
        self._ids = ids
        return ids


_frame_ids: Final = _FrameIds()


def vp8_rewrite_ids(payload: bytes, pid_offset: int, tl0_offset: int) -> bytes:
    """`payload` with its picture id and TL0PICIDX shifted by the offsets (modulo their
    width); the payload itself when it carries neither or both offsets are 0."""
    if not (pid_offset or tl0_offset):
        return payload
    pid, mask, tl0, tl0_pos = vp8_ids(payload)
    if pid is None and tl0 is None:
        return payload
    out = bytearray(payload)
    if pid is not None and pid_offset:
        new = (pid + pid_offset) & mask
        if mask == PID_MASK_15:
            out[2] = 0x80 | (new >> 8)
            out[3] = new & 0xFF
        else:
            out[2] = new
    if tl0 is not None and tl0_offset:
        out[tl0_pos] = (tl0 + tl0_offset) & TL0_MASK
    return bytes(out)


def vp8_keyframe_size(payload: bytes) -> tuple[int, int] | None:
    """(width, height) from the frame header at the start of a VP8 keyframe (RFC 6386
    9.1: 3-byte frame tag, start code 9d 01 2a, 14-bit width and height), read without
    decoding; None for any other packet."""
    if not vp8_is_keyframe_start(payload):
        return None
    pos = 1
    if payload[0] & 0x80:
        ext = payload[1]
        pos = 2
        if ext & 0x80:
            pos += 2 if payload[pos] & 0x80 else 1
        if ext & 0x40:
            pos += 1
        if ext & 0x30:
            pos += 1
    header = payload[pos : pos + 10]
    if len(header) < 10 or header[3:6] != b"\x9d\x01\x2a":
        return None
    width = int.from_bytes(header[6:8], "little") & 0x3FFF
    height = int.from_bytes(header[8:10], "little") & 0x3FFF
    return width, height


#: one packet as a layer rewriter emits it: (sequence number, timestamp, marker, payload)
Emitted = tuple[int, int, int, bytes]


class _Skips:
    """Numbers taken out of an increasing series (unwrapped sequence numbers or picture ids
    of dropped packets or frames), so the ones kept close up: `before(v)` is how many were
    taken out at or below `v`. Only the latest `KEEP` are remembered one by one; a value
    older than those can no longer be placed (None)."""

    KEEP: Final = 512
    __slots__ = ("_base", "_values")

    def __init__(self) -> None:
        self._base = 0
        self._values: list[int] = []

    def add(self, value: int) -> None:
        # (callers add only values above every earlier one: the list stays sorted)
        values = self._values
        values.append(value)
        if len(values) > 2 * self.KEEP:
            del values[: self.KEEP]
            self._base += self.KEEP

    def before(self, value: int) -> int | None:
        values = self._values
        if not values or value > values[-1]:
            return self._base + len(values)
        if self._base and value < values[0]:
            return None
        return self._base + bisect.bisect_right(values, value)


class TemporalFilter:
    """Which frames of one layer's stretch a subscriber gets, by VP8 temporal layer (TID),
    and how the numbers close up over the frames left out.

    A frame (one picture id) is kept when its TID is at most `level`; the decision is taken
    at the first packet of it seen and holds for all its packets, so no frame goes out in
    part. `level` follows the subscriber's target at frame boundaries only: down at once,
    up one temporal layer at a frame of that layer marked layer sync (Y: it refers only to
    TID 0) or all the way at a keyframe (a frame of a higher layer refers to earlier frames
    of its own layer, which were dropped). The packets and picture ids of the frames left
    out are taken out of the numbering (`_Skips`): the subscriber sees consecutive sequence
    numbers and picture ids, never a gap it would NACK. TID 0 is never dropped, so
    TL0PICIDX stays as it is. A frame that arrives wholly after later ones and is dropped
    leaves the gap it was given (the numbers after it are already out).
    """

    FRAMES: Final = 64
    __slots__ = (
        "_frames",
        "_levels",
        "_pid_hi",
        "_pid_skips",
        "_seq_hi",
        "_seq_skips",
        "dropped",
        "level",
        "top",
    )

    def __init__(self, level: int, seq_ext: int, pid_ext: int) -> None:
        self.level = level
        self._seq_hi = seq_ext - 1
        self._pid_hi = pid_ext - 1
        self._seq_skips = _Skips()
        self._pid_skips = _Skips()
        #: unwrapped picture id -> kept (the latest FRAMES frames)
        self._frames: dict[int, bool] = {}
        #: (from which unwrapped picture id, level) at each change, the latest FRAMES
        self._levels: list[tuple[int, int]] = [(pid_ext, level)]
        self.dropped = 0
        #: the highest TID seen (what the publisher sends)
        self.top = 0

    def _level_at(self, pid_ext: int) -> int:
        """The level that held at picture id `pid_ext` (-1: older than remembered)."""
        for start, level in reversed(self._levels):
            if start <= pid_ext:
                return level
        return -1

    def pid_ext(self, pid: int, mask: int) -> int:
        """`pid` unwrapped around the highest picture id seen."""
        hi = self._pid_hi
        delta = (pid - hi) & mask
        return hi + delta if delta <= mask >> 1 else hi - (mask + 1 - delta)

    def plain(self, ext: int, pid_ext: int | None) -> tuple[int, int] | None:
        """`admit` for a packet without TID: kept (None only when too old to place)."""
        self._seq_hi = max(self._seq_hi, ext)
        seq_shift = self._seq_skips.before(ext)
        pid_shift = 0 if pid_ext is None else self._pid_skips.before(pid_ext)
        if seq_shift is None or pid_shift is None:
            return None
        return seq_shift, pid_shift

    def admit(
        self, ext: int, pid_ext: int, tid: int, sync: bool, keyframe: bool, target: int
    ) -> tuple[int, int] | None:
        """For one packet (unwrapped sequence number, unwrapped picture id, its frame's TID
        and Y bit, whether it starts a keyframe; the subscriber's temporal target): None to
        drop it, else how many sequence numbers and picture ids to take off its own."""
        if tid > self.top:
            self.top = tid
        frames = self._frames
        keep = frames.get(pid_ext)
        if keep is None:
            if pid_ext > self._pid_hi:  # a new frame: a boundary where the level may move
                level = self.level
                if target < level or keyframe:
                    level = target
                elif sync and tid == level + 1 and tid <= target:
                    level = tid
                if level != self.level:
                    self.level = level
                    self._levels.append((pid_ext, level))
                    if len(self._levels) > self.FRAMES:
                        del self._levels[0]
                keep = tid <= level or keyframe  # (a keyframe refers to nothing)
                self._pid_hi = pid_ext
                if not keep:
                    self._pid_skips.add(pid_ext)
            else:
                # a frame that comes after later ones: kept as it would have been in its
                # place (the later frames that refer to it were), else its gap stays
                keep = tid == 0 or tid <= self._level_at(pid_ext)
            frames[pid_ext] = keep
            if len(frames) > self.FRAMES:
                del frames[next(iter(frames))]
        if ext > self._seq_hi:
            self._seq_hi = ext
            if not keep:
                self._seq_skips.add(ext)
        if not keep:
            self.dropped += 1
            return None
        seq_shift = self._seq_skips.before(ext)
        pid_shift = self._pid_skips.before(pid_ext)
        if seq_shift is None or pid_shift is None:
            return None
        return seq_shift, pid_shift


class _Segment:
    """The stretch of a subscriber's stream taken from one layer: input -> output offsets
    (and, when the layer has temporal layers, the frames left out of it)."""

    __slots__ = (
        "ext_first",
        "ext_max",
        "late_since",
        "layer",
        "pid_offset",
        "seq_offset",
        "temporal",
        "tl0_offset",
    )

    def __init__(self, layer: int, seq: int, seq_offset: int) -> None:
        self.layer = layer
        self.ext_first = self.ext_max = seq
        self.seq_offset = seq_offset
        self.pid_offset = 0
        self.tl0_offset = 0
        self.temporal: TemporalFilter | None = None
        #: retired: when a packet of its layer first came past it (see `LayerRewriter.LATE_S`)
        self.late_since: float | None = None

    def ext(self, seq: int) -> int:
        delta = (seq - self.ext_max) & SEQ_MASK
        return self.ext_max + delta if delta < _SEQ_HALF else self.ext_max - (0x10000 - delta)


class LayerRewriter:
    """One subscriber's stream of a simulcast track, made from the layer it is given.

    The subscriber sees one RTP stream whatever layer feeds it: at a switch the new layer
    continues the sequence numbers (last + 1), the timestamps (last + the time passed, in
    the clock rate) and, for VP8, the picture id and TL0PICIDX (last + 1). A switch (and the
    first packet) happens only at a keyframe start of `target`; until then the current
    layer keeps flowing (down-switches too: a simulcast layer cannot be decoded from any
    other point). The target's packets that arrive before its keyframe start (reordering)
    are kept in a small window and emitted right after it, and packets of the previous
    layer that arrive late still go out in the numbers they were given, so a switch opens
    no sequence gap a receiver would count as loss. `target` None pauses the stream.

    When the layer carries VP8 temporal layers, frames above `temporal_target` are left
    out and the numbers close up over them (`TemporalFilter`, one per stretch).
    """

    PENDING: Final = 32
    RETIRED: Final = 3
    #: a retired stretch takes late packets of its layer (reordered, or resent by the
    #: publisher after the node's NACK) for this long after its layer's packets first came
    #: past it, then goes: its layer's packets are no longer looked at for this subscriber
    LATE_S: Final = 2.0

    def __init__(
        self,
        ssrc: int,
        payload_type: int,
        *,
        clock_rate: int = 90000,
        vp8: bool = True,
        seq_base: int | None = None,
        ts_base: int | None = None,
    ) -> None:
        self.ssrc = ssrc
        self.payload_type = payload_type
        self.clock_rate = clock_rate
        self.vp8 = vp8
        self._seq_base = _rng.randrange(_SEQ_HALF) if seq_base is None else seq_base
        self._ts_base = _rng.randrange(TS_MASK + 1) if ts_base is None else ts_base
        #: the layer wanted (None: paused), and the one being sent (None before the first)
        self.target: int | None = None
        self._segment: _Segment | None = None
        self._retired: list[_Segment] = []
        self._ts_offset = 0
        self._retired_ts: list[int] = []
        self._pending: list[tuple[int, int, int, bytes]] = []  # target's, before its keyframe
        self._last_seq = (self._seq_base - 1) & SEQ_MASK
        self._last_ts = self._ts_base
        self._last_time: float | None = None
        self._last_pid: int | None = None
        self._last_tl0: int | None = None
        self.switches = 0
        #: the highest VP8 temporal layer wanted (None: all of them; see `TemporalFilter`)
        self.temporal_target: int | None = None
        #: called when `layers_taken` changes (the `Forwarder` re-indexes its subscribers)
        self.on_change: Callable[[], None] | None = None

    @property
    def current(self) -> int | None:
        return None if self._segment is None else self._segment.layer

    @property
    def waiting(self) -> bool:
        """Whether the stream waits for a keyframe of its target."""
        return self.target is not None and self.current != self.target

    def layers_taken(self) -> set[int]:
        """The layers whose packets `rewrite` may use: the target, the current layer and
        the retired stretches' (for their late packets). Packets of any other layer give
        nothing and change nothing."""
        taken = {old.layer for old in self._retired}
        if self.target is not None:
            taken.add(self.target)
        if self._segment is not None:
            taken.add(self._segment.layer)
        return taken

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _out(
        self,
        segment: _Segment,
        ts_offset: int,
        ext: int,
        ts: int,
        marker: int,
        payload: bytes,
        keyframe: bool = False,
    ) -> Emitted | None:
        """The packet as the subscriber gets it, or None when its temporal layer is left
        out (only a publisher sending TIDs has any; see `TemporalFilter`)."""
        seq_offset = segment.seq_offset
        if self.vp8:
            pid_offset = segment.pid_offset
            filt = segment.temporal
            # (the T bit tested inline: the common case, no temporal layers, costs nothing)
            if filt is not None or (len(payload) > 2 and payload[0] & 0x80 and payload[1] & 0x20):
                ids = _frame_ids(payload)
                shifts: tuple[int, int] | None = (0, 0)
                if ids is not None:
                    tid, sync, pid, mask = ids
                    target = self.temporal_target
                    target = TID_MAX if target is None else target
                    if filt is None:
                        filt = segment.temporal = TemporalFilter(target, ext, pid)
                    shifts = filt.admit(ext, filt.pid_ext(pid, mask), tid, sync, keyframe, target)
                elif filt is not None:
                    # no TID (or no picture id) in a stretch that has them: kept, its
                    # numbers closed up like the others'
                    plain_pid, plain_mask, _, _ = vp8_ids(payload)
                    shifts = filt.plain(
                        ext, None if plain_pid is None else filt.pid_ext(plain_pid, plain_mask)
                    )
                if shifts is None:
                    return None
                seq_offset -= shifts[0]
                pid_offset -= shifts[1]
            payload = vp8_rewrite_ids(payload, pid_offset, segment.tl0_offset)
        return (ext + seq_offset) & SEQ_MASK, (ts + ts_offset) & TS_MASK, marker, payload

    def _remember(self, ext: int, emitted: Emitted | None, now: float) -> None:
        segment = self._segment
        if emitted is None or segment is None or ext < segment.ext_max:
            return
        segment.ext_max = ext
        self._last_seq = emitted[0]
        self._last_ts = emitted[1]
        self._last_time = now
        if self.vp8:
            pid, mask, tl0, _ = vp8_ids(emitted[3])
            if pid is not None:
                self._last_pid = pid
            if tl0 is not None:
                self._last_tl0 = tl0
            del mask

    def _retire(self, layer: int | None) -> None:
        """End the current stretch (its late packets still go out in their numbers); an
        older stretch of `layer` is superseded by the one about to start."""
        if self._segment is None:
            return
        kept = [
            (old, ts_offset)
            for old, ts_offset in zip(self._retired, self._retired_ts, strict=True)
            if old.layer != layer
        ]
        kept = [(self._segment, self._ts_offset), *kept][: self.RETIRED]
        self._retired = [old for old, _ in kept]
        self._retired_ts = [ts_offset for _, ts_offset in kept]
        self._segment = None
        self._changed()

    def _drop_retired(self, index: int) -> None:
        del self._retired[index]
        del self._retired_ts[index]
        self._changed()

    def _switch(self, layer: int, seq: int, ts: int, payload: bytes, now: float) -> None:
        self._retire(layer)
        first = self._last_time is None
        segment = _Segment(layer, seq, ((self._last_seq + 1) - seq) & SEQ_MASK)
        step = 0 if first else 1
        if self._last_time is not None:
            step = max(1, round((now - self._last_time) * self.clock_rate))
        self._ts_offset = (self._last_ts + step - ts) & TS_MASK
        if self.vp8:
            pid, mask, tl0, _ = vp8_ids(payload)
            if pid is not None and self._last_pid is not None:
                segment.pid_offset = (self._last_pid + 1 - pid) & mask
            if tl0 is not None and self._last_tl0 is not None:
                segment.tl0_offset = (self._last_tl0 + 1 - tl0) & TL0_MASK
        self._segment = segment
        if not first:
            self.switches += 1
        self._changed()

    def rewrite(
        self,
        layer: int,
        seq: int,
        ts: int,
        marker: int,
        payload: bytes,
        keyframe_start: bool,
        now: float,
        recent: Iterable[tuple[int, int, int, bytes]] = (),
    ) -> list[Emitted]:
        """What the subscriber gets for one packet of `layer` (none, it, or, at a switch,
        it and the target's packets held back since). `recent`: the layer's latest packets
        (the forwarder's window, shared by its subscribers), read only at a switch: a
        packet of the keyframe that arrived before its start, and before this subscriber
        asked for the layer, goes out too (else a reordering right at a switch left a gap
        the receiver counts as loss)."""
        segment = self._segment
        if segment is not None and layer == segment.layer:
            ext = segment.ext(seq)
            if ext < segment.ext_first:
                return []
            emitted = self._out(segment, self._ts_offset, ext, ts, marker, payload, keyframe_start)
            self._remember(ext, emitted, now)
            return [] if emitted is None else [emitted]
        for index, (old, ts_offset) in enumerate(zip(self._retired, self._retired_ts, strict=True)):
            if layer == old.layer:
                ext = old.ext(seq)
                if old.ext_first <= ext <= old.ext_max:
                    late = self._out(old, ts_offset, ext, ts, marker, payload)
                    return [] if late is None else [late]
                if old.late_since is None:
                    old.late_since = now
                elif now - old.late_since > self.LATE_S:
                    self._drop_retired(index)
                break
        if layer != self.target:
            return []
        if not keyframe_start:
            self._pending.append((seq, ts, marker, payload))
            if len(self._pending) > self.PENDING:
                del self._pending[0]
            return []
        self._switch(layer, seq, ts, payload, now)
        new = self._segment
        assert new is not None
        first = self._out(new, self._ts_offset, seq, ts, marker, payload, keyframe_start)
        out = [] if first is None else [first]  # (a keyframe is never left out)
        self._remember(seq, first, now)
        early = {new.ext(s): (t, m, p) for s, t, m, p in recent}
        early.update((new.ext(s), (t, m, p)) for s, t, m, p in self._pending)
        self._pending.clear()
        for ext, (t, m, p) in sorted(early.items()):
            if seq < ext <= seq + self.PENDING:
                emitted = self._out(new, self._ts_offset, ext, t, m, p)
                self._remember(ext, emitted, now)
                if emitted is not None:
                    out.append(emitted)
        return out

    def set_target(self, layer: int | None) -> None:
        """The layer wanted from now on; None pauses at once (resuming waits for a keyframe
        and continues the numbers)."""
        if layer != self.target:
            self._pending.clear()
        if layer is None:
            self._retire(None)
        changed = layer != self.target
        self.target = layer
        if changed:
            self._changed()

    def set_temporal_target(self, tid: int | None) -> None:
        """The highest VP8 temporal layer wanted from now on (None: all). Taken at the next
        frame boundary going down, at a layer sync frame or a keyframe going up."""
        self.temporal_target = tid

    @property
    def temporal_level(self) -> int | None:
        """The highest temporal layer being sent (None: the layer has none, or nothing is
        sent)."""
        segment = self._segment
        if segment is None or segment.temporal is None:
            return None
        return min(segment.temporal.level, segment.temporal.top)

    @property
    def temporal_dropped(self) -> int:
        """Packets left out by temporal layer in the current stretch."""
        segment = self._segment
        return 0 if segment is None or segment.temporal is None else segment.temporal.dropped

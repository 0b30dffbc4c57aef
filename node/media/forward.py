"""Pure RTP forwarding logic: per-subscriber rewriting and fan-out. No I/O, no aiortc privates.

A publisher's track arrives as RTP packets with the publisher's SSRC, payload type, sequence
numbers and timestamps. Each subscriber receives the same payloads under its own SSRC and
payload type, with sequence numbers and timestamps shifted by a per-subscriber offset fixed
at the subscriber's first packet (its own random base), so gaps (losses) stay gaps and the
subscriber's NACKs name sequence numbers that map one-to-one onto the publisher's.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable
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
        self._rewriters: dict[K, SubscriberRewriter] = {}
        self._waiting: set[K] = set()
        self._targets: tuple[tuple[K, SubscriberRewriter], ...] = ()
        self._seen = SeenWindow()
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
        """Subscribers still waiting for a keyframe."""
        return frozenset(self._waiting)

    def add(self, key: K, rewriter: SubscriberRewriter) -> None:
        self._rewriters[key] = rewriter
        if self._is_keyframe_start is not None:
            self._waiting.add(key)
        self._rebuild()

    def remove(self, key: K) -> SubscriberRewriter | None:
        rewriter = self._rewriters.pop(key, None)
        self._waiting.discard(key)
        self._rebuild()
        return rewriter

    def rewriter(self, key: K) -> SubscriberRewriter | None:
        return self._rewriters.get(key)

    def _rebuild(self) -> None:
        self._targets = tuple(
            (key, rewriter) for key, rewriter in self._rewriters.items() if key not in self._waiting
        )

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

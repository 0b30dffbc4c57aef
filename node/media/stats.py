"""Media metrics (E1), read from live media state when /metrics is scraped.

`MediaCollector` is a prometheus_client collector: nothing is recorded per packet beyond the
counters the taps already keep, and every series belongs to a live track, so the label set
is bounded by what is connected now and a session's series vanish when it leaves.

Labels: `direction` ("in": a track a publisher sends to this node; "out": a track this
node forwards to a subscriber) and `kind` (audio/video). By default that is all: the tracks
are summed (jitter and RTT: the worst track), so the series are a fixed handful and a scrape
shows no session ids (they are the sessions' names in the live state). With
`metrics.per_session` each track has its own series, with `session` (the session id) and
`track` (the published track, "<publisher session id>:<mid>", the same for "in" and its
"out"s) as well: for debugging and benches, not for a scraper kept for months.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from node.media.adapter import CODEC_WORK, Reception

if TYPE_CHECKING:
    from node.media.session import MediaHub, Published

LABELS = ["session", "direction", "kind", "track"]
AGGREGATE_LABELS = ["direction", "kind"]

#: Bitrate is averaged over at least this long: scrapes closer together repeat the last value.
MIN_RATE_WINDOW_S = 1.0


@dataclass
class _Mark:
    at: float
    octets: int
    rate: float | None = None


class _Rates:
    """Bits/s between scrapes, per tap (weakly held: gone with the tap)."""

    def __init__(self) -> None:
        self._marks: weakref.WeakKeyDictionary[object, _Mark] = weakref.WeakKeyDictionary()

    def rate(self, tap: object, created: float, octets: int, now: float) -> float:
        mark = self._marks.get(tap)
        if mark is None:
            mark = self._marks[tap] = _Mark(created, 0)
        elapsed = now - mark.at
        if mark.rate is None or elapsed >= MIN_RATE_WINDOW_S:
            mark.rate = (octets - mark.octets) * 8 / elapsed if elapsed > 0 else 0.0
            if elapsed >= MIN_RATE_WINDOW_S:
                mark.at = now
                mark.octets = octets
        return mark.rate


@dataclass(frozen=True)
class _Track:
    labels: list[str]
    packets: int
    octets: int
    bitrate: float
    reception: Reception | None
    nacked: int | None
    retransmitted: int | None
    keyframe_requests: int
    remb: int | None


class MediaCollector(Collector):
    """Per track and node-wide media figures of one `MediaHub`."""

    def __init__(self, hub: MediaHub, per_session: bool = False) -> None:
        self.hub = hub
        self.per_session = per_session
        self._rates = _Rates()
        # Summed counters must not go down when a track ends (a scraper would read a reset):
        # each live track's last counts, and the counts of tracks gone, per label set.
        self._last: dict[tuple[str, ...], dict[str, float]] = {}
        self._retired: dict[tuple[str, ...], dict[str, float]] = {}

    def tracks(self) -> Iterator[_Track]:
        now = time.monotonic()
        seen: set[tuple[str, ...]] = set()
        # Local tracks ("in" and their "out"s), then tracks relayed from other nodes: their
        # subscribers here are "out" series like any (their "in" is the relay's, not a
        # publisher's on this node).
        tracks: list[tuple[str, Published, bool]] = [
            (session.session_id, published, True)
            for session in list(self.hub.sessions.values())
            if not session.closed
            for published in list(session.published.values())
        ]
        tracks.extend(
            (published.owner.session_id, published, False)
            for relayed in list(self.hub.relayed.values())
            for published in list(relayed)
        )
        for owner_id, published, local in tracks:
            if published.forwarder is None:
                continue
            track = f"{owner_id}:{published.mid}"
            tap = published.tap
            if local:
                labels = [owner_id, "in", published.kind, track]
                if tuple(labels) not in seen:
                    seen.add(tuple(labels))
                    yield _Track(
                        labels,
                        tap.packets,
                        tap.bytes,
                        self._rates.rate(tap, tap.created, tap.bytes, now),
                        tap.reception(),
                        None,
                        None,
                        published.keyframe_requests,
                        tap.remb_bitrate,
                    )
            for subscription in list(published.subscriptions.values()):
                subscriber = subscription.subscriber
                sink = subscription.sink
                if subscriber.closed or not sink.ready:
                    continue
                labels = [subscriber.session_id, "out", published.kind, track]
                if tuple(labels) in seen:
                    continue
                seen.add(tuple(labels))
                yield _Track(
                    labels,
                    sink.packets_sent,
                    sink.bytes_sent,
                    self._rates.rate(sink, sink.created, sink.bytes_sent, now),
                    sink.reception(),
                    sink.nacked,
                    sink.retransmitted,
                    sink.keyframe_requests,
                    sink.remb_bitrate,
                )

    def collect(self) -> Iterator[Metric]:
        per_track = self.per_session
        labels_of = LABELS if per_track else AGGREGATE_LABELS
        scope = "per track" if per_track else "summed per direction and kind"
        worst = "" if per_track else " (the worst track)"
        packets = CounterMetricFamily(
            "sfumesh_media_packets",
            f"RTP packets {scope}: received from the publisher (in, retransmissions "
            "included) or sent to the subscriber (out)",
            labels=labels_of,
        )
        octets = CounterMetricFamily(
            "sfumesh_media_bytes",
            f"RTP payload bytes {scope} (headers and padding not counted)",
            labels=labels_of,
        )
        bitrate = GaugeMetricFamily(
            "sfumesh_media_bitrate_bps",
            f"RTP payload bits/s {scope}, averaged since the previous scrape (at least "
            f"{MIN_RATE_WINDOW_S:g} s; since the track started on the first scrape)",
            labels=labels_of,
        )
        lost = GaugeMetricFamily(
            "sfumesh_media_packets_lost",
            "Cumulative packets lost (RTCP receiver report figure): in = as this node counts "
            "the publisher's stream, out = as the subscriber last reported it",
            labels=labels_of,
        )
        jitter = GaugeMetricFamily(
            "sfumesh_media_jitter_seconds",
            f"RTP interarrival jitter (RFC 3550){worst}: in = measured here, out = as the "
            "subscriber last reported it",
            labels=labels_of,
        )
        rtt = GaugeMetricFamily(
            "sfumesh_media_rtt_seconds",
            f"Round-trip time to the subscriber{worst} (out only), from its receiver reports' "
            "LSR/DLSR, smoothed by aiortc; absent until known. Publisher RTT is not measured "
            "(the node sends no sender reports on publish connections)",
            labels=labels_of,
        )
        nacks = CounterMetricFamily(
            "sfumesh_media_nacks",
            "Sequence numbers the subscriber NACKed (out only)",
            labels=labels_of,
        )
        retransmissions = CounterMetricFamily(
            "sfumesh_media_retransmissions",
            "NACKed packets answered from the sender's RTP history (out only)",
            labels=labels_of,
        )
        keyframes = CounterMetricFamily(
            "sfumesh_media_keyframe_requests",
            "Keyframe requests: in = PLIs this node sent to the publisher (throttled), "
            "out = PLI/FIR received from the subscriber",
            labels=labels_of,
        )
        remb = GaugeMetricFamily(
            "sfumesh_media_remb_bps",
            "Latest REMB estimate: in = sent by this node to the publisher, out = received "
            "from the subscriber; absent before the first",
            labels=labels_of,
        )
        published_tracks = 0
        subscriptions = 0
        # Summed (or, for jitter and RTT, the worst) per label set; per track each label set
        # is one track, so the sums are that track's own figures.
        sums: dict[str, dict[tuple[str, ...], float]] = {}
        worsts: dict[str, dict[tuple[str, ...], float]] = {}

        def add(family: str, key: tuple[str, ...], value: float) -> None:
            table = sums.setdefault(family, {})
            table[key] = table.get(key, 0) + value

        def worst_of(family: str, key: tuple[str, ...], value: float) -> None:
            table = worsts.setdefault(family, {})
            table[key] = max(table.get(key, value), value)

        live: dict[tuple[str, ...], dict[str, float]] = {}
        for item in self.tracks():
            if item.labels[1] == "in":
                published_tracks += 1
            else:
                subscriptions += 1
            key = tuple(item.labels) if per_track else (item.labels[1], item.labels[2])
            if not per_track:
                counts: dict[str, float] = {
                    "packets": item.packets,
                    "octets": item.octets,
                    "keyframes": item.keyframe_requests,
                }
                # "in" has no NACK figures: none are made up for it
                if item.nacked is not None:
                    counts["nacks"] = item.nacked
                if item.retransmitted is not None:
                    counts["retransmissions"] = item.retransmitted
                live[tuple(item.labels)] = counts
            add("packets", key, item.packets)
            add("octets", key, item.octets)
            add("bitrate", key, item.bitrate)
            if item.reception is not None:
                add("lost", key, item.reception.packets_lost)
                worst_of("jitter", key, item.reception.jitter_s)
                if item.reception.rtt_s is not None:
                    worst_of("rtt", key, item.reception.rtt_s)
            if item.nacked is not None:
                add("nacks", key, item.nacked)
            if item.retransmitted is not None:
                add("retransmissions", key, item.retransmitted)
            add("keyframes", key, item.keyframe_requests)
            if item.remb is not None:
                add("remb", key, item.remb)
        if not per_track:
            for track, counts in self._last.items():
                if track in live:
                    continue
                retired = self._retired.setdefault((track[1], track[2]), {})
                for name, value in counts.items():
                    retired[name] = retired.get(name, 0) + value
            self._last = live
            for key, gone in self._retired.items():
                for name, value in gone.items():
                    add(name, key, value)
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {
            "packets": packets,
            "octets": octets,
            "bitrate": bitrate,
            "lost": lost,
            "jitter": jitter,
            "rtt": rtt,
            "nacks": nacks,
            "retransmissions": retransmissions,
            "keyframes": keyframes,
            "remb": remb,
        }
        for table in (sums, worsts):
            for name, values in table.items():
                for key, value in values.items():
                    families[name].add_metric(list(key), value)
        sessions = sum(1 for s in list(self.hub.sessions.values()) if not s.closed)
        yield from (packets, octets, bitrate, lost, jitter, rtt, nacks, retransmissions)
        yield from (keyframes, remb)
        yield GaugeMetricFamily(
            "sfumesh_media_sessions", "Media sessions on this node", value=sessions
        )
        yield GaugeMetricFamily(
            "sfumesh_media_published_tracks",
            "Tracks published to this node (negotiated)",
            value=published_tracks,
        )
        yield GaugeMetricFamily(
            "sfumesh_media_forwarded_tracks",
            "Published tracks being forwarded to a subscriber (track x subscriber)",
            value=subscriptions,
        )
        dropped = CounterMetricFamily(
            "sfumesh_media_dropped_packets",
            "RTP packets from publishers not forwarded, by reason: over-budget (above "
            "media.max_*_bitrate), unknown-ssrc, unknown-payload-type, bad-rtx, duplicate "
            "(arrived again or too late), unrouted (no receiver matches: aiortc drops it)",
            labels=["reason"],
        )
        for reason, count in sorted(self.hub.dropped.items()):
            dropped.add_metric([reason], count)
        yield dropped
        yield CounterMetricFamily(
            "sfumesh_media_forwarded_packets",
            "RTP packets this node forwarded to subscribers since start (all sessions)",
            value=self.hub.forwarded_packets,
        )
        codec = CounterMetricFamily(
            "sfumesh_media_codec_frames",
            "Frames this node's media core decoded or encoded itself (forwarding keeps both 0)",
            labels=["work"],
        )
        hub = self.hub
        yield SummaryMetricFamily(
            "sfumesh_media_keyframe_wait_seconds",
            "From a keyframe request (a subscriber's, a relay's or the node's own) to the "
            "keyframe passing this node, over the waits a keyframe ended",
            count_value=hub.keyframe_recoveries,
            sum_value=hub.keyframe_wait_s_total,
        )
        yield GaugeMetricFamily(
            "sfumesh_media_keyframe_wait_max_seconds",
            "The longest keyframe wait since start",
            value=hub.keyframe_wait_s_max,
        )
        yield CounterMetricFamily(
            "sfumesh_media_keyframe_retries",
            "Keyframe requests repeated because none arrived within media.keyframe_retry_s",
            value=hub.keyframe_retries,
        )
        yield CounterMetricFamily(
            "sfumesh_media_keyframe_gave_up",
            "Keyframe waits given up after media.keyframe_give_up_s (logged)",
            value=hub.keyframe_gave_up,
        )
        codec.add_metric(["decoded"], CODEC_WORK.decoded_frames)
        codec.add_metric(["encoded"], CODEC_WORK.encoded_frames)
        yield codec
        yield from self.layers()

    def layers(self) -> Iterator[Metric]:
        """Simulcast (issue 14): per subscriber and track the layer sent, the target and
        why, switches and paused time, the temporal layers sent and wanted; per publisher
        the layers arriving. Summed (counts
        per layer and per reason) unless `per_session`."""
        hub = self.hub
        now = time.monotonic()
        per = self.per_session
        sub_labels = ["session", "track"] if per else ["layer"]
        selected = GaugeMetricFamily(
            "sfumesh_media_layer_selected",
            "Simulcast layer sent (0 lowest, -1 none: paused or waiting)"
            if per
            else "Simulcast subscriptions per layer sent (none: paused or waiting)",
            labels=sub_labels,
        )
        target = GaugeMetricFamily(
            "sfumesh_media_layer_target",
            "Simulcast layer chosen (-1: no video) and what bound it: bandwidth, view, "
            "hidden, cap, top, allocation (lost to a higher-priority track)"
            if per
            else "Simulcast subscriptions per reason of their layer choice",
            labels=["session", "track", "reason"] if per else ["reason"],
        )
        switches = CounterMetricFamily(
            "sfumesh_media_layer_switches",
            "Simulcast layer switches made (at a keyframe of the new layer)",
            labels=["session", "track"] if per else [],
        )
        paused = CounterMetricFamily(
            "sfumesh_media_layer_paused_seconds",
            "Time simulcast subscribers got no video (bandwidth or hidden tile)",
            labels=["session", "track"] if per else [],
        )
        active = GaugeMetricFamily(
            "sfumesh_media_publisher_layers",
            "Simulcast layers arriving from the publisher"
            if per
            else "Simulcast tracks per layer arriving",
            labels=["session", "track"] if per else ["layer"],
        )
        temporal_sent = GaugeMetricFamily(
            "sfumesh_media_temporal_selected",
            "Highest VP8 temporal layer sent of the selected layer (-1: it has none)"
            if per
            else "Simulcast subscriptions per highest temporal layer sent (publishers "
            "sending temporal layers only)",
            labels=["session", "track"] if per else ["tid"],
        )
        temporal_target = GaugeMetricFamily(
            "sfumesh_media_temporal_target",
            "Highest VP8 temporal layer wanted (-1: all of them)"
            if per
            else "Simulcast subscriptions per highest temporal layer wanted (all: no limit)",
            labels=["session", "track"] if per else ["tid"],
        )
        by_layer: dict[str, int] = {}
        by_reason: dict[str, int] = {}
        arriving: dict[str, int] = {}
        by_temporal: dict[str, int] = {}
        by_temporal_target: dict[str, int] = {}
        tracks = [p for session in list(hub.sessions.values()) for p in session.published.values()]
        tracks += [p for relayed in list(hub.relayed.values()) for p in relayed]
        for published in tracks:
            forwarder = published.forwarder
            if forwarder is None or not published.simulcast:
                continue
            track = f"{published.owner.session_id}:{published.mid}"
            # the encodings on at the publisher and arriving (one switched off is not)
            live = published.arriving(now)
            if per:
                active.add_metric([published.owner.session_id, track], len(live))
            for layer in live:
                arriving[str(layer)] = arriving.get(str(layer), 0) + 1
            for subscription in list(published.subscriptions.values()):
                rewriter = forwarder.layer_rewriter(subscription.sink)
                choice = subscription.choice
                if rewriter is None or choice is None:
                    continue
                sending = rewriter.current if rewriter.target is not None else None
                if sending is not None and rewriter.waiting and rewriter.current is None:
                    sending = None
                paused_s = subscription.paused_s
                if subscription.paused_since is not None:
                    paused_s += now - subscription.paused_since
                level = rewriter.temporal_level
                wanted = rewriter.temporal_target
                if per:
                    key = [subscription.subscriber.session_id, track]
                    selected.add_metric(key, -1 if sending is None else sending)
                    temporal_sent.add_metric(key, -1 if level is None else level)
                    temporal_target.add_metric(key, -1 if wanted is None else wanted)
                    layer = -1 if choice.layer is None else choice.layer
                    target.add_metric([*key, choice.reason], layer)
                    switches.add_metric(key, rewriter.switches)
                    paused.add_metric(key, paused_s)
                else:
                    name = "none" if sending is None else str(sending)
                    by_layer[name] = by_layer.get(name, 0) + 1
                    by_reason[choice.reason] = by_reason.get(choice.reason, 0) + 1
                    if level is not None:
                        by_temporal[str(level)] = by_temporal.get(str(level), 0) + 1
                        name = "all" if wanted is None else str(wanted)
                        by_temporal_target[name] = by_temporal_target.get(name, 0) + 1
        if not per:
            for name, count in sorted(by_layer.items()):
                selected.add_metric([name], count)
            for reason, count in sorted(by_reason.items()):
                target.add_metric([reason], count)
            for name, count in sorted(arriving.items()):
                active.add_metric([name], count)
            for name, count in sorted(by_temporal.items()):
                temporal_sent.add_metric([name], count)
            for name, count in sorted(by_temporal_target.items()):
                temporal_target.add_metric([name], count)
            switches.add_metric([], hub.layer_switches)
            paused.add_metric([], hub.layer_paused_s + hub.paused_now(now))
        yield from (selected, target, switches, paused, active, temporal_sent, temporal_target)

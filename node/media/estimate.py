"""A subscriber's downlink estimate, as the node uses it to choose simulcast layers, and the
probes that raise it (issue 14: one weak link). Pure: times and measurements are passed in.

Why not the subscriber's REMB alone. aiortc's receive-side estimator (and Chrome's REMB
path) is delay-based only: behind a drop-tail queue that stays full the delay stops
growing, so the REMB stays where it was (measured: 562 kbit/s, unchanged for a minute, on a
300 kbit/s downlink losing 40%) and the layer choice flapped between 180p, 360p and paused
every half second. Upward, the same estimator climbs 8% a second and never beyond 1.5 times
what it receives, so from 180p it takes ~25 s to vouch for 720p once the link is free. So,
as libwebrtc's send-side estimate combines loss with the delay-based figure and LiveKit's
StreamAllocator probes before it upgrades:

* **down**: receiver-report loss above `LOSS_HIGH` caps the estimate at what was sent times
  (1 - loss / 2) (libwebrtc's loss-based rule); a REMB that goes down lowers it to the REMB;
* **up**: a rising REMB raises it only while no loss has capped it since the REMB last went
  down (a REMB stuck above a full queue must not undo the cap); otherwise only a **probe**
  does: while the layer the subscriber should get is held down by bandwidth, the node sends
  padding (recent packets again, as RTX, the way libwebrtc pads) so that the total reaches
  what the next layer needs, for `PROBE_S`. No NACK meanwhile commits the goal as the
  estimate (the layer then climbs); NACKs or a falling REMB abort it at once (the padding
  stops within one pacing tick, so the queue drains and the lost packets' retransmissions
  get through) and the next probe waits longer (`PROBE_WAIT_S`, times `PROBE_BACKOFF`, at
  most `PROBE_WAIT_MAX_S`, which bounds how late a link that got better is noticed). The
  loss reported just after a failed probe is the probe's own and caps nothing. No NACK is
  a verdict only from a receiver that was heard: a probe commits only once a receiver
  report acknowledged a packet sent during it (`hear`), waited for up to `PROBE_HEAR_S`
  after the probe's end, else it fails (seen in the lab: a downlink silent for 3 s sent
  no NACK, two probes "succeeded", and a 300 kbit/s subscriber was sent 720p for 10 s,
  frozen). A paused video is not probed (no media, no NACK: no verdict). The layer itself
  is never the probe: switching a 300 kbit/s link to a 500 kbit/s layer loses its keyframe
  and freezes the picture until the switch back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

#: receiver-report loss above this caps the estimate (libwebrtc's threshold) ...
LOSS_HIGH: Final = 0.10
#: (loss says nothing of the link while next to nothing is sent: a paused video)
MIN_SENT_BPS: Final = 20_000.0
#: a REMB this much below the previous one is the estimator seeing congestion
REMB_DROP: Final = 0.97
#: how long a probe lasts before its goal is committed ...
PROBE_S: Final = 1.2
#: ... its padding climbing to the goal over the first this much of it
PROBE_RAMP_S: Final = 0.6
#: the wait before the first probe, and after a successful one before the next
PROBE_WAIT_S: Final = 1.5
#: each failed probe makes the next wait this much longer ...
PROBE_BACKOFF: Final = 1.5
#: ... up to this (a weak link that got better is found within it)
PROBE_WAIT_MAX_S: Final = 5.0
#: NACKed packets per packet sent during a probe above which it fails (LiveKit's ratio),
#: and at least this many (a NACK repeated for a packet lost before the probe is no verdict)
PROBE_NACK_RATIO: Final = 0.04
PROBE_NACK_MIN: Final = 2
#: a probe that saw fewer media packets than this proves nothing (no NACK can come)
PROBE_MIN_PACKETS: Final = 10
#: a probe not yet acknowledged by a receiver report when it ends waits this long for one
#: (no padding meanwhile), then fails (aiortc reports every 0.5-1.5 s, browsers every ~1 s)
PROBE_HEAR_S: Final = 1.6
#: receiver reports this soon after a failed probe report the probe's own loss (its padding
#: overfilled the queue), not the media's: they cap nothing
PROBE_LOSS_GRACE_S: Final = 2.0
#: a probe goal is the next layer's cost over this share (what `choose_layer` needs to fit
#: it, `BANDWIDTH_HEADROOM`) and a little more, so the layer fits once committed
PROBE_MARGIN: Final = 1.1


@dataclass
class Probe:
    """One probe under way: its goal rate (bit/s) and when it started and ends."""

    goal_bps: float
    started: float
    ends: float
    nacked: int = 0
    sent: int = 0
    #: a receiver report acknowledged a packet sent during the probe
    heard: bool = False


class LinkEstimate:
    """One subscriber connection's downlink estimate (see the module doc).

    `observe` takes each choice round's measurements; `estimate_bps` is what layers are
    chosen against (None: no REMB yet, nothing known). `want` says whether the subscriber's
    layer is held below what it should get by bandwidth and what that next layer costs: it
    starts a probe when one is due. While `probe` is set the caller sends
    `padding_bps()` of padding."""

    def __init__(self) -> None:
        self.estimate_bps: float | None = None
        #: the last REMB seen (bit/s), to tell its movements apart
        self.remb_bps: float | None = None
        #: loss capped the estimate, or a probe set it, since the REMB last went down: a
        #: rising REMB no longer raises it (only probes do)
        self.capped = False
        self.probe: Probe | None = None
        self.probe_wait_s = PROBE_WAIT_S
        self.next_probe_at: float | None = None
        #: when the last probe failed (the loss reported just after is its own), and why:
        #: "nacks", "remb_fell", "not_heard" or "too_few_packets"
        self.failed_at: float | None = None
        self.failure: str | None = None
        #: the rate sent to the subscriber (bit/s), as last observed
        self.sent_bps = 0.0
        self.probes = 0
        self.probes_ok = 0
        #: False once padding turned out impossible (no RTX): no probes, the caller climbs
        #: by trying the layer itself, as before
        self.can_probe = True

    def observe(
        self, now: float, *, remb_bps: float | None, sent_bps: float, loss: float | None
    ) -> None:
        """One choice round: the latest REMB, the rate sent since the last round and the
        loss the receiver reports since then show (None: no new report)."""
        # a report covers the last second or so: what was sent then (before a step down)
        sent = max(sent_bps, self.sent_bps)
        self.sent_bps = sent_bps
        if remb_bps is not None:
            self._remb(float(remb_bps), now)
        if loss is not None:
            loss = min(1.0, max(0.0, loss))
        failed = self.failed_at
        if (
            loss is not None
            and loss > LOSS_HIGH
            and sent >= MIN_SENT_BPS
            and (failed is None or now - failed >= PROBE_LOSS_GRACE_S)
            and self.probe is None
        ):
            cap = sent * (1.0 - loss / 2.0)
            if self.estimate_bps is None or cap < self.estimate_bps:
                self.estimate_bps = cap
            self.capped = True
        probe = self.probe
        if probe is not None and now >= probe.ends:
            # (its verdict is the NACKs, from a receiver that was heard: a report's loss
            # covers more than the probe)
            if probe.sent < PROBE_MIN_PACKETS:
                self._fail(now, "too_few_packets")
            elif probe.heard:
                self._succeed(now)
            elif now >= probe.ends + PROBE_HEAR_S:
                self._fail(now, "not_heard")

    def _remb(self, remb: float, now: float) -> None:
        previous = self.remb_bps
        self.remb_bps = remb
        if self.estimate_bps is None:
            self.estimate_bps = remb
            return
        if previous is not None and remb < previous * REMB_DROP:
            # the estimator saw the delay grow: congestion, whatever capped it before
            self.estimate_bps = min(self.estimate_bps, remb)
            self.capped = False
            if self.probe is not None:
                self._fail(now, "remb_fell")
            return
        if not self.capped and remb > self.estimate_bps:
            self.estimate_bps = remb

    def nack(self, now: float, count: int) -> bool:
        """NACKs heard between rounds (the quickest sign a probe overfills the link): True
        when they end the probe under way."""
        probe = self.probe
        if probe is None or count <= 0:
            return False
        probe.nacked += count
        if probe.nacked > max(PROBE_NACK_MIN, PROBE_NACK_RATIO * probe.sent):
            self._fail(now, "nacks")
            return True
        return False

    def hear(self) -> None:
        """A receiver report acknowledged a packet sent during the probe under way."""
        if self.probe is not None:
            self.probe.heard = True

    def sent(self, packets: int) -> None:
        """Media packets sent during the probe (what its NACK ratio is counted against)."""
        if self.probe is not None:
            self.probe.sent += packets

    def _fail(self, now: float, reason: str) -> None:
        self.probe = None
        self.failure = reason
        self.failed_at = now
        self.probe_wait_s = min(self.probe_wait_s * PROBE_BACKOFF, PROBE_WAIT_MAX_S)
        self.next_probe_at = now + self.probe_wait_s

    def _succeed(self, now: float) -> None:
        probe = self.probe
        assert probe is not None
        self.probe = None
        self.probes_ok += 1
        self.estimate_bps = max(self.estimate_bps or 0.0, probe.goal_bps)
        # from here probes raise it: the REMB, climbing its 8% a second from below, is
        # heard only when it goes down
        self.capped = True
        self.probe_wait_s = PROBE_WAIT_S
        self.next_probe_at = now  # (the next layer up may be probed at once)

    def want(self, now: float, next_cost_bps: float | None, headroom: float) -> bool:
        """The subscriber's layer is held down by bandwidth and the next one up costs
        `next_cost_bps` (None: it is not held down). Starts a probe when one is due; True
        when one started."""
        if next_cost_bps is None or not self.can_probe or self.probe is not None:
            return False
        if self.estimate_bps is None:
            return False
        if self.next_probe_at is None:
            self.next_probe_at = now + self.probe_wait_s
            return False
        if now < self.next_probe_at:
            return False
        goal = next_cost_bps / headroom * PROBE_MARGIN
        if goal <= self.estimate_bps:
            return False  # (it fits already: nothing to prove)
        self.probe = Probe(goal, now, now + PROBE_S)
        self.probes += 1
        return True

    def padding_bps(self, now: float | None = None) -> float:
        """How much padding a probe under way needs on top of what is sent (0: none): it
        climbs to the goal over `PROBE_RAMP_S` (`now` given), so a link that cannot carry
        the goal is overfilled by little when the first NACK stops it."""
        probe = self.probe
        if probe is None or (now is not None and now >= probe.ends):
            return 0.0  # (over, waiting to be heard: no padding)
        share = 1.0 if now is None else min(1.0, max(0.0, (now - probe.started) / PROBE_RAMP_S))
        return max(0.0, probe.goal_bps - self.sent_bps) * share

    def cancel(self, now: float) -> None:
        """Padding could not be sent (no RTX negotiated): no probes from now on."""
        self.probe = None
        self.can_probe = False
        self.next_probe_at = now

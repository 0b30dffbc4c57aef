"""What one direction of one emulated link does: the parameters, shared by the topology
file (node.lab.topology) and the link model (node.lab.link).

Kept apart from both so the file format and the model agree on one definition, and so the
model can be used (and tested) without any file.
"""

from __future__ import annotations

from dataclasses import dataclass

#: jitter drifts with this correlation time unless a link says otherwise (FINDINGS: ~20 ms
#: keeps packets in order without inflating the mean delay as independent jitter does)
DEFAULT_JITTER_CORRELATION_MS = 20.0
#: a drop-tail queue this long (in ms of transmission at the link's rate) unless told
DEFAULT_QUEUE_MS = 100.0


@dataclass(frozen=True, slots=True)
class GilbertElliott:
    """Two-state bursty loss, stepped once per packet (as netem's `gemodel`).

    In the good state packets are lost with the link's `loss`, in the bad state with
    `loss_bad`. Long-run share of packets seen in the bad state:
    p_good_to_bad / (p_good_to_bad + p_bad_to_good); mean bad run 1 / p_bad_to_good packets.
    """

    p_good_to_bad: float
    p_bad_to_good: float
    loss_bad: float = 1.0

    def __post_init__(self) -> None:
        for name in ("p_good_to_bad", "p_bad_to_good", "loss_bad"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], not {value}")
        if self.p_bad_to_good == 0.0:
            raise ValueError("p_bad_to_good must be > 0 (a bad state must end)")

    @property
    def bad_share(self) -> float:
        """Long-run fraction of packets that meet the bad state."""
        return self.p_good_to_bad / (self.p_good_to_bad + self.p_bad_to_good)


@dataclass(frozen=True, slots=True)
class LinkParams:
    """One direction of one link.

    * `delay_ms`: fixed one-way delay.
    * `jitter_ms`: standard deviation of a delay offset that drifts smoothly in time (knots
      every `jitter_correlation_ms`, linear in between), so a packet never overtakes the one
      before it and the mean delay stays `delay_ms` (the offset is cut at -delay_ms: a delay
      is never negative).
    * `loss`: fraction of packets dropped at random (in the good state if `burst` is set).
    * `burst`: optional Gilbert-Elliott bursty loss.
    * `rate_mbps`: optional rate limit (bits of the whole IP packet); packets wait in a
      drop-tail queue holding at most `queue_ms` of transmission, the rest are dropped.
    """

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    burst: GilbertElliott | None = None
    rate_mbps: float | None = None
    queue_ms: float = DEFAULT_QUEUE_MS
    jitter_correlation_ms: float = DEFAULT_JITTER_CORRELATION_MS

    def __post_init__(self) -> None:
        if self.delay_ms < 0:
            raise ValueError(f"delay_ms must be >= 0, not {self.delay_ms}")
        if self.jitter_ms < 0:
            raise ValueError(f"jitter_ms must be >= 0, not {self.jitter_ms}")
        if not 0.0 <= self.loss <= 1.0:
            raise ValueError(f"loss must be within [0, 1], not {self.loss}")
        if self.rate_mbps is not None and self.rate_mbps <= 0:
            raise ValueError(f"rate_mbps must be > 0, not {self.rate_mbps}")
        if self.queue_ms < 0:
            raise ValueError(f"queue_ms must be >= 0, not {self.queue_ms}")
        if self.jitter_correlation_ms <= 0:
            raise ValueError(f"jitter_correlation_ms must be > 0, not {self.jitter_correlation_ms}")

    @property
    def expected_loss(self) -> float:
        """Long-run fraction lost by the loss model (queue drops not included)."""
        if self.burst is None:
            return self.loss
        bad = self.burst.bad_share
        return (1.0 - bad) * self.loss + bad * self.burst.loss_bad

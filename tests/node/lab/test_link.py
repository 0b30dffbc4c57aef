"""node/lab/link.py: the pure link model, on a fake clock with seeded randomness."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.lab.link import DropCause, Network, Stage, network_for
from node.lab.params import GilbertElliott, LinkParams
from node.lab.topology import load_topology


def one_link(params: LinkParams, seed: int = 1) -> Network[int]:
    return Network({"ab": params}, {("a", "b"): ["ab"]}, seed)


def run(net: Network[int], times: list[float], size: int = 1200) -> list[tuple[int, float]]:
    """Submit packet i at times[i] (advancing the clock between), return (i, due) delivered."""
    out = []
    for i, t in enumerate(times):
        out += [(d.payload, d.due) for d in net.pop_due(t)]
        net.submit(t, "a", "b", i, size)
    out += [(d.payload, d.due) for d in net.drain()]
    return out


@settings(max_examples=40, deadline=None)
@given(
    delay=st.floats(0, 200),
    jitter=st.floats(0, 50),
    corr=st.floats(1, 100),
    rate=st.one_of(st.none(), st.floats(0.5, 100)),
    gaps=st.lists(st.floats(0, 0.02), min_size=1, max_size=300),
    seed=st.integers(0, 1000),
)
def test_order_is_kept_and_delay_never_negative(delay, jitter, corr, rate, gaps, seed) -> None:
    net = one_link(
        LinkParams(
            delay_ms=delay, jitter_ms=jitter, jitter_correlation_ms=corr, rate_mbps=rate,
            queue_ms=1000,
        ),
        seed,
    )  # fmt: skip
    times = [sum(gaps[: i + 1]) for i in range(len(gaps))]
    out = run(net, times)
    assert [i for i, _ in out] == sorted(i for i, _ in out)
    for i, due in out:
        assert due >= times[i]
    dues = [due for _, due in out]
    assert dues == sorted(dues)


@settings(max_examples=8, deadline=None)
@given(delay=st.floats(10, 150), jitter=st.floats(0.5, 10), seed=st.integers(0, 1000))
def test_drifting_jitter_keeps_the_mean_and_its_spread(delay, jitter, seed) -> None:
    """At 2,000 pkt/s over 10 s: mean within a fraction of the sd of delay_ms (no inflation
    from keeping order), spread near jitter_ms."""
    net = one_link(LinkParams(delay_ms=delay, jitter_ms=jitter), seed)
    times = [i / 2000 for i in range(20_000)]
    out = run(net, times)
    delays = [(due - times[i]) * 1e3 for i, due in out]
    assert statistics.fmean(delays) == pytest.approx(delay, abs=0.35 * jitter + 0.01)
    assert 0.6 * jitter <= statistics.pstdev(delays) <= 1.4 * jitter


@settings(max_examples=10, deadline=None)
@given(loss=st.floats(0, 0.3), seed=st.integers(0, 10_000))
def test_random_loss_converges(loss, seed) -> None:
    n = 20_000
    net = one_link(LinkParams(delay_ms=1, loss=loss), seed)
    out = run(net, [i / 2000 for i in range(n)])
    achieved = 1 - len(out) / n
    # 5 standard errors
    assert abs(achieved - loss) <= 5 * (loss * (1 - loss) / n) ** 0.5 + 1e-9
    stats = net.stages["ab"].stats
    assert stats.drops[DropCause.LOSS] == n - len(out)
    assert stats.packets_in == n and stats.packets_out == len(out)


@settings(max_examples=20, deadline=None)
@given(
    rate=st.floats(1, 50),
    offered_factor=st.floats(0.3, 3),
    queue_ms=st.floats(5, 200),
    size=st.integers(100, 1500),
)
def test_the_rate_cap_is_respected(rate, offered_factor, queue_ms, size) -> None:
    """Delivered rate never above the cap (over any window after the first packet), below it
    what is offered goes through, and the queue never holds more than queue_ms."""
    pps = offered_factor * rate * 1e6 / (8 * size)
    n = 3000
    times = [i / pps for i in range(n)]
    net = one_link(LinkParams(delay_ms=10, rate_mbps=rate, queue_ms=queue_ms))
    out = run(net, times, size)
    dues = [due for _, due in out]
    span = dues[-1] - dues[0]
    if len(out) > 1:
        assert (len(out) - 1) * size * 8 / span <= rate * 1e6 * (1 + 1e-9)
    if offered_factor < 0.95:
        assert len(out) == n
    for i, due in out:
        # queueing + one transmission + fixed delay
        assert due - times[i] <= 0.010 + queue_ms / 1e3 + size * 8 / (rate * 1e6) + 1e-9
    drops = net.stages["ab"].stats.drops
    assert drops[DropCause.QUEUE] == n - len(out)


def test_a_rate_changed_at_run_time_applies_to_the_next_packets() -> None:
    """`Stage.set_rate` (`bench quality` lifts a weak downlink's limit mid-call): 0.3 Mbit/s
    delivers 0.3 Mbit/s of a 2 Mbit/s offer, then at 10 Mbit/s everything gets through,
    and with no limit packets wait for nothing but the delay."""
    size = 1000
    net = one_link(LinkParams(delay_ms=10, rate_mbps=0.3, queue_ms=100))
    pps = 2e6 / (8 * size)
    phase = [i / pps for i in range(500)]  # 2 s
    first = run(net, phase, size)
    delivered = len(first) * size * 8 / 2.0
    assert 0.25e6 <= delivered <= 0.3e6 * 1.1, delivered
    net.stages["ab"].set_rate(10)
    assert net.stages["ab"].params.rate_mbps == 10
    later = [10 + t for t in phase]
    assert len(run(net, later, size)) == len(later)
    net.stages["ab"].set_rate(None)
    assert net.stages["ab"].params.rate_mbps is None
    dues = run(net, [20 + t for t in phase], size)
    assert all(due - (20 + phase[i]) == pytest.approx(0.010) for i, due in dues)


@settings(max_examples=10, deadline=None)
@given(
    p_gb=st.floats(0.001, 0.2),
    p_bg=st.floats(0.05, 0.9),
    seed=st.integers(0, 10_000),
)
def test_bursty_loss_state_machine(p_gb, p_bg, seed) -> None:
    """With loss_bad = 1 and no good-state loss, losses are exactly the bad states, and the
    chain leaves each state with its probability (within 5 standard errors)."""
    burst = GilbertElliott(p_good_to_bad=p_gb, p_bad_to_good=p_bg, loss_bad=1.0)
    stage = Stage("x", LinkParams(burst=burst), random.Random(seed))
    n = 40_000
    states = [False]
    lost = []
    for i in range(n):
        result = stage.offer(i * 1e-3, 100)
        states.append(stage.bad)
        lost.append(isinstance(result, DropCause))
        if isinstance(result, DropCause):
            assert result is DropCause.BURST
    assert lost == states[1:]
    for start, p in ((False, p_gb), (True, p_bg)):
        steps = [b for a, b in itertools.pairwise(states) if a is start]
        if len(steps) < 200:
            continue
        moved = sum(1 for b in steps if b is not start) / len(steps)
        assert abs(moved - p) <= 5 * (p * (1 - p) / len(steps)) ** 0.5


def test_bursty_loss_rate_converges_to_its_expectation() -> None:
    params = LinkParams(loss=0.01, burst=GilbertElliott(0.01, 0.25, 0.5))
    net = one_link(params, seed=3)
    n = 50_000
    out = run(net, [i / 2000 for i in range(n)])
    assert 1 - len(out) / n == pytest.approx(params.expected_loss, rel=0.15)
    drops = net.stages["ab"].stats.drops
    assert drops[DropCause.BURST] > 0 and drops[DropCause.LOSS] > 0


def test_same_seed_same_fate_and_stats_are_json_ready() -> None:
    params = LinkParams(delay_ms=30, jitter_ms=5, loss=0.05)
    times = [i / 1000 for i in range(2000)]
    a, b = one_link(params, 9), one_link(params, 9)
    assert run(a, times) == run(b, times)
    stats = a.stats()
    assert stats["links"]["ab"]["packets_in"] == 2000
    assert stats["paths"]["a->b"]["drops"]["loss"] == a.stages["ab"].stats.drops[DropCause.LOSS]
    assert (
        stats["paths"]["a->b"]["delay_ms"]["count"]
        == 2000 - stats["paths"]["a->b"]["drops"]["loss"]
    )


def test_a_shared_downlink_sees_packets_in_time_order() -> None:
    """Two senders far and near share one receiver's capped downlink: each stage is its own
    event, so the near packets queue behind far ones only if those really arrived first."""
    stages = {
        "far": LinkParams(delay_ms=100),
        "near": LinkParams(delay_ms=1),
        "down": LinkParams(rate_mbps=1, queue_ms=1000),
    }
    net: Network[str] = Network(stages, {("f", "r"): ["far", "down"], ("n", "r"): ["near", "down"]})
    net.submit(0.0, "f", "r", "far", 1250)  # reaches the downlink at 0.100
    net.submit(0.050, "n", "r", "near", 1250)  # reaches it at 0.051, first
    out = net.drain()
    assert [d.payload for d in out] == ["near", "far"]
    assert out[0].due == pytest.approx(0.061)  # 10 ms to send 1250 bytes at 1 Mbit/s
    assert out[1].due == pytest.approx(0.110)


def test_the_default_topology_builds_a_network() -> None:
    net = network_for(load_topology())
    net.submit(0.0, "eu-peer", "vn-peer", b"x", 100)
    assert not net.submit(0.0, "eu-peer", "nobody", b"x", 100)
    (delivery,) = net.drain()
    # fiber up + Amsterdam-HCM + fiber down
    assert 0.114 <= delivery.due <= 0.125
    assert set(net.stats()["links"]) >= {"eu-peer/up", "ams->hcm", "vn-peer/down", "sg->sg"}


def test_a_cut_stage_drops_everything_until_restored() -> None:
    """Issue 13 item 8: a link cut at run time (a fault, not the link's model)."""
    stage = Stage("ab", LinkParams(delay_ms=10), random.Random(1))
    assert isinstance(stage.offer(0.0, 100), float)
    stage.cut = True
    assert [stage.offer(0.1 + i / 1000, 100) for i in range(50)] == [DropCause.CUT] * 50
    stage.cut = False
    departure = stage.offer(0.2, 100)
    assert isinstance(departure, float) and abs(departure - 0.21) < 1e-9
    assert stage.stats.drops[DropCause.CUT] == 50
    assert stage.stats.drops[DropCause.LOSS] == 0
    assert stage.stats.packets_out == 2

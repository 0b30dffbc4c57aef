"""`sfumesh bench scale`: the pure parts (fits, ramp, Redis and statsd counting), and a tiny
real run (one room of two on a pinned node, a mesh of two) that checks every key."""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
from aiortc import RTCPeerConnection

from node.bench.forward import media as bench_media
from node.bench.forward.peers import RoomSubscriber
from node.bench.forward.sfumesh import SfumeshSignalling
from node.bench.scale import (
    Step,
    analyse,
    cpu_bound,
    fit_power_law,
    merge_rooms,
    next_rooms,
    node_counts_up_to,
    parse_statsd,
    ramp_over,
    redis_calls,
    rooms_for,
    step_passes,
)
from node.cli.main import main
from node.local.netns import in_private_netns
from node.media import adapter
from tests.node.media.test_room_media import until


def test_power_law_fit_recovers_the_exponent() -> None:
    xs = [4.0, 8.0, 16.0, 32.0]
    law = fit_power_law(xs, [3.0 * x**1.5 for x in xs])
    assert law is not None
    assert law.exponent == pytest.approx(1.5)
    assert law.coefficient == pytest.approx(3.0)
    assert fit_power_law([4.0], [1.0]) is None
    # non-positive values cannot be on a log-log line: left out
    assert fit_power_law([4.0, 8.0], [0.0, 2.0]) is None


def test_ramp_grows_then_the_limits_decide() -> None:
    assert [next_rooms(r) for r in (1, 2, 3, 4, 6)] == [2, 3, 5, 6, 9]
    # --start 40 --step 4 in rooms of 4: 10 rooms, then one more each step
    assert rooms_for(40, 4) == 10 and rooms_for(None, 4) is None
    assert [next_rooms(r, rooms_for(4, 4)) for r in (10, 11)] == [11, 12]
    assert rooms_for(3, 4) == 1  # whole rooms: at least one
    assert next_rooms(10, rooms_for(6, 4)) == 12
    assert step_passes(49.0, 0.004)
    assert not step_passes(51.0, 0.0)
    assert not step_passes(10.0, 0.006)
    assert not step_passes(None, 0.0)


def test_a_failed_step_goes_on_until_the_node_is_busy_or_loses() -> None:
    late = Step(size=4, rooms=1, participants=4, core_share=0.2, loss=0.0)
    assert not ramp_over(late)  # the clients were late: the node's CPU is still measured
    assert ramp_over(Step(size=4, rooms=2, participants=8, core_share=0.95, loss=0.0))
    assert ramp_over(Step(size=4, rooms=2, participants=8, core_share=0.2, loss=0.06))
    assert ramp_over(Step(size=4, rooms=2, participants=8, error="TimeoutError"))


def test_cpu_bound_is_the_line_through_the_steps() -> None:
    # 50 ms/s fixed plus 20 ms/s per participant: a core holds (1000 - 50) / 20 = 47.5
    steps = [
        Step(
            size=4,
            rooms=r,
            participants=4 * r,
            window_s=10.0,
            node_cpu_s=(50 + 80 * r) / 100,
            loss=0.0,
        )
        for r in (1, 2, 3)
    ]
    # clients that collapsed (most packets lost) say nothing about the node's cost
    collapsed = Step(size=4, rooms=5, participants=20, window_s=10.0, node_cpu_s=0.1, loss=0.7)
    assert cpu_bound([*steps, collapsed]) == cpu_bound(steps)
    slope, holds = cpu_bound(steps)
    assert slope == pytest.approx(20.0)
    assert holds == pytest.approx(47.5)
    assert cpu_bound(steps[:1]) == (None, None)


def test_a_room_over_two_processes_is_one_room_again() -> None:
    replies = [
        {"publishers": ["a0", "a1"], "subscribers": ["s0", "s1"]},
        {"publishers": ["b0"], "subscribers": ["t0"]},
        {"publishers": ["a2"], "subscribers": ["s2"]},
    ]
    assert merge_rooms([0, 1, 0], replies) == [
        {"publishers": ["a0", "a1", "a2"], "subscribers": ["s0", "s1", "s2"]},
        {"publishers": ["b0"], "subscribers": ["t0"]},
    ]


def test_node_counts() -> None:
    assert node_counts_up_to(16) == [4, 8, 16]
    assert node_counts_up_to(20) == [4, 8, 16, 20]
    assert node_counts_up_to(2) == [2]
    assert node_counts_up_to(0) == []


def test_redis_calls_leave_info_out_and_statsd_lines_parse() -> None:
    stats = {
        "cmdstat_get": {"calls": 5},
        "cmdstat_info": {"calls": 9},
        "cmdstat_evalsha": {"calls": 2},
    }
    assert redis_calls(stats) == 7
    lines = parse_statsd(b"serf-agent.memberlist.udp.sent:120|c\nbad\nx.gossip:0.2|ms\n")
    assert lines == [("serf-agent.memberlist.udp.sent", "c", 120.0), ("x.gossip", "ms", 0.2)]


def _frames(start_ts: int, t0: float, count: int) -> list[tuple[int, float]]:
    from node.bench.forward import media as bench_media

    out: list[tuple[int, float]] = []
    ts = start_ts
    for n in range(1, count + 1):
        ts = (ts + bench_media.video_ts_step(n)) & 0xFFFFFFFF
        out.append((ts, t0 + n / 30))
    return out


def test_analysis_matches_each_track_to_its_publisher_and_counts_loss() -> None:
    a, b = _frames(1000, 10.0, 120), _frames(77_000_000, 10.01, 120)
    offset, delay = 555_555, 0.020
    # participant 0 receives b's video, 20 ms late; participant 1 receives a's, too late
    # (the kernel's receive stamp and the handler's time alike)
    got_b = [[(ts + offset) & 0xFFFFFFFF, t + delay, t + delay] for ts, t in b[60:]]
    got_a = [[ts, t + 0.080, t + 0.080] for ts, t in a[60:]]
    stream = {"expected": 1000, "lost": 3}
    start = {
        "t": 0.0,
        "cpu": 1.0,
        "machine": (0.0, 0.0),
        "rooms": [{"publishers": [{"frames": a[:60]}, {"frames": b[:60]}], "subscribers": []}],
    }
    end = {
        "t": 10.0,
        "cpu": 3.0,
        "machine": (5.0, 10.0),
        "rooms": [
            {
                "publishers": [{"frames": a[60:]}, {"frames": b[60:]}],
                "subscribers": [
                    {"streams": {"video-0": stream}, "tracks": {"video-0": got_b}},
                    {"streams": {"video-0": stream}, "tracks": {"video-0": got_a}},
                ],
            }
        ],
    }
    step = Step(size=2, rooms=1, participants=2)
    analyse(step, start, end)
    assert step.cpu_ms_per_participant_s == pytest.approx(100.0)
    assert step.loss == pytest.approx(0.003)
    assert step.unaligned_tracks == 0
    assert step.latency_p50_ms is not None and 20.0 <= step.latency_p50_ms <= 80.0
    assert step.latency_p99_ms == pytest.approx(80.0)
    assert step.latency_clock == "kernel"
    assert not step.passed  # 80 ms p99 is over the 50 ms limit


@pytest.mark.slow
def test_tiny_real_run_writes_every_key(tmp_path: Path) -> None:
    if not in_private_netns():
        pytest.fail("run pytest in the private network namespace (./scripts/test does)")
    out = tmp_path / "scale.json"
    argv = [
        "bench",
        "scale",
        "--sizes",
        "2",
        "--max-participants",
        "2",
        "--start",
        "2",
        "--step",
        "2",
        "--max-nodes",
        "2",
        "--people",
        "2",
        "--duration",
        "3",
        "--warmup",
        "0.5",
        "--json",
        str(out),
        "--workdir",
        str(tmp_path / "work"),
    ]
    assert main(argv) == 0
    figures = json.loads(out.read_text())
    for key in (
        "participants_per_core",
        "cpu_ms_per_participant_s",
        "serf_msgs_per_s",
        "redis_ops_per_join",
        "fits",
    ):
        assert key in figures, key
    assert set(figures["participants_per_core"]) == {"2"}
    assert figures["participants_per_core"]["2"] in (0, 2)
    assert figures["cpu_ms_per_participant_s"]["2"] > 0
    (step,) = figures["steps"]
    assert step["expected"] > 0 and step["latency_frames"] > 0
    # the kernel's receive stamps were read: never later than the handler's clock
    assert figures["latency_clock"] == step["latency_clock"] == "kernel"
    assert step["frames_without_kernel_stamp"] == 0
    assert step["latency_p50_ms"] <= step["latency_p50_ms_handler"]
    assert step["latency_p99_ms"] <= step["latency_p99_ms_handler"]
    # the node's collector pauses, from its /metrics (its start-up freeze is a full one)
    assert step["gc_full_collections"] >= 0 and step["gc_pause_max_ms"] > 0
    assert 0 <= step["gc_pause_share"] < 1
    assert figures["serf_msgs_per_s"]["2"] > 0
    assert figures["redis_ops_per_join"]["2"] > 0
    assert math.isfinite(figures["redis_ops_per_join"]["2"])
    assert set(figures["fits"]) >= {"serf_msgs_per_s_vs_nodes", "redis_ops_per_join_vs_nodes"}
    assert out.with_suffix(".png").stat().st_size > 0


def _room(sent: list[tuple[int, float]], received: list[Any]) -> dict[str, Any]:
    """One room's mark: participant 0 receives participant 1's video (`received`)."""
    return {
        "publishers": [{"frames": []}, {"frames": sent}],
        "subscribers": [
            {"streams": {"video-0": {"expected": 10, "lost": 0}}, "tracks": {"video-0": received}}
        ],
    }


def _marks(sent: list[tuple[int, float]], received: list[Any]) -> tuple[Any, Any]:
    start = {"t": 0.0, "cpu": 0.0, "machine": (0.0, 0.0), "rooms": [_room([], [])]}
    end = {"t": 10.0, "cpu": 1.0, "machine": (1.0, 2.0), "rooms": [_room(sent, received)]}
    return start, end


def test_latency_is_the_kernels_arrival_unless_a_frame_has_no_stamp() -> None:
    sent = _frames(5000, 10.0, 90)
    # through the node in 5 ms; the client's handler got to each frame 70 ms later still
    received: list[list[float | None]] = [[ts, t + 0.005, t + 0.075] for ts, t in sent]
    step = Step(size=2, rooms=1, participants=2)
    analyse(step, *_marks(sent, received))
    assert step.latency_clock == "kernel" and step.frames_without_kernel_stamp == 0
    assert step.latency_p99_ms == pytest.approx(5.0)
    assert step.latency_p99_ms_handler == pytest.approx(75.0)
    assert step.passed  # the client's own backlog is not the node's latency
    # one frame without a kernel stamp: the whole step on the handler's clock, never mixed
    received[10][1] = None
    step = Step(size=2, rooms=1, participants=2)
    analyse(step, *_marks(sent, received))
    assert step.latency_clock == "handler" and step.frames_without_kernel_stamp == 1
    assert step.latency_p99_ms == pytest.approx(75.0)
    assert not step.passed


async def test_a_blocked_client_loop_does_not_count_as_latency() -> None:
    """A participant's receiving side (`RoomSubscriber`, negotiated directly with a tapped
    sender here; its signalling is never used) in a process that stamps arrivals. The
    loop is blocked 30 ms after each frame is sent, so each waits in the socket buffer
    30-360 ms before the handler sees it: the bench's latency leaves that out; the
    handler's clock (the old measure) counts it."""
    assert adapter.stamp_arrivals()
    adapter.set_host_addresses(["127.0.0.1"])
    unused = {"url": "http://127.0.0.1:9", "user_token": "unused", "room": "unused"}
    receiver = RoomSubscriber(0, SfumeshSignalling(unused, "participant"), 1)
    sender = RTCPeerConnection(adapter.rtc_configuration())
    try:
        sink = adapter.tap_sender(sender.addTransceiver("video", direction="sendonly").sender)
        await sender.setLocalDescription(await sender.createOffer())
        await receiver.pc.setRemoteDescription(sender.localDescription)
        await receiver.pc.setLocalDescription(await receiver.pc.createAnswer())
        await sender.setRemoteDescription(receiver.pc.localDescription)
        await asyncio.wait_for(sink.wait_ready(), 10)
        dtls = receiver.pc.getTransceivers()[0].receiver.transport
        await until(lambda: dtls.state == "connected", "the receiver's DTLS", 10)
        assert sink.payload_type is not None
        receiver.mark()  # the window starts now
        sent: list[tuple[int, float]] = []
        timestamp = 77_000
        for number in range(1, 13):
            timestamp = (timestamp + bench_media.video_ts_step(number)) & 0xFFFFFFFF
            stamp = adapter.send_stamp()
            sequence = 500 + number
            assert sink.write(sink.payload_type, 1, sequence, timestamp, bytes(200), None, stamp)
            sent.append((timestamp, time.time()))  # as `Publisher` does: after the sendto
            time.sleep(0.03)  # noqa: ASYNC251 (the point: the client's loop is busy)
        await until(
            lambda: sum(len(f) for f in receiver.track_frames.values()) >= len(sent), "frames", 10
        )
        report = receiver.mark()
    finally:
        await sender.close()
        await receiver.pc.close()
        adapter.set_host_addresses(None)
        adapter.stamp_arrivals(False)
    (received,) = report["tracks"].values()
    assert all(kernel is not None for _, kernel, _ in received)
    step = Step(size=2, rooms=1, participants=2)
    start = {"t": 0.0, "cpu": 0.0, "machine": (0.0, 0.0), "rooms": [_room([], [])]}
    room = _room(sent, received)
    room["subscribers"][0]["streams"] = report["streams"]
    end = {"t": 10.0, "cpu": 1.0, "machine": (1.0, 2.0), "rooms": [room]}
    analyse(step, start, end)
    assert step.latency_clock == "kernel" and step.latency_frames == len(sent)
    assert step.loss == 0.0
    # each frame waited at least 30 ms for the blocked loop; none of it is counted
    assert step.latency_p50_ms_handler is not None and step.latency_p50_ms_handler >= 30.0
    assert step.latency_p99_ms is not None and step.latency_p99_ms < 30.0
    assert step.passed

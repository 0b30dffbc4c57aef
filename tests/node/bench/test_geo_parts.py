"""`bench geo`'s parts without a lab: the painted capture time survives VP8, variants are
transforms of the loaded topology that a lab can be built from, and the figures follow
their definitions (freezes, the longest gap, loss before and after repair)."""

from __future__ import annotations

import asyncio
import statistics

import numpy as np
import pytest
from aiortc.codecs.vpx import Vp8Decoder, Vp8Encoder, vp8_depayload
from aiortc.jitterbuffer import JitterFrame
from av import VideoFrame

from node.bench.geo import (
    congested_sg_hcm,
    lossy_long_haul,
    truly_closest,
)
from node.bench.geo_figures import caveat, direction_figures, verdicts, wire_loss
from node.bench.geo_media import CameraTrack, frame_luma, paint_stamp, read_stamp
from node.lab.topology import load_topology, parse_topology, topology_toml


def test_the_stamp_reads_back_after_vp8_and_a_damaged_one_is_refused() -> None:
    async def frames() -> list[tuple[int, int | None]]:
        camera = CameraTrack(640, 360)
        encoder, decoder = Vp8Encoder(), Vp8Decoder()
        encoder.target_bitrate = 1_500_000
        seen = []
        for index in range(20):
            frame = await camera.recv()
            payloads, stamp = encoder.encode(frame, force_keyframe=index == 0)
            data = b"".join(vp8_depayload(p) for p in payloads)
            for decoded in decoder.decode(JitterFrame(data=data, timestamp=stamp)):
                assert isinstance(decoded, VideoFrame)
                seen.append((camera.painted[-1], read_stamp(frame_luma(decoded))))
        return seen

    seen = asyncio.run(frames())
    assert len(seen) == 20
    assert all(painted == read for painted, read in seen)

    luma = np.full((360, 640), 128, dtype=np.uint8)
    paint_stamp(luma, 123_456_789)
    assert read_stamp(luma) == 123_456_789
    block = 640 // 26
    x0 = (640 - 24 * block) // 2
    luma[block // 2 : block // 2 + block, x0 : x0 + block] ^= 0xFF  # one bit flipped
    assert read_stamp(luma) is None


def test_variants_are_topology_transforms_a_lab_can_read() -> None:
    base = load_topology(None)
    assert parse_topology(topology_toml(base)).core == base.core
    lossy = parse_topology(topology_toml(lossy_long_haul(base)))
    for a, b in (("ams", "sg"), ("sg", "ams"), ("ams", "hcm"), ("hcm", "ams")):
        assert lossy.core[(a, b)].loss == 0.02
    assert lossy.core[("sg", "hcm")] == base.core[("sg", "hcm")]
    congested = parse_topology(topology_toml(congested_sg_hcm(base)))
    for a, b in (("sg", "hcm"), ("hcm", "sg")):
        assert congested.core[(a, b)].delay_ms == base.core[(a, b)].delay_ms + 80
        assert congested.core[(a, b)].loss == 0.01
    assert congested.core[("ams", "sg")] == base.core[("ams", "sg")]
    assert congested.hosts == base.hosts
    assert truly_closest(base, "eu-peer") == "sg-node"
    assert truly_closest(base, "vn-peer") == "hcm-node"


def _path(packets_in: int, drops: int) -> dict[str, object]:
    return {"packets_in": packets_in, "drops": {"random": drops}}


def test_direction_figures_follow_their_definitions() -> None:
    start, end = 1_000_000, 1_010_000
    painted = list(range(start - 500, end, 33))
    # decoded 100 ms after painting, except a hole of 1.5 s (a freeze) and its frames
    hole = range(start + 3000, start + 4500)
    frames: list[tuple[int, int | None]] = [
        (c + 100, c) for c in painted if c not in hole and c + 100 <= end
    ]
    frames.append((start + 6000, None))  # a misread one still counts as shown
    # decoded in the same millisecond as a readable one (the full run once failed on it)
    frames.append((start + 6000, start + 5900))
    samples = [
        {"t_ms": start + i * 1000, "bytes_received": i * 187_500, "video_jitter_ts": 900}
        for i in range(11)
    ]
    sender = {"painted": painted, "samples": [], "node": "a"}
    receiver = {"frames": frames, "samples": samples, "node": "b", "misread": 1}
    stats = (
        {"paths": {"s->a": _path(0, 0), "a->b": _path(0, 0), "b->r": _path(0, 0)}},
        {"paths": {"s->a": _path(1000, 10), "a->b": _path(1000, 20), "b->r": _path(1000, 0)}},
    )
    result = direction_figures(
        "v", 1, "s->r", sender, receiver, ("s", "r"), (start, end), stats, 30.0
    )
    f = result.figures
    assert f["freezes"] == 1 and 1.4 <= f["freeze_s"] <= 1.6
    assert f["longest_gap_s"] == f["freeze_s"]
    assert f["latency_ms_p50"] == 100.0
    assert f["video_mbps"] == 1.5
    assert f["jitter_ms"] == 10.0
    expected = [c for c in painted if start <= c <= end - 1000]
    missing = [c for c in expected if c in hole]
    assert f["loss_after_repair"] == round(len(missing) / len(expected), 4)
    assert f["loss_before_repair"] == round(1 - 0.99 * 0.98, 4)
    assert f["nodes"] == ["a", "b"]
    assert f["rtt_hops_ms"]["relay"] == 30.0
    assert len(result.series["fps"]) == 10
    fps = statistics.fmean(x or 0.0 for x in result.series["fps"])
    assert fps == pytest.approx(f["fps"], rel=0.05)
    assert wire_loss(stats, [("s", "x")]) is None


def test_the_answer_is_computed_from_the_rows() -> None:
    def row(scenario: int, latency: float, freeze: float) -> dict[str, object]:
        return {
            "variant": "v",
            "scenario": scenario,
            "latency_ms_p50": latency,
            "latency_ms_p95": latency,
            "fps": 30.0,
            "video_mbps": 1.5,
            "loss_after_repair": 0.0,
            "freeze_s": freeze,
            "longest_gap_s": 0.1,
        }

    assert ": yes" in verdicts([row(1, 150, 0), row(2, 170, 0), row(3, 220, 0)])["v"]
    answer = verdicts([row(1, 300, 0), row(2, 170, 0), row(3, 220, 0)])["v"]
    assert ": no" in answer and "HCM" in answer and "300 ms relayed" in answer


def test_a_run_short_of_cpu_says_so() -> None:
    idle = {
        "emulator": {"delay_error_ms_p99": 0.4},
        "scenarios": [{"fps": 29.8}, {"fps": 30.0}],
        "machine": {"after": {"cpus": 2, "loadavg_5m": 0.7}},
    }
    assert caveat(idle) is None
    starved = {
        "emulator": {"delay_error_ms_p99": 72.5},
        "scenarios": [{"fps": 9.4}, {"fps": 13.4}],
        "machine": {"after": {"cpus": 2, "loadavg_5m": 24.4}},
    }
    warning = caveat(starved)
    assert warning is not None
    assert "72.5 ms" in warning and "13 of 30 fps" in warning and "24.4 on 2 CPUs" in warning

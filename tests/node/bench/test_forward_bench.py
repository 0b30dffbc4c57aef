"""`sfumesh bench forward`: the analysis on synthetic data, and a short real run."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from node.bench.forward import media as bench_media
from node.bench.forward.peers import StreamCounter, window_counts
from node.bench.forward.run import (
    BenchConfig,
    Window,
    aggregate,
    estimate_offset,
    fit_line,
    fits,
    frame_latencies,
    janus_module_available,
    parse_publishers,
    plan,
    plan_ingest,
    ratios,
    split_evenly,
)
from node.bench.forward.systems import channel_spec
from node.cli.main import main
from node.local.netns import in_private_netns

ISSUE_KEYS = (
    "system",
    "subscribers",
    "cpu_us_per_packet",
    "packets_per_s",
    "added_latency_ms_p50",
    "added_latency_ms_p99",
    "loss",
)


def _publisher(frames: int, start_ts: int = 4_000_000_000) -> list[tuple[int, float]]:
    """Frames as the publisher numbers them (irregular steps), sent at 30 fps."""
    out = []
    ts = start_ts
    for n in range(1, frames + 1):
        ts = (ts + bench_media.video_ts_step(n)) & 0xFFFFFFFF
        out.append((ts, 100.0 + n / 30))
    return out


def test_timestamp_steps_are_irregular_and_average_one_frame() -> None:
    steps = [bench_media.video_ts_step(n) for n in range(1, 3001)]
    assert all(2970 <= s <= 3030 for s in steps)
    assert len(set(steps)) > 50
    assert abs(sum(steps) / len(steps) - 3000) < 2


def test_alignment_finds_the_offset_and_the_latencies() -> None:
    rng = random.Random(7)
    published = _publisher(600)  # wraps past 2**32 on the way
    offset = 123_456_789
    received = []
    expected = {}
    for index, (ts, sent) in enumerate(published[200:500]):
        if index % 3 == 1:
            continue  # frames the SFU dropped
        delay = rng.uniform(0.001, 0.080)
        received.append(((ts + offset) & 0xFFFFFFFF, sent + delay))
        expected[(ts + offset) & 0xFFFFFFFF] = delay
    assert estimate_offset(published, received) == offset
    latencies = frame_latencies(published, received)
    assert latencies is not None and len(latencies) == len(received)
    for (ts, _), latency in zip(received, latencies, strict=True):
        assert latency == pytest.approx(expected[ts])


def test_alignment_tolerates_timestamps_rounded_by_a_tick() -> None:
    # MediaRelay's decoder and re-encoder sometimes move a timestamp by one tick.
    published = _publisher(300)
    offset = 987_654
    received = [
        ((ts + offset + (n % 3) - 1) & 0xFFFFFFFF, sent + 0.040)
        for n, (ts, sent) in enumerate(published[100:250])
    ]
    found = estimate_offset(published, received)
    assert found is not None and abs(found - offset) <= 1
    latencies = frame_latencies(published, received)
    assert latencies is not None and len(latencies) == len(received)
    assert all(x == pytest.approx(0.040) for x in latencies)


def test_alignment_survives_seconds_of_delay_and_refuses_unrelated_frames() -> None:
    published = _publisher(900)
    offset = 42
    late = [((ts + offset) & 0xFFFFFFFF, sent + 4.5) for ts, sent in published[300:600:4]]
    latencies = frame_latencies(published, late)
    assert latencies is not None and all(x == pytest.approx(4.5) for x in latencies)
    # A stream of regular steps that is not the publisher's matches no single offset.
    unrelated = [(n * 3000 + 17, 100.0 + n / 30 + 0.01) for n in range(300, 600)]
    assert estimate_offset(published, unrelated) is None
    assert frame_latencies(published, []) is None


def test_stream_counter_counts_gaps_late_packets_and_duplicates() -> None:
    counter = StreamCounter()
    for seq in (65533, 65534, 65535, 0, 1):  # wraps
        counter.add(1, seq, 100)
    before = counter.snapshot()
    for seq in (2, 5, 6, 3, 3, 8):  # 4 and 7 lost, 3 late then duplicated
        counter.add(1, seq, 100)
    counts = window_counts(before, counter.snapshot())
    assert counts == {
        "packets": 6,
        "bytes": 600,
        "expected": 7,
        "lost": 2,
        "late": 1,
        "duplicates": 1,
    }
    counter.add(2, 500, 100)  # a new SSRC continues the numbering
    counter.add(2, 501, 100)
    assert counter.ssrc_changes == 1
    assert window_counts(before, counter.snapshot())["expected"] == 9


def test_slope_fit_and_ratios() -> None:
    line = fit_line([1, 4, 16, 32], [5 + 2 * k for k in (1, 4, 16, 32)])
    assert line is not None
    assert line.slope == pytest.approx(2) and line.intercept == pytest.approx(5)
    assert fit_line([4, 4], [1, 2]) is None

    windows = []
    for k in (1, 4, 16, 32):
        # sfumesh: 5 % base + 6000 us/s per subscriber at 200 pkt/s each -> 30 us/packet
        windows.append(_window("sfumesh", k, 0.05 + 0.006 * k, 200 * k))
        # janus: 45 us/packet
        windows.append(_window("janus", k, 0.02 + 0.009 * k, 200 * k))
        # mediarelay: 30 % per subscriber, and it falls behind at K >= 16
        windows.append(_window("mediarelay", k, 0.3 * k, 110 * k, kept_up=k < 16))
    fitted = {f["system"]: f for f in fits(windows, ["sfumesh", "mediarelay", "janus"])}
    assert fitted["sfumesh"]["marginal_us_per_packet"] == pytest.approx(30)
    assert fitted["sfumesh"]["intercept_cpu_pct"] == pytest.approx(5)
    assert fitted["janus"]["marginal_us_per_packet"] == pytest.approx(45)
    assert fitted["mediarelay"]["subscribers_used"] == [1, 4]
    assert fitted["mediarelay"]["subscribers_excluded"] == [16, 32]
    compared = ratios(list(fitted.values()))
    assert compared["cpu_per_subscriber"]["mediarelay/sfumesh"] == pytest.approx(50)
    assert compared["cpu_per_subscriber"]["janus/sfumesh"] == pytest.approx(1.5)
    assert compared["targets"]["mediarelay_ratio_met"] is True
    assert compared["targets"]["sfumesh_marginal_met"] is True


def test_ingest_fit_and_its_ratio_to_janus() -> None:
    """Issue 19: CPU against P publishers (one subscriber each), per packet a publisher
    sends, beside Janus-1's; minus the fan-out slope it is the ingest alone."""
    windows = []
    for k in (1, 4, 16):
        windows.append(_window("sfumesh", k, 0.05 + 0.004 * k, 200 * k))  # 20 us/packet
    for p in (1, 2, 4, 8):
        # sfumesh: 3 % base + 12000 us/s per publisher at 200 pkt/s -> 60 us/packet
        windows.append(_ingest("sfumesh", p, 0.03 + 0.012 * p, 200 * p))
        # janus-1: 25 us/packet; at P = 8 it fell behind (left out of the fit)
        windows.append(_ingest("janus-event-loops-1", p, 0.02 + 0.005 * p, 200 * p, p < 8))
    fitted = {f["system"]: f for f in fits(windows, ["sfumesh"])}
    assert set(fitted) == {"sfumesh", "janus-event-loops-1"}
    sfumesh, janus = fitted["sfumesh"], fitted["janus-event-loops-1"]
    assert sfumesh["marginal_us_per_packet"] == pytest.approx(20)
    assert sfumesh["ingest_us_per_packet"] == pytest.approx(60)
    assert sfumesh["ingest_only_us_per_packet"] == pytest.approx(40)
    assert sfumesh["ingest_intercept_cpu_pct"] == pytest.approx(3)
    assert sfumesh["ingest_publishers_used"] == [1, 2, 4, 8]
    assert janus["ingest_us_per_packet"] == pytest.approx(25)
    assert janus["ingest_publishers_excluded"] == [8]
    assert janus["marginal_us_per_packet"] is None  # no fan-out windows of its own
    compared = ratios(list(fitted.values()))
    assert compared["ingest_per_packet"]["sfumesh/janus-event-loops-1"] == pytest.approx(2.4)
    assert compared["targets"]["ingest_ratio_met"] is False
    # the fan-out rows leave the ingest windows out, and the ingest rows are their own
    assert {r["system"] for r in aggregate(windows)} == {"sfumesh"}
    ingest_rows = aggregate(windows, "ingest")
    assert [(r["system"], r["publishers"]) for r in ingest_rows][:2] == [
        ("sfumesh", 1),
        ("sfumesh", 2),
    ]


def test_channel_specs_give_each_pair_its_own_room_or_feed() -> None:
    spec = {"system": "janus", "url": "u", "room": 1234, "feed": 1}
    assert channel_spec(spec, 0) is spec
    with pytest.raises(ValueError):
        channel_spec(spec, 1)
    many = {**spec, "channels": [{"feed": 1}, {"feed": 2}]}
    assert channel_spec(many, 1)["feed"] == 2 and channel_spec(many, 1)["room"] == 1234
    assert parse_publishers("0") == [] and parse_publishers("1,2,4,8") == [1, 2, 4, 8]
    with pytest.raises(ValueError):
        parse_publishers("1,100")
    config = BenchConfig(subscribers=[1], rounds=2, publishers=[1, 2])
    steps = plan_ingest(config)
    assert [(p, r) for p, r, _ in steps] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert steps[0][2] == ["sfumesh", "janus-event-loops-1"]
    assert steps[1][2] == ["janus-event-loops-1", "sfumesh"]


def _ingest(system: str, p: int, cpu_per_s: float, pps: float, kept_up: bool = True) -> Window:
    window = _window(system, p, cpu_per_s, pps, kept_up)
    window.kind = "ingest"
    window.publishers = p
    return window


def _window(system: str, k: int, cpu_per_s: float, pps: float, kept_up: bool = True) -> Window:
    window = Window(system, k, 0, 0)
    window.window_s = 10.0
    window.cpu_s = cpu_per_s * 10
    window.packets_per_s = pps
    window.publisher_frames = 300
    window.frames_received = 300 if kept_up else 100
    return window


def test_plan_alternates_the_order_and_limits_mediarelay() -> None:
    config = BenchConfig(
        subscribers=[1, 4, 16],
        rounds=2,
        systems=["sfumesh", "mediarelay", "janus"],
        max_mediarelay=4,
    )
    steps = plan(config)
    assert [(k, r) for k, r, _ in steps] == [(1, 0), (1, 1), (4, 0), (4, 1), (16, 0), (16, 1)]
    assert steps[0][2] == ["sfumesh", "mediarelay", "janus"]
    assert steps[1][2] == ["janus", "mediarelay", "sfumesh"]
    assert steps[4][2] == ["sfumesh", "janus"]
    assert steps[5][2] == ["janus", "sfumesh"]
    assert split_evenly(32, 8) == [8, 8, 8, 8]
    assert split_evenly(9, 8) == [5, 4]
    assert split_evenly(1, 8) == [1]


def test_media_cache_round_trip(tmp_path: Path) -> None:
    params = bench_media.MediaParams(width=160, height=96, seconds=1.0)
    media, path = bench_media.load_or_encode(params, tmp_path)
    assert path.exists() and len(media.video) == 30 and len(media.audio) == 50
    assert media.keyframes[0] and not any(media.keyframes[1:])
    again, _ = bench_media.load_or_encode(params, tmp_path)
    assert again.video == media.video and again.audio == media.audio


@pytest.fixture(autouse=True)
def _keep_test_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("node.cli.main.setup_logging", lambda *_: None)


@pytest.mark.slow
def test_short_real_run_writes_every_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if not in_private_netns():
        pytest.fail("run pytest in the private network namespace (./scripts/test does)")
    # scripts/setup installs janus: all three systems, always.
    assert janus_module_available() and shutil.which("janus") is not None
    systems = ["sfumesh", "mediarelay", "janus"]
    out = tmp_path / "forward.json"
    argv = [
        "bench",
        "forward",
        "--subscribers",
        "1,2",
        "--rounds",
        "1",
        "--window",
        "2",
        "--warmup",
        "1",
        "--systems",
        ",".join(systems),
        "--publishers",
        "1,2",
        "--ingest-systems",
        "sfumesh,janus-event-loops-1",
        "--json",
        str(out),
        "--workdir",
        str(tmp_path / "work"),
    ]
    code = main(argv)
    printed = capsys.readouterr()
    assert code == 0, printed.out + printed.err
    figures = json.loads(out.read_text())
    rows = {(r["system"], r["subscribers"]): r for r in figures["results"]}
    assert set(rows) == {(s, k) for s in systems for k in (1, 2)}
    for (system, k), row in rows.items():
        for key in (*ISSUE_KEYS, "rounds", "clean_windows", "retransmissions"):
            assert key in row, (system, k, key)
        assert row["rounds"] == 1 and not row["errors"], row
        assert row["packets_per_s"] > 0, row
        for key in ("cpu_us_per_packet", "added_latency_ms_p50", "added_latency_ms_p99"):
            value = row[key]
            assert isinstance(value, int | float) and not isinstance(value, bool), (key, row)
        assert row["added_latency_ms_p50"] <= row["added_latency_ms_p99"]
        if system == "sfumesh":
            assert row["loss"] == 0, row
    assert {f["system"] for f in figures["fits"]} == {*systems, "janus-event-loops-1"}
    assert "cpu_per_subscriber" in figures["ratios"]
    # issue 19: the ingest fit, sfumesh beside Janus-1 with the same clients
    ingest = {(r["system"], r["publishers"]): r for r in figures["ingest"]}
    assert set(ingest) == {(s, p) for s in ("sfumesh", "janus-event-loops-1") for p in (1, 2)}
    for row in ingest.values():
        assert row["rounds"] == 1 and not row["errors"] and row["packets_per_s"] > 0, row
    # two publishers, two subscribers: twice the packets of one
    for system in ("sfumesh", "janus-event-loops-1"):
        one, two = ingest[(system, 1)]["packets_per_s"], ingest[(system, 2)]["packets_per_s"]
        assert 1.6 * one < two < 2.4 * one, (system, one, two)
    for fit in figures["fits"]:
        if fit["system"] in ("sfumesh", "janus-event-loops-1"):
            value = fit["ingest_us_per_packet"]
            assert isinstance(value, int | float) and not isinstance(value, bool), fit
    assert "sfumesh/janus-event-loops-1" in figures["ratios"]["ingest_per_packet"]
    assert "us per ingested packet" in printed.out
    assert "sfumesh" in printed.out and "us per forwarded packet" in printed.out


@pytest.mark.slow
def test_simulcast_run_compares_with_janus_one_event_loop(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 14's last benchmark, tiny: sfumesh forwarding the synthetic simulcast
    publisher's layers to subscribers whose tiles choose them, beside Janus with one event
    loop (single encoding, same subscribers) and Janus with one event loop forwarding the
    same three loops as plain feeds to the same tiles, the ratios reported."""
    if not in_private_netns():
        pytest.fail("run pytest in the private network namespace (./scripts/test does)")
    assert janus_module_available() and shutil.which("janus") is not None
    systems = ["sfumesh-simulcast", "janus-event-loops-1", "janus-layers-event-loops-1"]
    out = tmp_path / "forward.json"
    argv = [
        "bench",
        "forward",
        "--subscribers",
        "1,3",
        "--rounds",
        "1",
        "--window",
        "3",
        "--warmup",
        "2",
        "--systems",
        ",".join(systems),
        "--json",
        str(out),
        "--workdir",
        str(tmp_path / "work"),
        "--plot",
        str(tmp_path / "forward.png"),
    ]
    code = main(argv)
    printed = capsys.readouterr()
    assert code == 0, printed.out + printed.err
    assert (tmp_path / "forward.png").read_bytes().startswith(b"\x89PNG")
    figures = json.loads(out.read_text())
    rows = {(r["system"], r["subscribers"]): r for r in figures["results"]}
    assert set(rows) == {(s, k) for s in systems for k in (1, 3)}
    for row in rows.values():
        assert row["rounds"] == 1 and not row["errors"], row
    # the tiles chose the layers: subscriber 0 (320x180) gets the smallest encoding, the
    # three of K=3 (small, medium, large) far more packets each on average
    one, three = rows[("sfumesh-simulcast", 1)], rows[("sfumesh-simulcast", 3)]
    assert three["packets_per_s"] / 3 > 1.3 * one["packets_per_s"], (one, three)
    assert three["frame_delivery"] > 0.8, three
    # Janus's layer feeds send each tile the stream sfumesh's layer selection chose for it
    # (the ingest differs, three publishers against one, what leaves does not)
    for k in (1, 3):
        ours, janus = rows[("sfumesh-simulcast", k)], rows[("janus-layers-event-loops-1", k)]
        assert 0.8 < janus["packets_per_s"] / ours["packets_per_s"] < 1.25, (ours, janus)
        assert janus["frame_delivery"] > 0.8, janus
    simulcast = figures["simulcast"]
    for key in (
        "simulcast_us_per_packet",
        "janus_event_loops_1_us_per_packet",
        "simulcast_over_janus_event_loops_1",
        "janus_layers_us_per_packet",
        "simulcast_over_janus_layers",
        "target_met",
    ):
        assert key in simulcast, key
    assert simulcast["tiles"] == ["320x180", "640x360", "1280x720"]
    assert isinstance(simulcast["simulcast_over_janus_layers"], float), simulcast
    assert "simulcast <= Janus event_loops=1" in printed.out
    assert "the same layers as plain feeds" in printed.out


def test_the_plot_draws_a_panel_per_kind_of_window(tmp_path: Path) -> None:
    from PIL import Image

    from node.bench.forward.plot import write_plot

    fanout = [
        _window(system, k, base + per * k, 200 * k)
        for system, base, per in (("sfumesh", 0.03, 0.005), ("janus", 0.02, 0.003))
        for k in (1, 4, 8)
    ]
    ingest = [_ingest("sfumesh", p, 0.02 + 0.01 * p, 200 * p) for p in (1, 2, 4)]
    one, two = tmp_path / "fanout.png", tmp_path / "both.png"
    assert write_plot(one, [*fanout, _window("sfumesh", 16, 0.2, 3200, kept_up=False)])
    assert write_plot(two, [*fanout, *ingest])
    with Image.open(one) as single, Image.open(two) as double:
        assert single.format == double.format == "PNG"
        # the ingest windows get a panel of their own, beside the fan-out one
        assert double.width > 1.6 * single.width and double.height == single.height
    assert not write_plot(tmp_path / "missing" / "dir" / "x.png", fanout)


def test_the_packet_fit_keeps_to_one_kind_of_window() -> None:
    from node.bench.forward.run import packet_fit

    # Janus-1 forwards in fan-out windows (15 us per packet) and takes in in ingest windows
    # (40 us per packet): the simulcast reference is the first line, not a blend of both
    fanout = [_window("janus-event-loops-1", k, 0.02 + 15e-6 * 200 * k, 200 * k) for k in (1, 8)]
    ingest = [_ingest("janus-event-loops-1", p, 0.02 + 40e-6 * 200 * p, 200 * p) for p in (2, 4)]
    forwarding = packet_fit([*fanout, *ingest], "janus-event-loops-1")
    taking_in = packet_fit([*fanout, *ingest], "janus-event-loops-1", "ingest")
    assert forwarding is not None and taking_in is not None
    assert forwarding.slope == pytest.approx(15)
    assert taking_in.slope == pytest.approx(40)

"""Media metrics at /metrics (E1): two aiortc clients stream through one in-process node.

Per track (with session ids) only when `metrics.per_session` is on; by default summed per
direction and kind, naming no session (issue 21 item 13).
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Api
from tests.node.media.test_room_media import (
    AUDIO_FRAMES,
    VIDEO_FRAMES,
    MediaClient,
    join_clients,
    until,
)

Labels = tuple[str, str, str, str]


async def scrape(api: Api) -> dict[str, dict[Any, float]]:
    """metric sample name -> {labels (session, direction, kind, track) or (): value}."""
    response = await api.client.get("/metrics")
    assert response.status_code == 200
    text = await response.get_data(as_text=True)
    samples: dict[str, dict[Any, float]] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("sfumesh_media"):
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            labels = sample.labels
            key: Any = (
                (labels["session"], labels["direction"], labels["kind"], labels["track"])
                if "session" in labels
                else ()
            )
            samples.setdefault(sample.name, {})[key] = sample.value
    return samples


def series(samples: dict[str, dict[Any, float]], name: str) -> dict[Labels, float]:
    return {key: value for key, value in samples.get(name, {}).items() if key}


@pytest.mark.slow
async def test_media_metrics_per_track_and_gone_after_leave(make_app: Any) -> None:
    test_app = await make_app(media__host_addresses=["127.0.0.1"], metrics__per_session=True)
    api = Api(test_app.test_client())
    tokens = {name: await api.user_token(name) for name in ("alice", "bob")}
    await api.create_room(tokens["alice"], "studio")
    clients: list[MediaClient] = []
    started = time.monotonic()
    async with AsyncExitStack() as stack:
        try:
            await join_clients(stack, api, tokens, ["alice", "bob"], "studio", clients)
            alice, bob = clients
            await alice.start_publishing()
            await bob.start_publishing()
            for client in clients:
                for kind, wanted in (("video", VIDEO_FRAMES), ("audio", AUDIO_FRAMES)):
                    await until(
                        lambda c=client, k=kind, n=wanted: any(t.frames >= n for t in c.tracks(k)),
                        what=f"{client.name} decodes {kind}",
                    )

            sids = {c.name: c.peer.session_id for c in clients}
            samples = await scrape(api)
            packets = series(samples, "sfumesh_media_packets_total")
            bitrate = series(samples, "sfumesh_media_bitrate_bps")
            octets = series(samples, "sfumesh_media_bytes_total")
            # 2 sessions x (2 in + 2 out)
            assert len(packets) == 8, packets
            for name, sid in sids.items():
                other = sids["bob" if name == "alice" else "alice"]
                for kind in ("video", "audio"):
                    mine = [k for k in packets if k[:3] == (sid, "in", kind)]
                    assert len(mine) == 1 and mine[0][3].startswith(f"{sid}:"), mine
                    theirs = [k for k in packets if k[:3] == (sid, "out", kind)]
                    assert len(theirs) == 1 and theirs[0][3].startswith(f"{other}:"), theirs
                    for key in mine + theirs:
                        assert packets[key] > 0, key
                        assert octets[key] > 0, key
                        assert bitrate[key] > 0, key
            for key in packets:
                if key[1] == "in":
                    assert key in series(samples, "sfumesh_media_jitter_seconds")
                    assert key in series(samples, "sfumesh_media_packets_lost")
                else:
                    assert series(samples, "sfumesh_media_nacks_total")[key] >= 0
                    assert series(samples, "sfumesh_media_retransmissions_total")[key] >= 0
            assert samples["sfumesh_media_sessions"][()] == 2
            assert samples["sfumesh_media_published_tracks"][()] == 4
            assert samples["sfumesh_media_forwarded_tracks"][()] == 4
            assert samples["sfumesh_media_forwarded_packets_total"][()] > 0

            # RTT to each subscriber comes from its RTCP receiver reports.
            async def rtt_known() -> bool:
                rtt = series(await scrape(api), "sfumesh_media_rtt_seconds")
                return len(rtt) == 4 and all(0 <= v < 1 for v in rtt.values())

            deadline = time.monotonic() + 15
            while not await rtt_known():
                assert time.monotonic() < deadline, "no RTT for every outbound track"
                await asyncio.sleep(0.5)

            # Bob leaves: his series (and his tracks' series at alice) disappear.
            await bob.send("leave")
            gone = sids["bob"]

            async def bob_gone() -> bool:
                keys = series(await scrape(api), "sfumesh_media_packets_total")
                return not any(k[0] == gone or k[3].startswith(f"{gone}:") for k in keys)

            deadline = time.monotonic() + 15
            while not await bob_gone():
                assert time.monotonic() < deadline, "bob's series are still exported"
                await asyncio.sleep(0.2)
            samples = await scrape(api)
            left = series(samples, "sfumesh_media_packets_total")
            assert sorted(k[1:3] for k in left) == [("in", "audio"), ("in", "video")]
            assert all(k[0] == sids["alice"] for k in left)
            for name in samples:
                assert all(not k or k[0] != gone for k in samples[name]), name
            assert samples["sfumesh_media_sessions"][()] == 1
            assert samples["sfumesh_media_published_tracks"][()] == 2
            assert samples["sfumesh_media_forwarded_tracks"][()] == 0
        finally:
            for client in clients:
                await client.close()
    print(f"media metrics scenario took {time.monotonic() - started:.2f} s")


@pytest.mark.slow
async def test_media_metrics_by_default_are_summed_and_name_no_session(make_app: Any) -> None:
    test_app = await make_app(media__host_addresses=["127.0.0.1"])
    api = Api(test_app.test_client())
    tokens = {name: await api.user_token(name) for name in ("alice", "bob")}
    await api.create_room(tokens["alice"], "studio")
    clients: list[MediaClient] = []
    async with AsyncExitStack() as stack:
        try:
            await join_clients(stack, api, tokens, ["alice", "bob"], "studio", clients)
            for client in clients:
                await client.start_publishing()
            for client in clients:
                for kind, wanted in (("video", VIDEO_FRAMES), ("audio", AUDIO_FRAMES)):
                    await until(
                        lambda c=client, k=kind, n=wanted: any(t.frames >= n for t in c.tracks(k)),
                        what=f"{client.name} decodes {kind}",
                    )
            text = await (await api.client.get("/metrics")).get_data(as_text=True)
            for client in clients:
                assert client.peer.session_id not in text
            sums: dict[str, dict[tuple[str, str], float]] = {}
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if not sample.name.startswith("sfumesh_media_"):
                        continue
                    assert "session" not in sample.labels and "track" not in sample.labels
                    if set(sample.labels) == {"direction", "kind"}:
                        key = (sample.labels["direction"], sample.labels["kind"])
                        sums.setdefault(sample.name, {})[key] = sample.value
            every = {(d, k) for d in ("in", "out") for k in ("audio", "video")}
            # 2 published tracks of each kind in, each forwarded once out: one series each.
            for name in ("sfumesh_media_packets_total", "sfumesh_media_bytes_total"):
                assert set(sums[name]) == every and all(v > 0 for v in sums[name].values())
            assert set(sums["sfumesh_media_nacks_total"]) == {("out", "audio"), ("out", "video")}
            packets_in = sums["sfumesh_media_packets_total"][("in", "video")]

            # A publisher leaves: the summed counters do not go down (no false reset).
            await clients[1].send("leave")
            samples: dict[tuple[str, str], float] = {}

            async def tracks_gone() -> bool:
                text = await (await api.client.get("/metrics")).get_data(as_text=True)
                samples.clear()
                for family in text_string_to_metric_families(text):
                    for sample in family.samples:
                        if sample.name == "sfumesh_media_packets_total":
                            samples[(sample.labels["direction"], sample.labels["kind"])] = (
                                sample.value
                            )
                return "sfumesh_media_published_tracks 2.0" in text

            deadline = time.monotonic() + 15
            while not await tracks_gone():
                assert time.monotonic() < deadline, "bob's tracks are still counted"
                await asyncio.sleep(0.2)
            assert samples[("in", "video")] >= packets_in
        finally:
            for client in clients:
                await client.close()

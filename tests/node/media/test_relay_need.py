"""What one subscriber of a relayed simulcast track asks of the relay (`relay_need`): its
tile, or, when its own bandwidth holds it lower, the layer it takes (so that a weak far
subscriber keeps a low layer carried beside a strong one's high layer), and the layers the
relay carries for the far node's tiles (`MediaHub.relay_wants`)."""

from __future__ import annotations

import time
from typing import Any, cast

from node.config import MediaSettings
from node.media.choice import LayerChoice, View
from node.media.session import (
    RELAY_NEED_ANY,
    RELAY_NEED_LOWEST,
    MediaHub,
    Published,
    relay_need,
)
from node.state.hub import Connection
from tests.node.media.test_allocation import RATES, Sink, Tap

HEIGHTS: list[int | None] = [180, None, 720]  # (the half layer not carried here)


def test_a_tile_asks_for_its_height() -> None:
    assert relay_need(View(640, 360), LayerChoice(2, "view"), HEIGHTS, 16384) == 360
    assert relay_need(View(640, 360), None, HEIGHTS, 16384) == 360
    assert relay_need(View(99999, 99999), LayerChoice(2, "top"), HEIGHTS, 16384) == 16384


def test_an_unknown_tile_asks_for_any_layer_and_a_hidden_one_for_none() -> None:
    assert relay_need(None, None, HEIGHTS, 16384) == RELAY_NEED_ANY
    assert relay_need(None, LayerChoice(2, "top"), HEIGHTS, 16384) == RELAY_NEED_ANY
    assert relay_need(View(640, 360, visible=False), None, HEIGHTS, 16384) is None
    assert relay_need(View(0, 0), LayerChoice(None, "hidden"), HEIGHTS, 16384) is None


def test_a_subscriber_held_down_by_its_bandwidth_asks_for_the_layer_it_takes() -> None:
    large = View(1280, 720)
    assert relay_need(large, LayerChoice(0, "bandwidth"), HEIGHTS, 16384) == 180
    assert relay_need(large, LayerChoice(0, "allocation"), HEIGHTS, 16384) == 180
    # paused: nothing carried fits it, so it asks for the lowest layer
    assert relay_need(large, LayerChoice(None, "bandwidth"), HEIGHTS, 16384) == RELAY_NEED_LOWEST
    # a layer whose height is not known yet: the lowest too
    assert relay_need(large, LayerChoice(1, "bandwidth"), HEIGHTS, 16384) == RELAY_NEED_LOWEST
    # not held down: the tile
    assert relay_need(large, LayerChoice(2, "top"), HEIGHTS, 16384) == 720


async def test_the_relay_carries_each_far_tiles_layer_with_hysteresis() -> None:
    """A local simulcast track relayed to node-2, whose subscribers show it in a small and a
    large tile: the relay carries the quarter and the full layer (the half one paused); when
    the link's estimate (the far node's, over the layer streams) falls, the large tile's layer steps
    down, and it does not probe back up before `PROBE_HOLD_S` (the estimate, which changes
    as layer streams start and stop, swung it every round before)."""
    hub = MediaHub(MediaSettings(simulcast_layer_off_s=0.0))
    now = time.monotonic()
    try:
        owner = hub.session(Connection("s-p", "u-p", "p", 1, room="room"))
        published = Published(owner, "1", "video", tap=cast(Any, Tap()))
        published.rids = ("q", "h", "f")
        published.mime_type = "video/VP8"
        published.forwarder = published.new_forwarder()
        later = now + 3600
        published.layer_seen = {0: later, 1: later, 2: later}
        published._layer_marks = {layer: (later, 0) for layer in range(3)}
        published.layer_rates = dict(enumerate(RATES))
        published.layer_sizes = {0: (320, 180), 1: (640, 360), 2: (1280, 720)}
        owner.published["1"] = published
        sinks = [Sink(2000 + layer, 2_000_000) for layer in range(3)]
        for layer, sink in enumerate(sinks):
            assert published.attach(cast(Any, sink), layer)
        published.relay_layers["node-2"] = {i: cast(Any, s) for i, s in enumerate(sinks)}
        published.relay_needs["node-2"] = (180, 720)

        def targets() -> list[int | None]:
            forwarder = published.forwarder
            assert forwarder is not None
            rewriters = [forwarder.layer_rewriter(cast(Any, sink)) for sink in sinks]
            return [None if r is None else r.target for r in rewriters]

        hub.select_layers()
        assert targets() == [0, None, 2]
        # the link's estimate falls to 800 kbit/s: the large tile gets the half layer
        sinks[0].remb_bitrate, sinks[2].remb_bitrate = 800_000, 800_000
        hub.select_layers()
        assert targets() == [0, 1, None]
        # an estimate that covers the half layer but not the full one: no probing up yet
        sinks[0].remb_bitrate, sinks[1].remb_bitrate = 1_000_000, 1_000_000
        for _ in range(3):
            hub.select_layers()
            assert targets() == [0, 1, None]
        # once the hold is over, the large tile probes the full layer
        for pick in published.relay_picks["node-2"].values():
            pick.probe_after = 0.0
        hub.select_layers()
        assert targets() == [0, None, 2]
        # nobody there shows it: nothing is carried
        published.relay_needs["node-2"] = (0,)
        hub.select_layers()
        assert targets() == [None, None, None]
    finally:
        await hub.close()

"""What one subscriber of a relayed simulcast track asks of the relay (`relay_need`): its
tile, or, when its own bandwidth holds it lower, the layer it takes (so that a weak far
subscriber keeps a low layer carried beside a strong one's high layer)."""

from __future__ import annotations

from node.media.forward import LayerChoice, View
from node.media.session import RELAY_NEED_ANY, RELAY_NEED_LOWEST, relay_need

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

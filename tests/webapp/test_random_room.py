"""Random room names cannot be guessed (issue 21, item 2): the web client draws them from
`crypto.getRandomValues`, at least 128 bits each, never from `Math.random`, and they keep to
the slug rules (2-48 characters of letters, digits, `-`, `_`)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import pytest

from node.local.launch import LocalNode
from tests.browser import chromium, page

pytestmark = [pytest.mark.slow, pytest.mark.browser]

# Counts the secure bytes each name takes; Math.random is made to fail loudly.
DRAW = """
async () => {
  const home = await import("/static/views/home.js");
  const real = crypto.getRandomValues.bind(crypto);
  let bytes = 0;
  crypto.getRandomValues = (array) => { bytes += array.byteLength; return real(array); };
  Math.random = () => { throw new Error("Math.random used for a room name"); };
  const names = [];
  const perName = [];
  for (let i = 0; i < 200; i++) {
    bytes = 0;
    names.push(home.randomSlug());
    perName.push(bytes);
  }
  return { names, perName };
}
"""


async def test_random_room_names_take_128_secure_bits(
    node_processes: Callable[..., LocalNode],
) -> None:
    node = await asyncio.to_thread(node_processes)
    async with chromium() as browser, page(browser, f"{node.url}/") as tab:
        drawn = await tab.evaluate(DRAW)
    names: list[str] = drawn["names"]
    assert len(set(names)) == len(names)
    for name in names:
        # Two words, then 26 base32 characters: 130 bits.
        assert re.fullmatch(r"[a-z]+-[a-z]+-[a-z2-7]{26}", name), name
        assert 2 <= len(name) <= 48
    # 26 bytes of the secure generator, 5 bits kept of each (plus two for the words).
    assert min(drawn["perName"]) * 5 >= 128

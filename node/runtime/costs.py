"""Split the bill (R9), live: a change to a room's books is told to every open page of the
room on every node (a `costs` room event through the room's event stream, as chat is), so
each reloads the balances. Kept apart from chat: the books are not messages, and a page
that is not showing them needs only to know that they changed, never the amounts.
"""

from __future__ import annotations

from node.runtime.live import Live
from node.store.expenses import event_of


async def announce(
    live: Live, room: str, kind: str, by: str, item_id: str, version: int | None = None
) -> None:
    """Tell the room's open pages that `by` did `kind` (`expense-added`, `expense-edited`,
    `expense-deleted`, `payment-recorded`, `payment-deleted`) to `item_id`."""
    await live.events.publish(room, "costs", event_of(kind, by, item_id, version))

"""R9 storage: an edit is one conditional update, so racing edits of one version (on any
node, past every earlier check) leave exactly one winner and one new version."""

from __future__ import annotations

import asyncio

from node.errors import Conflict
from node.store.expenses import Expense, NewExpense, _replace, add_expense
from node.store.rooms import get_room
from tests.conftest import Api


async def test_racing_conditional_updates_have_one_winner(api: Api) -> None:
    user = await api.signup("alice")
    await api.create_room(await api.login("alice"), "race")
    room = await get_room("race")
    me = user["id"]
    body = NewExpense.model_validate(
        {
            "description": "x",
            "amount": 100,
            "currency": "EUR",
            "payer_id": me,
            "split": {"mode": "equal", "people": [me]},
        }
    )
    for _ in range(3):
        expense = await add_expense(room, me, body)
        # Every racer read version 1 before anyone wrote: only the store can tell them apart.
        copies = [await Expense.get(expense.id) for _ in range(20)]

        async def edit(index: int, copy: Expense | None) -> bool:
            assert copy is not None
            state = copy.state.model_copy(update={"version": 2, "amount": 100 + index})
            try:
                await _replace(copy, 1, state)
            except Conflict as error:
                assert error.code == "stale_version"
                return False
            return True

        wins = await asyncio.gather(*(edit(i, c) for i, c in enumerate(copies)))
        assert sum(wins) == 1
        stored = await Expense.get(expense.id)
        assert stored is not None and stored.version == 2
        assert [v.version for v in stored.history] == [1, 2]
        assert stored.state.amount == 100 + wins.index(True)

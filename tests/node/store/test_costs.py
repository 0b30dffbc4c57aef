"""R9, the ledger's arithmetic: exact parts, zero-sum books, fewest transfers (property tests)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.store.costs import (
    CURRENCY_EXPONENTS,
    EXACT_SETTLE_MAX,
    Entry,
    LedgerError,
    Payment,
    Split,
    allocate,
    balances,
    check_amount,
    check_currency,
    settle_all,
    settle_up,
)

PEOPLE = [f"{i:032x}" for i in range(1, 9)]
CURRENCIES = ["EUR", "VND", "KWD"]

people = st.sampled_from(PEOPLE)
amounts = st.integers(min_value=1, max_value=10**9)


@st.composite
def splits(draw: st.DrawFn, amount: int) -> Split:
    chosen = draw(st.lists(people, min_size=1, max_size=len(PEOPLE), unique=True))
    mode = draw(st.sampled_from(["equal", "shares", "exact"]))
    if mode == "equal":
        return Split("equal", dict.fromkeys(chosen, 1))
    if mode == "shares":
        weights = draw(st.lists(st.integers(1, 50), min_size=len(chosen), max_size=len(chosen)))
        return Split("shares", dict(zip(chosen, weights, strict=True)))
    # exact: cut points in [0, amount] give parts that add up
    cuts = sorted(
        draw(st.lists(st.integers(0, amount), min_size=len(chosen) - 1, max_size=len(chosen) - 1))
    )
    bounds = [0, *cuts, amount]
    return Split("exact", {p: bounds[i + 1] - bounds[i] for i, p in enumerate(chosen)})


@st.composite
def entries(draw: st.DrawFn) -> Entry:
    amount = draw(amounts)
    split = draw(splits(amount))
    return Entry(draw(st.sampled_from(CURRENCIES)), draw(people), amount, allocate(amount, split))


@dataclass
class Books:
    """A room's expenses as the store keeps them: latest version per id, deletes dropped."""

    expenses: dict[int, Entry] = field(default_factory=dict)
    payments: list[Payment] = field(default_factory=list)
    next_id: int = 0

    def book(self) -> dict[str, dict[str, int]]:
        return balances(self.expenses.values(), self.payments)


operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), entries()),
        st.tuples(st.just("edit"), st.integers(0, 20), entries()),
        st.tuples(st.just("delete"), st.integers(0, 20)),
        st.tuples(st.just("pay"), st.sampled_from(CURRENCIES), people, people, amounts),
        st.tuples(st.just("settle"), st.sampled_from(CURRENCIES)),
    ),
    max_size=30,
)


def replay(ops: list[tuple[object, ...]]) -> Iterator[Books]:
    books = Books()
    for op in ops:
        kind = op[0]
        if kind == "add":
            assert isinstance(op[1], Entry)
            books.expenses[books.next_id] = op[1]
            books.next_id += 1
        elif kind == "edit" and books.expenses:
            assert isinstance(op[1], int) and isinstance(op[2], Entry)
            ids = sorted(books.expenses)
            books.expenses[ids[op[1] % len(ids)]] = op[2]
        elif kind == "delete" and books.expenses:
            assert isinstance(op[1], int)
            ids = sorted(books.expenses)
            del books.expenses[ids[op[1] % len(ids)]]
        elif kind == "pay" and op[2] != op[3]:
            currency, payer, payee, amount = op[1:]
            assert isinstance(amount, int)
            books.payments.append(Payment(str(currency), str(payer), str(payee), amount))
        elif kind == "settle":
            # the room records every suggested transfer of one currency
            currency = str(op[1])
            for transfer in settle_up(books.book().get(currency, {})):
                books.payments.append(
                    Payment(currency, transfer.payer, transfer.payee, transfer.amount)
                )
            assert currency not in books.book()
        yield books


@settings(max_examples=300, deadline=None)
@given(operations)
def test_books_sum_to_zero_and_settling_clears_them(ops: list[tuple[object, ...]]) -> None:
    for books in replay(ops):
        book = books.book()
        for currency, per_person in book.items():
            assert sum(per_person.values()) == 0, currency
            assert all(value != 0 for value in per_person.values())
        suggested = settle_all(book)
        for currency, transfers in suggested.items():
            assert len(transfers) <= max(len(book[currency]) - 1, 0)
            assert all(t.amount > 0 and t.payer != t.payee for t in transfers)
        # recording every suggestion brings every balance to zero
        settled = balances(
            books.expenses.values(),
            books.payments
            + [
                Payment(currency, t.payer, t.payee, t.amount)
                for currency, transfers in suggested.items()
                for t in transfers
            ],
        )
        assert settled == {}


@settings(max_examples=300, deadline=None)
@given(amounts, st.data())
def test_parts_add_up_exactly(amount: int, data: st.DataObject) -> None:
    split = data.draw(splits(amount))
    parts = allocate(amount, split)
    assert sum(parts.values()) == amount
    assert set(parts) == set(split.weights)
    if split.mode == "equal":
        assert max(parts.values()) - min(parts.values()) <= 1


def test_rounding_rule_gives_leftover_units_by_user_id() -> None:
    # 100 among 3: 33 each, the one unit left to the first by user id
    parts = allocate(100, Split("equal", {"c" * 32: 1, "a" * 32: 1, "b" * 32: 1}))
    assert parts == {"a" * 32: 34, "b" * 32: 33, "c" * 32: 33}
    # 10 VND by shares 1:1:1 -> 3,3,3 and one left: first by id gets it
    assert allocate(10, Split("shares", {"b": 1, "a": 1, "c": 1})) == {"a": 4, "b": 3, "c": 3}
    # shares 2:1 of 100 -> 66.67 / 33.33 -> 66 + 33 and the unit to "a"
    assert allocate(100, Split("shares", {"a": 2, "b": 1})) == {"a": 67, "b": 33}


def _fewest(book: dict[str, int]) -> int:
    """n - (the most zero-sum groups), by trying every set partition (small n only)."""
    people = sorted(p for p, v in book.items() if v)

    def partitions(items: list[str]) -> Iterator[list[list[str]]]:
        if not items:
            yield []
            return
        first, rest = items[0], items[1:]
        for smaller in partitions(rest):
            for i in range(len(smaller)):
                yield [*smaller[:i], [first, *smaller[i]], *smaller[i + 1 :]]
            yield [[first], *smaller]

    most = max(
        (
            len(p)
            for p in partitions(people)
            if all(sum(book[x] for x in group) == 0 for group in p)
        ),
        default=0,
    )
    return len(people) - most


@st.composite
def small_books(draw: st.DrawFn) -> dict[str, int]:
    count = draw(st.integers(2, 7))
    values = draw(st.lists(st.integers(-30, 30), min_size=count - 1, max_size=count - 1))
    values.append(-sum(values))
    return {PEOPLE[i]: value for i, value in enumerate(values)}


@settings(max_examples=200, deadline=None)
@given(small_books())
def test_settle_up_is_fewest_for_small_rooms(book: dict[str, int]) -> None:
    transfers = settle_up(book)
    assert len(transfers) == _fewest(book)
    after = dict(book)
    for t in transfers:
        after[t.payer] += t.amount
        after[t.payee] -= t.amount
    assert not any(after.values())


def test_settle_up_pairs_equal_debts_directly() -> None:
    # greedy would pay 5->a and chain; the fewest is two direct pairs
    book = {"a": 7, "b": 5, "c": -5, "d": -7}
    transfers = settle_up(book)
    assert {(t.payer, t.payee, t.amount) for t in transfers} == {("d", "a", 7), ("c", "b", 5)}


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(-1000, 1000), min_size=EXACT_SETTLE_MAX + 1, max_size=30))
def test_large_rooms_still_at_most_n_minus_1(values: list[int]) -> None:
    values.append(-sum(values))
    book = {f"p{i:03}": v for i, v in enumerate(values)}
    transfers = settle_up(book)
    assert len(transfers) <= max(sum(1 for v in values if v) - 1, 0)


def test_currencies_and_amounts() -> None:
    assert (CURRENCY_EXPONENTS["VND"], CURRENCY_EXPONENTS["JPY"]) == (0, 0)
    assert (CURRENCY_EXPONENTS["EUR"], CURRENCY_EXPONENTS["USD"]) == (2, 2)
    assert CURRENCY_EXPONENTS["KWD"] == 3
    for bad in ("XYZ", "eur", "", "EURO"):
        with pytest.raises(LedgerError) as caught:
            check_currency(bad)
        assert caught.value.code == "unknown_currency"
    for amount in (0, -1, 10**13, True, 1.5):
        with pytest.raises(LedgerError):
            check_amount(amount)  # type: ignore[arg-type]
    with pytest.raises(LedgerError) as caught:
        allocate(100, Split("exact", {"a": 50, "b": 49}))
    assert caught.value.code == "split_mismatch"


def test_currencies_are_kept_apart() -> None:
    book = balances(
        [Entry("EUR", "a", 100, {"b": 100}), Entry("VND", "b", 50000, {"a": 50000})], []
    )
    assert book == {"EUR": {"a": 100, "b": -100}, "VND": {"a": -50000, "b": 50000}}
    assert list(itertools.chain(*settle_all(book).values())) == [
        *settle_up(book["EUR"]),
        *settle_up(book["VND"]),
    ]

"""Split the bill (R9): the ledger's arithmetic, pure (no I/O, no clock, no randomness).

Why a module of its own: every rule that decides who owes what lives here, in integers, so a
property test can replay any sequence of expenses, edits, deletes and payments against it
without a store, and the store layer (node/store/expenses.py) only keeps and fetches.

Money is an integer count of a currency's minor units (cents, or whole dong and yen): never a
float, so sums are exact. A currency's exponent comes from `CURRENCY_EXPONENTS` (ISO 4217;
Python's standard library has none). Currencies are never mixed: every balance and every
suggested transfer is per currency, and no exchange rate is ever assumed.

Rounding rule (documented for the people who split): an amount split equally or by shares
gives each person the floor of their exact part; the minor units left over (fewer than the
number of people) go one each to the people sorted by user id, the first ones in that order
getting +1. So every expense's parts add up to its amount exactly, and every currency's
balances sum to exactly zero.

Settling up: a balance is what a person is owed (positive) or owes (negative).
`settle_up` suggests transfers that bring every balance to zero. With at most
`EXACT_SETTLE_MAX` people owed or owing in a currency the number of transfers is the fewest
possible (an exhaustive search over subsets for the most groups that settle among
themselves: k people in g such groups need exactly k - g transfers); with more it is the
greedy largest-debtor-pays-largest-creditor. Either way, never more than n - 1 transfers for
n people with a balance, since each transfer zeroes at least one of them and the last zeroes
two.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

#: ISO 4217 minor-unit exponents of the currencies a room may book in.
CURRENCY_EXPONENTS: dict[str, int] = {
    # no minor unit in use
    **dict.fromkeys(
        "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF".split(), 0
    ),
    # thousandths
    **dict.fromkeys("BHD IQD JOD KWD LYD OMR TND".split(), 3),
    # hundredths
    **dict.fromkeys(
        """AED ARS AUD BDT BGN BRL CAD CHF CNY COP CZK DKK EGP EUR GBP GEL GHS HKD HUF IDR ILS
        INR KES KHR KZT LAK LKR MAD MMK MNT MXN MYR NGN NOK NPR NZD PEN PHP PKR PLN QAR RON RSD
        RUB SAR SEK SGD THB TRY TWD UAH USD UZS ZAR""".split(),
        2,
    ),
}
#: Largest amount of one expense or payment, in minor units: far above any bill, and far
#: below 2**53, so sums of many stay exact in a browser's numbers too.
MAX_AMOUNT = 10**12
#: Up to this many people with a balance in one currency, `settle_up` finds the fewest
#: transfers exactly (2**10 subsets); beyond, it is greedy (still at most n - 1).
EXACT_SETTLE_MAX = 10

SplitMode = Literal["equal", "shares", "exact"]


class LedgerError(ValueError):
    """Input the ledger cannot book; `code` is the contract's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def check_currency(code: str) -> int:
    """The exponent of an ISO 4217 code this ledger knows, or LedgerError."""
    exponent = CURRENCY_EXPONENTS.get(code)
    if exponent is None:
        raise LedgerError(
            "unknown_currency", f"currency: {code[:8]!r} is not a known ISO 4217 code"
        )
    return exponent


def check_amount(amount: int, what: str = "amount") -> None:
    # bool is an int in Python; a JSON true is no amount
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise LedgerError("invalid_amount", f"{what}: must be an integer of minor units")
    if not 0 < amount <= MAX_AMOUNT:
        raise LedgerError("invalid_amount", f"{what}: must be between 1 and {MAX_AMOUNT}")


@dataclass(frozen=True)
class Split:
    """How an amount is shared: `weights` per person (1 each for "equal"; the exact parts,
    in minor units, for "exact")."""

    mode: SplitMode
    weights: Mapping[str, int]


def allocate(amount: int, split: Split) -> dict[str, int]:
    """Each person's part of `amount` (minor units), adding up to `amount` exactly."""
    check_amount(amount)
    if not split.weights:
        raise LedgerError("invalid_split", "split: at least one person must share the cost")
    if any(isinstance(w, bool) or not isinstance(w, int) or w < 0 for w in split.weights.values()):
        raise LedgerError("invalid_split", "split: parts must be integers of at least 0")
    people = sorted(split.weights)
    if split.mode == "exact":
        total = sum(split.weights.values())
        if total != amount:
            raise LedgerError(
                "split_mismatch",
                f"split: exact parts add up to {total}, not to the amount {amount}",
            )
        return {person: split.weights[person] for person in people}
    weights = {p: 1 for p in people} if split.mode == "equal" else dict(split.weights)
    total_weight = sum(weights.values())
    if total_weight <= 0:
        raise LedgerError("invalid_split", "split: shares must not all be 0")
    parts = {p: amount * weights[p] // total_weight for p in people}
    left = amount - sum(parts.values())
    # The rounding rule: leftover units one each, by user id, to those with a share.
    for person in [p for p in people if weights[p] > 0][:left]:
        parts[person] += 1
    return parts


@dataclass(frozen=True)
class Entry:
    """One booked expense: `payer` paid `amount`, `parts` say who owes how much of it."""

    currency: str
    payer: str
    amount: int
    parts: Mapping[str, int]


@dataclass(frozen=True)
class Payment:
    """`payer` gave `payee` `amount` to settle up."""

    currency: str
    payer: str
    payee: str
    amount: int


Balances = dict[str, dict[str, int]]


def balances(entries: Iterable[Entry], payments: Iterable[Payment]) -> Balances:
    """Per currency, what each person is owed (+) or owes (-); people at 0 are left out."""
    books: defaultdict[str, defaultdict[str, int]] = defaultdict(lambda: defaultdict(int))
    for entry in entries:
        book = books[entry.currency]
        book[entry.payer] += entry.amount
        for person, part in entry.parts.items():
            book[person] -= part
    for payment in payments:
        book = books[payment.currency]
        book[payment.payer] += payment.amount
        book[payment.payee] -= payment.amount
    return {
        currency: {person: value for person, value in sorted(book.items()) if value != 0}
        for currency, book in sorted(books.items())
        if any(book.values())
    }


@dataclass(frozen=True)
class Transfer:
    payer: str
    payee: str
    amount: int


def _greedy(book: Mapping[str, int]) -> list[Transfer]:
    """Largest debtor pays largest creditor, ties by user id, until all are at 0."""
    owed = {p: v for p, v in book.items() if v > 0}
    owing = {p: -v for p, v in book.items() if v < 0}
    transfers = []
    while owed and owing:
        creditor = min(owed, key=lambda p: (-owed[p], p))
        debtor = min(owing, key=lambda p: (-owing[p], p))
        amount = min(owed[creditor], owing[debtor])
        transfers.append(Transfer(debtor, creditor, amount))
        for side, person in ((owed, creditor), (owing, debtor)):
            side[person] -= amount
            if side[person] == 0:
                del side[person]
    return transfers


def _zero_sum_groups(people: Sequence[str], book: Mapping[str, int]) -> list[list[str]]:
    """`people` split into the most groups whose balances each sum to 0 (exhaustive).

    best[mask] is the most zero-sum groups the people in `mask` can be split into, taking
    people off one at a time: each time what remains sums to 0 a group is closed."""
    count = len(people)
    values = [book[p] for p in people]
    full = (1 << count) - 1
    sums = [0] * (full + 1)
    for mask in range(1, full + 1):
        low = mask & -mask
        sums[mask] = sums[mask ^ low] + values[low.bit_length() - 1]
    best = [0] * (full + 1)
    came_from = [0] * (full + 1)
    for mask in range(1, full + 1):
        choice, value = -1, -1
        rest = mask
        while rest:
            low = rest & -rest
            rest ^= low
            if best[mask ^ low] > value:
                choice, value = low, best[mask ^ low]
        best[mask] = value + (1 if sums[mask] == 0 else 0)
        came_from[mask] = choice
    groups: list[list[str]] = []
    current: list[str] = []
    mask = full
    while mask:
        if sums[mask] == 0 and current:
            groups.append(current)
            current = []
        low = came_from[mask]
        current.append(people[low.bit_length() - 1])
        mask ^= low
    groups.append(current)
    return groups


def settle_up(book: Mapping[str, int]) -> list[Transfer]:
    """Transfers (payer, payee, amount) that bring every balance in `book` to 0; the fewest
    possible up to `EXACT_SETTLE_MAX` people with a balance, at most n - 1 always."""
    if sum(book.values()) != 0:
        raise LedgerError("unbalanced", "balances must sum to 0 to be settled")
    people = sorted(p for p, v in book.items() if v != 0)
    if len(people) > EXACT_SETTLE_MAX:
        return _greedy(book)
    transfers: list[Transfer] = []
    for group in _zero_sum_groups(people, book):
        transfers += _greedy({p: book[p] for p in group})
    return transfers


def settle_all(books: Balances) -> dict[str, list[Transfer]]:
    return {currency: settle_up(book) for currency, book in books.items()}

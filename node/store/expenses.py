"""Split the bill (R9), kept: a room's expenses (every version of each) and payments.

The arithmetic is node/store/costs.py; this module checks who may do what, keeps the
documents and reads them back as the room's books.

Who: only the room's people (its creator, or who has joined it: `rooms.is_person`) add,
see, or settle; payer and the people an expense is split among must be room people too.
An expense is edited or deleted only by whoever added it. Any room person may record a
payment (anyone could equally book an expense "B paid, split to A", which moves the
balances the same way, so limiting payments would protect nothing); it is deleted only by
whoever recorded it.

History and races: an expense is one document holding its current state and every
version (`history`, oldest first); a deleted one stays, marked deleted. An edit or delete
names the version it replaces and is one conditional update of that document (filter on
id and version, `$set` the new state and the history with it appended): two edits of one
version cannot both win, the later one is told 409 `stale_version`.

Bad input changes nothing: everything is checked before the one write.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from beanie import Document, PydanticObjectId, SortDirection
from beanie.operators import In
from bson.errors import InvalidId
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pymongo import ASCENDING, IndexModel

from node.errors import Conflict, Forbidden, Invalid, NotFound
from node.store import costs
from node.store.models import Room, RoomPerson, User, utcnow
from node.store.text import clean_text

MAX_DESCRIPTION_CHARS = 200
#: people one expense may be split among (a room holds far fewer)
MAX_SPLIT_PEOPLE = 100
MAX_SHARE = 10_000
#: versions one expense keeps; then it is closed to edits (delete it and add it again)
MAX_VERSIONS = 100
#: expenses and payments one room keeps (deleted ones count): the books are read whole
MAX_ROOM_ENTRIES = 5000

UserId = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
HappeningId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
Amount = Annotated[int, Field(ge=1, le=costs.MAX_AMOUNT)]


def _clean_description(value: str) -> str:
    text = clean_text(value, max_chars=MAX_DESCRIPTION_CHARS)
    if not text:
        raise ValueError("must not be empty")
    return text


Description = Annotated[
    str, Field(max_length=4 * MAX_DESCRIPTION_CHARS), AfterValidator(_clean_description)
]
Currency = Annotated[str, Field(min_length=1, max_length=8)]


class EqualSplit(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    mode: Literal["equal"]
    people: Annotated[list[UserId], Field(min_length=1, max_length=MAX_SPLIT_PEOPLE)]


class SharesSplit(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    mode: Literal["shares"]
    shares: Annotated[
        dict[UserId, Annotated[int, Field(ge=1, le=MAX_SHARE)]],
        Field(min_length=1, max_length=MAX_SPLIT_PEOPLE),
    ]


class ExactSplit(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    mode: Literal["exact"]
    amounts: Annotated[
        dict[UserId, Annotated[int, Field(ge=0, le=costs.MAX_AMOUNT)]],
        Field(min_length=1, max_length=MAX_SPLIT_PEOPLE),
    ]


SplitIn = Annotated[EqualSplit | SharesSplit | ExactSplit, Field(discriminator="mode")]


class NewExpense(BaseModel):
    """An expense as a client sends it: amounts in integer minor units of `currency`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    description: Description
    amount: Amount
    currency: Currency
    payer_id: UserId
    split: SplitIn
    #: a happening of the room this expense belongs to (opaque here)
    happening_id: HappeningId | None = None


class ExpenseEdit(NewExpense):
    #: the version this edit replaces (409 `stale_version` when it is no longer current)
    version: Annotated[int, Field(ge=1)]


class VersionQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Annotated[int, Field(ge=1)]


class NewPayment(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    payer_id: UserId
    payee_id: UserId
    amount: Amount
    currency: Currency


class ExpenseState(BaseModel):
    """One version of an expense."""

    version: int
    description: str
    amount: int
    currency: str
    payer_id: str
    mode: costs.SplitMode
    #: as chosen: 1 each (equal), the shares, or the exact parts
    weights: dict[str, int]
    #: what each person owes of `amount` (adds up to it exactly)
    parts: dict[str, int]
    happening_id: str | None = None
    deleted: bool = False
    by: str
    at: datetime


class Expense(Document):
    id: PydanticObjectId = Field(default_factory=PydanticObjectId)
    room: str
    created_by: str
    created_at: datetime = Field(default_factory=utcnow)
    version: int = 1
    deleted: bool = False
    state: ExpenseState
    history: list[ExpenseState]

    class Settings:
        name = "expenses"
        indexes: ClassVar[list[IndexModel]] = [IndexModel([("room", ASCENDING)])]


class Payment(Document):
    id: PydanticObjectId = Field(default_factory=PydanticObjectId)
    room: str
    payer_id: str
    payee_id: str
    amount: int
    currency: str
    recorded_by: str
    at: datetime = Field(default_factory=utcnow)
    deleted: bool = False

    class Settings:
        name = "payments"
        indexes: ClassVar[list[IndexModel]] = [IndexModel([("room", ASCENDING)])]


COST_MODELS: list[type[Document]] = [Expense, Payment]


# -- views ----------------------------------------------------------------------------------


class SplitView(BaseModel):
    mode: costs.SplitMode
    weights: dict[str, int]


class ExpenseView(BaseModel):
    id: str
    room: str
    version: int
    description: str
    amount: int
    currency: str
    payer_id: str
    split: SplitView
    parts: dict[str, int]
    happening_id: str | None
    deleted: bool
    created_by: str
    created_at: datetime
    updated_by: str
    updated_at: datetime


class ExpenseHistory(BaseModel):
    expense: ExpenseView
    versions: list[ExpenseState]


class PaymentView(BaseModel):
    id: str
    room: str
    payer_id: str
    payee_id: str
    amount: int
    currency: str
    recorded_by: str
    at: datetime


class PersonView(BaseModel):
    id: str
    display_name: str


class TransferView(BaseModel):
    payer_id: str
    payee_id: str
    amount: int


class CostsView(BaseModel):
    """A room's books: live expenses (newest first), payments, and per currency the
    balance of each person (+ owed, - owing; 0 left out) and the suggested transfers."""

    room: str
    people: list[PersonView]
    expenses: list[ExpenseView]
    payments: list[PaymentView]
    balances: dict[str, dict[str, int]]
    settle_up: dict[str, list[TransferView]]
    #: the minor-unit exponent of every currency a room may book in
    currencies: dict[str, int]


def expense_view(expense: Expense) -> ExpenseView:
    state = expense.state
    return ExpenseView(
        id=str(expense.id),
        room=expense.room,
        version=expense.version,
        description=state.description,
        amount=state.amount,
        currency=state.currency,
        payer_id=state.payer_id,
        split=SplitView(mode=state.mode, weights=state.weights),
        parts=state.parts,
        happening_id=state.happening_id,
        deleted=expense.deleted,
        created_by=expense.created_by,
        created_at=expense.created_at,
        updated_by=state.by,
        updated_at=state.at,
    )


def payment_view(payment: Payment) -> PaymentView:
    return PaymentView(
        id=str(payment.id),
        room=payment.room,
        payer_id=payment.payer_id,
        payee_id=payment.payee_id,
        amount=payment.amount,
        currency=payment.currency,
        recorded_by=payment.recorded_by,
        at=payment.at,
    )


# -- checks ---------------------------------------------------------------------------------


def _invalid(error: costs.LedgerError) -> Invalid:
    return Invalid(error.code, str(error))


async def _not_room_people(room: Room, user_ids: set[str]) -> set[str]:
    """Those of `user_ids` who are not among the room's people (`rooms.is_person`, for a
    set in one query)."""
    others = user_ids - {room.creator_id}
    if not others:
        return set()
    found = await RoomPerson.find(
        In(RoomPerson.id, [RoomPerson.key(room.slug, user_id) for user_id in others])
    ).to_list()
    return others - {person.user_id for person in found}


def _weights(split: EqualSplit | SharesSplit | ExactSplit) -> dict[str, int]:
    if isinstance(split, EqualSplit):
        if len(set(split.people)) != len(split.people):
            raise Invalid("invalid_split", "split.people: someone is named twice")
        return dict.fromkeys(split.people, 1)
    if isinstance(split, SharesSplit):
        return dict(split.shares)
    return dict(split.amounts)


async def _checked_state(room: Room, data: NewExpense, by: str, version: int) -> ExpenseState:
    """The version `data` describes, or the 4xx saying what is wrong (nothing written)."""
    try:
        costs.check_currency(data.currency)
        weights = _weights(data.split)
        parts = costs.allocate(data.amount, costs.Split(data.split.mode, weights))
    except costs.LedgerError as error:
        raise _invalid(error) from error
    outsiders = await _not_room_people(room, {data.payer_id, *weights})
    if data.payer_id in outsiders:
        raise Invalid("not_a_room_person", "payer_id: not one of the room's people")
    if outsiders:
        raise Invalid("not_a_room_person", "split: names someone not among the room's people")
    return ExpenseState(
        version=version,
        description=data.description,
        amount=data.amount,
        currency=data.currency,
        payer_id=data.payer_id,
        mode=data.split.mode,
        weights=weights,
        parts=parts,
        happening_id=data.happening_id,
        by=by,
        at=utcnow(),
    )


async def _check_room_space(room: Room) -> None:
    entries = await Expense.find(Expense.room == room.slug).count()
    entries += await Payment.find(Payment.room == room.slug).count()
    if entries >= MAX_ROOM_ENTRIES:
        raise Conflict(
            "too_many_entries", f"a room keeps at most {MAX_ROOM_ENTRIES} expenses and payments"
        )


def _object_id(raw: str, what: str) -> PydanticObjectId:
    try:
        return PydanticObjectId(raw)
    except (InvalidId, TypeError) as error:
        raise NotFound(f"{what}_not_found", f"no such {what}") from error


async def get_expense(room: Room, expense_id: str) -> Expense:
    expense = await Expense.find_one(
        Expense.id == _object_id(expense_id, "expense"), Expense.room == room.slug
    )
    if expense is None:
        raise NotFound("expense_not_found", "no such expense")
    return expense


# -- writes ---------------------------------------------------------------------------------


async def add_expense(room: Room, by: str, data: NewExpense) -> Expense:
    state = await _checked_state(room, data, by, version=1)
    await _check_room_space(room)
    expense = Expense(room=room.slug, created_by=by, state=state, history=[state])
    await expense.insert()
    return expense


async def _replace(expense: Expense, version: int, state: ExpenseState) -> Expense:
    """Make `state` current if `version` still is: one conditional update."""
    history = [*expense.history, state]
    # The whole history is set, not `$push`ed: the version in the filter pins what it was,
    # and the embedded store (nx-27017 0.8.1) stores a pushed document as a JSON string.
    result = await Expense.get_pymongo_collection().update_one(
        {"_id": expense.id, "version": version, "deleted": False},
        {
            "$set": {
                "version": state.version,
                "deleted": state.deleted,
                "state": state.model_dump(),
                "history": [entry.model_dump() for entry in history],
            }
        },
    )
    if result.matched_count != 1:
        raise Conflict("stale_version", "the expense changed meanwhile: reload and try again")
    expense.version, expense.deleted, expense.state = state.version, state.deleted, state
    expense.history = history
    return expense


def _check_editable(expense: Expense, by: str, version: int) -> None:
    if expense.created_by != by:
        raise Forbidden("not_yours", "only whoever added an expense may change or delete it")
    if expense.deleted:
        raise Conflict("expense_deleted", "the expense was deleted")
    if expense.version != version:
        raise Conflict("stale_version", f"version {version} is not current ({expense.version} is)")
    if expense.version >= MAX_VERSIONS:
        raise Conflict("too_many_versions", f"an expense keeps at most {MAX_VERSIONS} versions")


async def edit_expense(room: Room, expense_id: str, by: str, data: ExpenseEdit) -> Expense:
    expense = await get_expense(room, expense_id)
    _check_editable(expense, by, data.version)
    state = await _checked_state(room, data, by, version=data.version + 1)
    return await _replace(expense, data.version, state)


async def delete_expense(room: Room, expense_id: str, by: str, version: int) -> Expense:
    expense = await get_expense(room, expense_id)
    _check_editable(expense, by, version)
    state = expense.state.model_copy(
        update={"version": version + 1, "deleted": True, "by": by, "at": utcnow()}
    )
    return await _replace(expense, version, state)


async def record_payment(room: Room, by: str, data: NewPayment) -> Payment:
    try:
        costs.check_currency(data.currency)
    except costs.LedgerError as error:
        raise _invalid(error) from error
    if data.payer_id == data.payee_id:
        raise Invalid("invalid_payment", "payee_id: a payment goes to someone else")
    if await _not_room_people(room, {data.payer_id, data.payee_id}):
        raise Invalid("not_a_room_person", "a payment is between the room's people")
    await _check_room_space(room)
    payment = Payment(
        room=room.slug,
        payer_id=data.payer_id,
        payee_id=data.payee_id,
        amount=data.amount,
        currency=data.currency,
        recorded_by=by,
    )
    await payment.insert()
    return payment


async def delete_payment(room: Room, payment_id: str, by: str) -> Payment:
    payment = await Payment.find_one(
        Payment.id == _object_id(payment_id, "payment"), Payment.room == room.slug
    )
    if payment is None or payment.deleted:
        raise NotFound("payment_not_found", "no such payment")
    if payment.recorded_by != by:
        raise Forbidden("not_yours", "only whoever recorded a payment may delete it")
    result = await Payment.get_pymongo_collection().update_one(
        {"_id": payment.id, "deleted": False}, {"$set": {"deleted": True}}
    )
    if result.matched_count != 1:
        raise NotFound("payment_not_found", "no such payment")
    payment.deleted = True
    return payment


# -- reads ----------------------------------------------------------------------------------


async def _people(room: Room) -> list[PersonView]:
    joined = await RoomPerson.find(RoomPerson.room == room.slug).to_list()
    ids = {room.creator_id, *(person.user_id for person in joined)}
    users = await User.find(In(User.id, sorted(ids))).to_list()
    names = {user.id: user.display_name for user in users}
    return sorted(
        (PersonView(id=user_id, display_name=names.get(user_id, "?")) for user_id in ids),
        key=lambda person: (person.display_name.casefold(), person.id),
    )


def _transfer(transfer: costs.Transfer) -> TransferView:
    return TransferView(payer_id=transfer.payer, payee_id=transfer.payee, amount=transfer.amount)


async def room_costs(room: Room) -> CostsView:
    expenses = (
        await Expense.find(Expense.room == room.slug, Expense.deleted == False)  # noqa: E712
        .sort([("created_at", SortDirection.DESCENDING)])
        .to_list()
    )
    payments = (
        await Payment.find(Payment.room == room.slug, Payment.deleted == False)  # noqa: E712
        .sort([("at", SortDirection.DESCENDING)])
        .to_list()
    )
    books = costs.balances(
        (
            costs.Entry(e.state.currency, e.state.payer_id, e.state.amount, e.state.parts)
            for e in expenses
        ),
        (costs.Payment(p.currency, p.payer_id, p.payee_id, p.amount) for p in payments),
    )
    suggestions = costs.settle_all(books)
    return CostsView(
        room=room.slug,
        people=await _people(room),
        expenses=[expense_view(e) for e in expenses],
        payments=[payment_view(p) for p in payments],
        balances=books,
        settle_up={currency: [_transfer(t) for t in ts] for currency, ts in suggestions.items()},
        currencies=costs.CURRENCY_EXPONENTS,
    )


async def expense_history(room: Room, expense_id: str) -> ExpenseHistory:
    expense = await get_expense(room, expense_id)
    return ExpenseHistory(expense=expense_view(expense), versions=expense.history)


def event_of(kind: str, by: str, item_id: str, version: int | None = None) -> dict[str, Any]:
    """What a room's open pages are told of a change to its books (they reload them)."""
    return {"kind": kind, "id": item_id, "by": by, "version": version}

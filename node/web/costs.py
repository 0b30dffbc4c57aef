"""HTTP routes of split the bill (R9): a room's expenses, payments and books.

Every route is for the room's people only and takes a session token (as the room's chat
history does); the token is checked before the body or query is read (`authenticated`).
Each change is announced to the room's open pages (node/runtime/costs.py).
"""

from __future__ import annotations

from quart import Blueprint
from quart_schema import validate_querystring, validate_request, validate_response

from node.runtime.costs import announce
from node.store.expenses import (
    CostsView,
    ExpenseEdit,
    ExpenseHistory,
    ExpenseView,
    NewExpense,
    NewPayment,
    PaymentView,
    VersionQuery,
    add_expense,
    delete_expense,
    delete_payment,
    edit_expense,
    expense_history,
    expense_view,
    payment_view,
    record_payment,
    room_costs,
)
from node.store.rooms import room_person
from node.web.auth import Auth, authenticated
from node.web.context import node_context
from node.web.tokens import Purpose

costs_blueprint = Blueprint("costs", __name__, url_prefix="/api")


@costs_blueprint.get("/rooms/<slug>/costs")
@authenticated(Purpose.SESSION)
@validate_response(CostsView)
async def room_books(slug: str, auth: Auth) -> CostsView:
    """Live expenses, payments, balances and settle-up suggestions, per currency."""
    room = await room_person(slug, str(auth.user.id))
    return await room_costs(room)


@costs_blueprint.post("/rooms/<slug>/expenses")
@authenticated(Purpose.SESSION)
@validate_request(NewExpense)
@validate_response(ExpenseView, 201)
async def new_expense(slug: str, data: NewExpense, auth: Auth) -> tuple[ExpenseView, int]:
    user_id = str(auth.user.id)
    room = await room_person(slug, user_id)
    expense = await add_expense(room, user_id, data)
    await announce(node_context().live, room.slug, "expense-added", user_id, str(expense.id), 1)
    return expense_view(expense), 201


@costs_blueprint.get("/rooms/<slug>/expenses/<expense_id>")
@authenticated(Purpose.SESSION)
@validate_response(ExpenseHistory)
async def one_expense(slug: str, expense_id: str, auth: Auth) -> ExpenseHistory:
    """The expense and every version of it, oldest first."""
    room = await room_person(slug, str(auth.user.id))
    return await expense_history(room, expense_id)


@costs_blueprint.put("/rooms/<slug>/expenses/<expense_id>")
@authenticated(Purpose.SESSION)
@validate_request(ExpenseEdit)
@validate_response(ExpenseView)
async def change_expense(slug: str, expense_id: str, data: ExpenseEdit, auth: Auth) -> ExpenseView:
    """Replace version `version` (by whoever added it); 409 `stale_version` if it is no
    longer current."""
    user_id = str(auth.user.id)
    room = await room_person(slug, user_id)
    expense = await edit_expense(room, expense_id, user_id, data)
    await announce(
        node_context().live, room.slug, "expense-edited", user_id, expense_id, expense.version
    )
    return expense_view(expense)


@costs_blueprint.delete("/rooms/<slug>/expenses/<expense_id>")
@authenticated(Purpose.SESSION)
@validate_querystring(VersionQuery)
@validate_response(ExpenseView)
async def remove_expense(
    slug: str, expense_id: str, query_args: VersionQuery, auth: Auth
) -> ExpenseView:
    """Delete version `?version=` (by whoever added it); its history stays."""
    user_id = str(auth.user.id)
    room = await room_person(slug, user_id)
    expense = await delete_expense(room, expense_id, user_id, query_args.version)
    await announce(
        node_context().live, room.slug, "expense-deleted", user_id, expense_id, expense.version
    )
    return expense_view(expense)


@costs_blueprint.post("/rooms/<slug>/payments")
@authenticated(Purpose.SESSION)
@validate_request(NewPayment)
@validate_response(PaymentView, 201)
async def new_payment(slug: str, data: NewPayment, auth: Auth) -> tuple[PaymentView, int]:
    """`payer_id` gave `payee_id` `amount` (settles that much of their balances)."""
    user_id = str(auth.user.id)
    room = await room_person(slug, user_id)
    payment = await record_payment(room, user_id, data)
    await announce(node_context().live, room.slug, "payment-recorded", user_id, str(payment.id))
    return payment_view(payment), 201


@costs_blueprint.delete("/rooms/<slug>/payments/<payment_id>")
@authenticated(Purpose.SESSION)
async def remove_payment(slug: str, payment_id: str, auth: Auth) -> tuple[str, int]:
    user_id = str(auth.user.id)
    room = await room_person(slug, user_id)
    await delete_payment(room, payment_id, user_id)
    await announce(node_context().live, room.slug, "payment-deleted", user_id, payment_id)
    return "", 204

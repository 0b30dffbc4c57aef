"""Users (U1-U4): validated sign-up, bcrypt hashes, login without enumeration."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Annotated, TypeVar

import bcrypt
from pydantic import AfterValidator, BaseModel, ConfigDict, EmailStr, Field
from pymongo.errors import DuplicateKeyError

from node.errors import Conflict, RateLimited, Unauthenticated, Unavailable
from node.state.ratelimit import LoginLimiter, SignupLimiter
from node.store.models import User, is_user_id, new_user_id
from node.store.text import clean_text

log = logging.getLogger(__name__)

USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{2,31}$")
PASSWORD_MIN_CHARS = 8
# bcrypt reads at most 72 bytes; a longer password is refused rather than silently cut.
PASSWORD_MAX_BYTES = 72
# A full hashing queue frees up within about one bcrypt time.
BUSY_RETRY_S = 1

T = TypeVar("T")


def _check_username(value: str) -> str:
    if not USERNAME_RE.match(value):
        raise ValueError(
            "3-32 characters: letters, digits, '_', '.', '-', starting with a letter or digit"
        )
    return value


def _check_password(value: str) -> str:
    if len(value) < PASSWORD_MIN_CHARS:
        raise ValueError(f"must be at least {PASSWORD_MIN_CHARS} characters")
    if len(value.encode()) > PASSWORD_MAX_BYTES:
        raise ValueError(f"must be at most {PASSWORD_MAX_BYTES} bytes in UTF-8")
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def _check_display_name(value: str) -> str:
    return clean_text(value, max_chars=64)


class NewUser(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    username: Annotated[str, Field(max_length=32), AfterValidator(_check_username)]
    email: Annotated[EmailStr, Field(max_length=254)]
    password: Annotated[str, Field(max_length=256), AfterValidator(_check_password)]
    display_name: Annotated[str, Field(max_length=256), AfterValidator(_check_display_name)]


class LoginRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    login: Annotated[str, Field(min_length=1, max_length=254)]
    password: Annotated[str, Field(min_length=1, max_length=256)]


class PasswordChange(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    old_password: Annotated[str, Field(min_length=1, max_length=256)]
    new_password: Annotated[str, Field(max_length=256), AfterValidator(_check_password)]


class PublicUser(BaseModel):
    id: str
    username: str
    display_name: str


class OwnUser(PublicUser):
    email: str
    created_at: datetime


def public_view(user: User) -> PublicUser:
    return PublicUser(id=user.id, username=user.username, display_name=user.display_name)


def own_view(user: User) -> OwnUser:
    return OwnUser(
        id=str(user.id),
        username=user.username,
        display_name=user.display_name,
        email=user.email,
        created_at=user.created_at,
    )


def username_key(username: str) -> str:
    return username.strip().lower()


def email_key(email: str) -> str:
    return email.strip().lower()


class PasswordHasher:
    """bcrypt in a small thread pool of its own, so hashing never stalls the event loop and a
    flood of sign-ups or logins queues here instead of taking the threads (the loop's default
    executor) the rest of the node needs. At most `threads + max_waiting` runs are queued;
    past that a request is refused at once with 503 `busy` rather than waiting ever longer."""

    def __init__(self, cost: int, threads: int = 2, max_waiting: int = 32) -> None:
        self.cost = cost
        self._dummy_hash: bytes | None = None
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bcrypt")
        self._capacity = threads + max_waiting
        self._lock = threading.Lock()
        self._queued = 0  # submitted and not finished: running or waiting for a thread
        # bcrypt runs begun (hashes and checks): the work an attacker can make us do.
        self.started = 0

    def _begin(self, run: Callable[[], T]) -> T:
        with self._lock:
            self.started += 1
        return run()

    def _finished(self, _: object) -> None:
        with self._lock:
            self._queued -= 1

    async def _run(self, run: Callable[[], T]) -> T:
        with self._lock:
            if self._queued >= self._capacity:
                full = True
            else:
                full = False
                self._queued += 1
        if full:
            log.warning("hashing.busy", extra={"queued": self._capacity})
            raise Unavailable(
                "busy", "the node is busy; try again in a moment", retry_after_s=BUSY_RETRY_S
            )
        try:
            future = self._pool.submit(self._begin, run)
        except RuntimeError as error:  # the pool is shut down: the node is stopping
            self._finished(None)
            raise Unavailable("unavailable", "the node is stopping", retry_after_s=1) from error
        # Counted down when the thread is done, not when the caller stops waiting: a
        # client that hangs up does not free a thread that is still hashing.
        future.add_done_callback(self._finished)
        return await asyncio.wrap_future(future)

    async def hash(self, password: str) -> str:
        salt = bcrypt.gensalt(self.cost)
        hashed = await self._run(lambda: bcrypt.hashpw(password.encode(), salt))
        return hashed.decode()

    async def verify(self, password: str, hashed: str | None) -> bool:
        """Costs one bcrypt check whether or not there is a hash (unknown users)."""
        if self._dummy_hash is None:
            self._dummy_hash = (await self.hash("not-a-real-password")).encode()
        target = hashed.encode() if hashed is not None else self._dummy_hash
        candidate = password.encode()
        valid_length = len(candidate) <= PASSWORD_MAX_BYTES
        if not valid_length:
            candidate = candidate[:PASSWORD_MAX_BYTES]
        matches = await self._run(lambda: bcrypt.checkpw(candidate, target))
        return matches and valid_length and hashed is not None

    async def warm_up(self) -> None:
        await self.verify("warm-up", None)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


async def get_user(user_id: str) -> User | None:
    """The user with this id; None for an id that is not one (never a store error)."""
    if not is_user_id(user_id):
        return None
    return await User.get(user_id)


async def create_user(
    new: NewUser, hasher: PasswordHasher, limiter: SignupLimiter, address: str
) -> PublicUser:
    """The new user's public view.

    A taken username is 409 (usernames are public: profiles are found by them). A taken
    email is *not* told: the answer is the same 201 as a real sign-up, after the same bcrypt
    hash, with a fresh id that nothing stores, and the owner's account is logged. So sign-up
    never says whether an email is registered, and nothing is written twice (U2).
    """
    await limiter.reserve(address)
    if await User.find_one(User.username_key == username_key(new.username)) is not None:
        raise Conflict("user_exists", "username is already taken")
    user = User(
        username=new.username,
        username_key=username_key(new.username),
        email=str(new.email),
        email_key=email_key(str(new.email)),
        password_hash=await hasher.hash(new.password),
        display_name=new.display_name,
    )
    try:
        await user.insert()
    except DuplicateKeyError as error:
        if await User.find_one(User.username_key == user.username_key) is not None:
            raise Conflict("user_exists", "username is already taken") from error
        owner = await User.find_one(User.email_key == user.email_key)
        log.warning(
            "user.signup_with_taken_email",
            extra={"user_id": str(owner.id) if owner else None, "address": address},
        )
        return PublicUser(id=new_user_id(), username=new.username, display_name=new.display_name)
    log.info("user.created", extra={"user_id": str(user.id)})
    return public_view(user)


def login_key(login: str) -> str:
    return email_key(login) if "@" in login else username_key(login)


async def find_user_by_login(login: str) -> User | None:
    login = login.strip()
    if "@" in login:
        return await User.find_one(User.email_key == email_key(login))
    return await User.find_one(User.username_key == username_key(login))


async def authenticate(
    request: LoginRequest, address: str, hasher: PasswordHasher, limiter: LoginLimiter
) -> User:
    # The account first, so that its username and its email share one failure counter; a
    # login no account has is counted under its own name, just like an account.
    user = await find_user_by_login(request.login)
    account = f"user:{user.id}" if user is not None else f"login:{login_key(request.login)}"
    try:
        reservation = await limiter.reserve(account, address)
    except RateLimited:
        log.warning("login.rate_limited", extra={"address": address})
        raise
    failed = False
    try:
        ok = await hasher.verify(request.password, user.password_hash if user else None)
        if not ok or user is None:
            failed = True
            log.info("login.failed", extra={"address": address})
            raise Unauthenticated("invalid_credentials", "wrong login or password")
    finally:
        # Only a checked, wrong password keeps its slot: a success, or an attempt cut off
        # before it was answered (client gone, store error, hashing busy), gives it back.
        if not failed:
            await limiter.refund(reservation)
    log.info("login.ok", extra={"user_id": str(user.id)})
    return user


async def change_password(
    user: User, change: PasswordChange, address: str, hasher: PasswordHasher, limiter: LoginLimiter
) -> User:
    """The user with the new password and the next token generation (so every token issued
    before is refused). The old password is checked under the login limits: a stolen token
    must not become an unlimited password-guessing oracle."""
    # The same account key as a login's, so guesses here and at login share one counter.
    try:
        reservation = await limiter.reserve(f"user:{user.id}", address)
    except RateLimited:
        log.warning("password_change.rate_limited", extra={"address": address})
        raise
    failed = False
    try:
        if not await hasher.verify(change.old_password, user.password_hash):
            failed = True
            log.info("password_change.failed", extra={"user_id": str(user.id)})
            raise Unauthenticated("invalid_credentials", "wrong password")
    finally:
        if not failed:
            await limiter.refund(reservation)
    new_hash = await hasher.hash(change.new_password)
    # Conditional on the generation read with the token: of two changes at once, one wins
    # and the other is told, instead of both raising the generation from the same start.
    result = await User.get_pymongo_collection().update_one(
        {
            "_id": user.id,
            # users stored before generations existed have no field: that is generation 0
            "token_generation": {"$in": [user.token_generation]}
            if user.token_generation
            else {"$in": [0, None]},
        },
        {"$set": {"password_hash": new_hash}, "$inc": {"token_generation": 1}},
    )
    if result.modified_count != 1:
        raise Conflict("password_changed", "the password was changed meanwhile; log in again")
    user.password_hash = new_hash
    user.token_generation += 1
    log.info("password_change.ok", extra={"user_id": str(user.id)})
    return user

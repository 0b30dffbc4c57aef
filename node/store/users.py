"""Users (U1-U4): validated sign-up, bcrypt hashes, login without enumeration."""

from __future__ import annotations

import asyncio
import logging
import re
from datetime import datetime
from typing import Annotated

import bcrypt
from pydantic import AfterValidator, BaseModel, ConfigDict, EmailStr, Field
from pymongo.errors import DuplicateKeyError

from node.errors import Conflict, RateLimited, Unauthenticated
from node.state.ratelimit import LoginLimiter, Reservation
from node.store.models import User
from node.store.text import clean_text

log = logging.getLogger(__name__)

USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{2,31}$")
PASSWORD_MIN_CHARS = 8
# bcrypt reads at most 72 bytes; a longer password is refused rather than silently cut.
PASSWORD_MAX_BYTES = 72


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
    return PublicUser(id=str(user.id), username=user.username, display_name=user.display_name)


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
    """bcrypt in worker threads, so hashing never stalls the event loop."""

    def __init__(self, cost: int) -> None:
        self.cost = cost
        self._dummy_hash: bytes | None = None

    async def hash(self, password: str) -> str:
        salt = bcrypt.gensalt(self.cost)
        hashed = await asyncio.to_thread(bcrypt.hashpw, password.encode(), salt)
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
        matches = await asyncio.to_thread(bcrypt.checkpw, candidate, target)
        return matches and valid_length and hashed is not None

    async def warm_up(self) -> None:
        await self.verify("warm-up", None)


async def create_user(new: NewUser, hasher: PasswordHasher) -> User:
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
        # Which index clashed is not said: that would tell strangers an email is registered.
        raise Conflict("user_exists", "username or email is already registered") from error
    log.info("user.created", extra={"user_id": str(user.id)})
    return user


async def find_user_by_login(login: str) -> User | None:
    login = login.strip()
    if "@" in login:
        return await User.find_one(User.email_key == email_key(login))
    return await User.find_one(User.username_key == username_key(login))


async def authenticate(
    request: LoginRequest, address: str, hasher: PasswordHasher, limiter: LoginLimiter
) -> User:
    login_key = email_key(request.login) if "@" in request.login else username_key(request.login)
    reservation = await limiter.reserve(login_key, address)
    if not isinstance(reservation, Reservation):
        wait = max(1, round(reservation))
        log.warning("login.rate_limited", extra={"address": address})
        raise RateLimited(
            "rate_limited", f"too many failed logins, try again in {wait} s", retry_after_s=wait
        )
    failed = False
    try:
        user = await find_user_by_login(request.login)
        ok = await hasher.verify(request.password, user.password_hash if user else None)
        if not ok or user is None:
            failed = True
            log.info("login.failed", extra={"address": address})
            raise Unauthenticated("invalid_credentials", "wrong login or password")
    finally:
        # Only a checked, wrong password keeps its slot: a success, or an attempt cut off
        # before it was answered (client gone, store error), gives it back.
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
    reservation = await limiter.reserve(user.username_key, address)
    if not isinstance(reservation, Reservation):
        wait = max(1, round(reservation))
        log.warning("password_change.rate_limited", extra={"address": address})
        raise RateLimited(
            "rate_limited", f"too many failed attempts, try again in {wait} s", retry_after_s=wait
        )
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

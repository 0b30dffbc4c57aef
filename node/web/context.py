"""What a running node's request handlers share: one object, built at start-up."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pymongo import AsyncMongoClient
from quart import current_app
from redis.asyncio import Redis

from node.config import Settings
from node.runtime.cluster import Cluster
from node.runtime.live import Live
from node.runtime.metrics import NodeMetrics
from node.state.ratelimit import LoginLimiter, SignupLimiter
from node.state.revocation import TokenState
from node.store.users import PasswordHasher
from node.web.peers import SocketSlots
from node.web.tokens import TokenService

EXTENSION = "sfumesh"


@dataclass
class NodeContext:
    settings: Settings
    redis: Redis
    store: AsyncMongoClient[dict[str, Any]]
    tokens: TokenService
    token_state: TokenState
    hasher: PasswordHasher
    login_limiter: LoginLimiter
    signup_limiter: SignupLimiter
    live: Live
    metrics: NodeMetrics
    cluster: Cluster
    #: open WebSockets per user and per address on this node (their caps)
    ws_slots: SocketSlots


def node_context() -> NodeContext:
    context: NodeContext = current_app.extensions[EXTENSION]
    return context

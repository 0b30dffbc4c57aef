"""The document store: one MongoDB URI -> the real driver -> Beanie, whatever serves it.

Start-up on a far link (README "WAN lab", issue 13 item 6): Beanie's `init_beanie` sets up
the models one after another, two round trips each for the indexes (`listIndexes`, then
`createIndexes`): 300 ms from the store, that was most of a node's 20 s start-up. Here
Beanie sets the models up without the indexes, then every model's indexes are made at
once, each on a connection of its own: the driver opens `MIN_POOL_SIZE` connections as soon
as it has found the server (while Beanie reads the server's version and collections), and
may open `MAX_CONNECTING` at a time (its default is 2). So the indexes cost the same few
round trips whatever the number of models. `open_store` logs `store.opened` with the
commands it sent and the rounds they took (`StartupCommands`): the lab test bounds those.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from beanie import Document
from beanie.odm.utils.init import Initializer
from pymongo import AsyncMongoClient
from pymongo.monitoring import (
    CommandFailedEvent,
    CommandListener,
    CommandStartedEvent,
    CommandSucceededEvent,
)

from node.store.expenses import COST_MODELS
from node.store.happenings import HAPPENING_MODELS
from node.store.models import DOCUMENT_MODELS

log = logging.getLogger(__name__)

#: connections the driver may open at once (pymongo's default is 2)
MAX_CONNECTING = 16
#: connections kept open, made as soon as the server is found (one per model's indexes)
MIN_POOL_SIZE = 10


class StartupCommands(CommandListener):
    """The store commands of the start-up and the rounds they took: a round begins when a
    command is sent while none is in flight (commands in flight together wait together).
    Counts until `stop()`; the driver calls it on its own threads or loop, hence no await."""

    def __init__(self) -> None:
        self.commands = 0
        self.rounds = 0
        self._in_flight = 0
        self._counting = True

    def stop(self) -> None:
        self._counting = False

    def started(self, event: CommandStartedEvent) -> None:
        if self._counting:
            self.commands += 1
            if self._in_flight == 0:
                self.rounds += 1
            self._in_flight += 1

    def succeeded(self, event: CommandSucceededEvent) -> None:
        self._in_flight = max(0, self._in_flight - 1)

    def failed(self, event: CommandFailedEvent) -> None:
        self._in_flight = max(0, self._in_flight - 1)


async def open_store(uri: str, database: str) -> AsyncMongoClient[dict[str, Any]]:
    started = time.perf_counter()
    counter = StartupCommands()
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        uri,
        tz_aware=True,
        serverSelectionTimeoutMS=5000,
        uuidRepresentation="standard",
        maxConnecting=MAX_CONNECTING,
        minPoolSize=MIN_POOL_SIZE,
        event_listeners=[counter],
    )
    models = [*DOCUMENT_MODELS, *COST_MODELS, *HAPPENING_MODELS]
    # `init_beanie(...)` is `await Initializer(...)`; kept to reach its `init_indexes`.
    beanie = Initializer(database=client[database], document_models=models, skip_indexes=True)
    await beanie
    documents = [m for m in beanie.document_models if issubclass(m, Document)]
    await asyncio.gather(*(beanie.init_indexes(model) for model in documents))
    counter.stop()
    log.info(
        "store.opened",
        extra={
            "models": len(documents),
            "commands": counter.commands,
            "rounds": counter.rounds,
            "s": round(time.perf_counter() - started, 3),
        },
    )
    return client


async def ping_store(client: AsyncMongoClient[dict[str, Any]]) -> None:
    await client.admin.command("ping")

"""The document store: one MongoDB URI -> the real driver -> Beanie, whatever serves it.

Start-up on a far link (README "WAN lab", issue 13 item 6): Beanie's `init_beanie` sets up
the models one after another, two round trips each for the indexes (`listIndexes`, then
`createIndexes`): 300 ms from the store, that was most of a node's 20 s start-up. Here
Beanie sets the models up without the indexes, then every model's indexes are made at
once, each on a connection of its own (`maxConnecting`: the driver opens only 2 at a time
by default), so the indexes cost a few round trips whatever the number of models.
"""

from __future__ import annotations

import asyncio
from typing import Any

from beanie import Document
from beanie.odm.utils.init import Initializer
from pymongo import AsyncMongoClient

from node.store.expenses import COST_MODELS
from node.store.happenings import HAPPENING_MODELS
from node.store.models import DOCUMENT_MODELS

#: connections the driver may open at once (pymongo's default is 2)
MAX_CONNECTING = 16


async def open_store(uri: str, database: str) -> AsyncMongoClient[dict[str, Any]]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        uri,
        tz_aware=True,
        serverSelectionTimeoutMS=5000,
        uuidRepresentation="standard",
        maxConnecting=MAX_CONNECTING,
    )
    models = [*DOCUMENT_MODELS, *COST_MODELS, *HAPPENING_MODELS]
    # `init_beanie(...)` is `await Initializer(...)`; kept to reach its `init_indexes`.
    beanie = Initializer(database=client[database], document_models=models, skip_indexes=True)
    await beanie
    documents = [m for m in beanie.document_models if issubclass(m, Document)]
    await asyncio.gather(*(beanie.init_indexes(model) for model in documents))
    return client


async def ping_store(client: AsyncMongoClient[dict[str, Any]]) -> None:
    await client.admin.command("ping")

"""The document store: one MongoDB URI -> the real driver -> Beanie, whatever serves it."""

from __future__ import annotations

from typing import Any

from beanie import init_beanie
from pymongo import AsyncMongoClient

from node.store.expenses import COST_MODELS
from node.store.happenings import HAPPENING_MODELS
from node.store.models import DOCUMENT_MODELS


async def open_store(uri: str, database: str) -> AsyncMongoClient[dict[str, Any]]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        uri, tz_aware=True, serverSelectionTimeoutMS=5000, uuidRepresentation="standard"
    )
    models = [*DOCUMENT_MODELS, *COST_MODELS, *HAPPENING_MODELS]
    await init_beanie(database=client[database], document_models=models)
    return client


async def ping_store(client: AsyncMongoClient[dict[str, Any]]) -> None:
    await client.admin.command("ping")

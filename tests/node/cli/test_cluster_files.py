"""`sfumesh cluster files` (issue 15, item 7): storage per room for the operator, from the
quota counters of real uploads through an in-process node and the real Redis."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from node.cli.main import main
from tests.conftest import Api
from tests.node.web.test_files import Room, photo

# Redis paths: ./scripts/test runs these on a Redis Cluster too (SFUMESH_TEST_REDIS=cluster).
pytestmark = pytest.mark.redis_paths


async def test_cluster_files_lists_rooms_by_bytes_stored(
    make_app: Any, backing: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    app = await make_app()
    settings = app.app.extensions["sfumesh"].settings
    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(backing.mongodb_uri)
    api = Api(app.test_client())
    small = await Room(api, mongo[settings.database]).setup("small")
    small_photo = photo(width=300, height=200)
    assert (await small.upload(small_photo)).status_code == 201
    big = Room(api, mongo[settings.database])
    big.slug, big.alice = "big", small.alice
    await api.create_room(small.alice_user, "big")
    big_file = b"%PDF-1.4 " + bytes(range(256)) * 2000
    assert (await big.upload(big_file, "big.pdf")).status_code == 201
    await api.create_room(small.alice_user, "empty")
    await mongo.close()

    config = tmp_path / "node.toml"
    config.write_text("[files]\nroom_quota_bytes = 1000000\n")
    argv = ["cluster", "files", "--config", str(config), "--redis-url", backing.redis_url]
    assert await asyncio.to_thread(main, [*argv, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["room"], r["bytes"]) for r in rows] == [
        ("big", len(big_file)),
        ("small", len(small_photo)),
    ]
    assert rows[0]["quota_percent"] == round(100 * len(big_file) / 1_000_000, 1)

    assert await asyncio.to_thread(main, argv) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["room", "bytes", "mb", "quota_percent"]
    assert [line.split()[0] for line in table[1:]] == ["big", "small"]

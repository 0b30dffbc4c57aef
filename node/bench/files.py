"""`sfumesh bench files`: Memories (issue 15) on one real node process.

Embedded services and one node start as in `sfumesh demo`, in a temporary data dir; this
process drives the node over HTTP with httpx. Three phases:

1. one large upload (`--size-mb`, 200 by default) streamed from here in 1 MiB pieces, while
   the node's resident memory is sampled every 20 ms: `upload_mb_s` (the whole request,
   GridFS included) and `upload_rss_mb_over_idle` (the highest RSS seen, less the RSS
   before it began; streaming keeps it far below the file's size),
2. `--photos` distinct 12-megapixel JPEGs (with EXIF) uploaded one at a time:
   `thumb_ms_p50/p95` is each request's time, decode + orient + strip + three encodes
   included (the upload itself is a few milliseconds of it on loopback),
3. a room holding `--gallery-photos` photos (5,000 by default; their documents written
   straight to the store, as only documents are read): `GET /api/rooms/{slug}/files`
   pages from random places in the gallery, `gallery_ms_p95`.

Targets of the issue: `upload_rss_mb_over_idle` < 100, `thumb_ms_p95` < 1500,
`gallery_ms_p95` < 200. Any failed request fails the run (exit 1).
"""

from __future__ import annotations

import asyncio
import io
import os
import random
import secrets
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from PIL import Image
from pymongo import AsyncMongoClient

from mesh.process import ServiceError
from node.bench.harness import BenchFailure, http_client, no_interrupts
from node.bench.report import Phase, percentile, rounded, say, write_report
from node.config import new_key
from node.local.launch import LocalNode, start_node
from node.log import setup_logging
from node.runtime.services import BackingServices
from node.store.models import gallery_key

MIB = 1024 * 1024
PASSWORD = "bench files password"  # noqa: S105  (a throwaway account of the bench)
GALLERY_PAGE = 50
RSS_SAMPLE_S = 0.02


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def big_photo(seed: int, width: int = 4000, height: int = 3000) -> bytes:
    """A 12-megapixel JPEG with some detail, distinct per seed, with EXIF like a phone's."""
    rng = random.Random(seed)  # noqa: S311  (test pixels, not secrets)
    small = Image.frombytes("RGB", (160, 120), rng.randbytes(160 * 120 * 3))
    image = small.resize((width, height), Image.Resampling.BILINEAR)
    exif = Image.Exif()
    exif[0x0112] = 6
    exif.get_ifd(0x8769)[36867] = "2024:07:14 18:30:00"
    exif.get_ifd(0x8825).update({1: "N", 2: (48.0, 51.0, 29.0)})
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90, exif=exif.tobytes())
    return out.getvalue()


async def _drive(
    node: LocalNode, mongodb_uri: str, database: str, args: dict[str, Any]
) -> dict[str, Any]:
    pid = node.process.pid
    assert pid is not None
    figures: dict[str, Any] = {}
    async with http_client(node.url, 4) as http:
        name = f"b{secrets.token_hex(4)}"
        reply = await http.post(
            "/api/users",
            json={
                "username": name,
                "email": f"{name}@example.org",
                "password": PASSWORD,
                "display_name": name,
            },
        )
        reply.raise_for_status()
        login = await http.post("/api/auth/login", json={"login": name, "password": PASSWORD})
        login.raise_for_status()
        user_auth = {"Authorization": f"Bearer {login.json()['user_token']}"}
        session = await http.post("/api/sessions", headers=user_auth)
        session.raise_for_status()
        auth = {"Authorization": f"Bearer {session.json()['session_token']}"}
        user_id = (await http.get("/api/users/me", headers=user_auth)).json()["id"]
        slug = f"bench-{secrets.token_hex(3)}"
        (await http.post("/api/rooms", json={"slug": slug}, headers=user_auth)).raise_for_status()

        # 1. one large streamed upload, RSS sampled (after a small one: the first upload's
        # one-time costs, thread pool and GridFS set-up, are not the file's)
        warm = await http.post(
            f"/api/rooms/{slug}/files",
            params={"name": "warm.bin"},
            content=os.urandom(MIB),
            headers=auth,
        )
        if warm.status_code != 201:
            raise BenchFailure(f"upload: HTTP {warm.status_code}: {warm.text[:200]}")
        size = int(args["size_mb"] * MIB)
        idle = _rss_mb(pid)
        peak = idle
        done = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, _rss_mb(pid))
                await asyncio.sleep(RSS_SAMPLE_S)

        async def body() -> AsyncIterator[bytes]:
            left = size
            while left > 0:
                piece = os.urandom(min(MIB, left))
                left -= len(piece)
                yield piece

        sampler = asyncio.create_task(sample())
        started = time.perf_counter()
        reply = await http.post(
            f"/api/rooms/{slug}/files",
            params={"name": "big.bin"},
            content=body(),
            headers={**auth, "Content-Length": str(size)},
        )
        elapsed = time.perf_counter() - started
        done.set()
        await sampler
        if reply.status_code != 201:
            raise BenchFailure(f"large upload: HTTP {reply.status_code}: {reply.text[:200]}")
        figures["upload_mb_s"] = rounded(size / MIB / elapsed)
        figures["upload_rss_mb_over_idle"] = rounded(peak - idle)
        figures["upload_mb"] = args["size_mb"]

        # 2. 12-megapixel photos, one at a time
        thumbs = Phase("thumb", "12 MP JPEG upload + variants")
        for index in range(args["photos"]):
            data = await asyncio.to_thread(big_photo, index)
            started = time.perf_counter()
            reply = await http.post(
                f"/api/rooms/{slug}/files",
                params={"name": f"p{index}.jpg"},
                content=data,
                headers=auth,
            )
            if reply.status_code != 201:
                raise BenchFailure(f"photo upload: HTTP {reply.status_code}: {reply.text[:200]}")
            thumbs.latencies_ms.append((time.perf_counter() - started) * 1000)
        ordered = sorted(thumbs.latencies_ms)
        figures["thumb_ms_p50"] = rounded(percentile(ordered, 0.50))
        figures["thumb_ms_p95"] = rounded(percentile(ordered, 0.95))
        figures["photos"] = args["photos"]

        # 3. a gallery of many photos
        count = args["gallery_photos"]
        mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongodb_uri, tz_aware=True)
        try:
            gallery_slug = f"gallery-{secrets.token_hex(3)}"
            (
                await http.post("/api/rooms", json={"slug": gallery_slug}, headers=user_auth)
            ).raise_for_status()
            now = datetime.now(UTC)
            docs = []
            for index in range(count):
                taken = now - timedelta(minutes=index * 7)
                sha = secrets.token_hex(32)
                file_id = secrets.token_hex(16)
                docs.append(
                    {
                        "_id": file_id,
                        "gallery_key": gallery_key(taken, file_id),
                        "room": gallery_slug,
                        "dedup_key": f"{gallery_slug}\n{sha}",
                        "uploader_id": user_id,
                        "uploader_name": name,
                        "name": f"IMG_{index:05d}.jpg",
                        "kind": "image",
                        "content_type": "image/jpeg",
                        "size": 3_000_000,
                        "sha256": sha,
                        "width": 4000,
                        "height": 3000,
                        "taken_at": taken,
                        "sort_at": taken,
                        "created_at": now,
                        "variants": {},
                        "message_id": None,
                    }
                )
            collection = mongo[database]["files"]
            for start in range(0, count, 500):
                await collection.insert_many(docs[start : start + 500])
            cursors = [None] + [docs[i]["_id"] for i in range(0, count, max(1, count // 40))]
            pages = Phase("gallery", "gallery page of 50")
            for _ in range(args["gallery_requests"]):
                before = random.choice(cursors)  # noqa: S311
                params = {"kind": "image", "limit": str(GALLERY_PAGE), "before": before or ""}
                started = time.perf_counter()
                reply = await http.get(
                    f"/api/rooms/{gallery_slug}/files", params=params, headers=auth
                )
                if reply.status_code != 200:
                    raise BenchFailure(f"gallery: HTTP {reply.status_code}: {reply.text[:200]}")
                pages.latencies_ms.append((time.perf_counter() - started) * 1000)
            ordered = sorted(pages.latencies_ms)
            figures["gallery_ms_p50"] = rounded(percentile(ordered, 0.50))
            figures["gallery_ms_p95"] = rounded(percentile(ordered, 0.95))
            figures["gallery_photos"] = count
        finally:
            await mongo.close()
    return figures


def run_files_bench(
    *,
    json_path: Path | None,
    size_mb: float = 200.0,
    photos: int = 10,
    gallery_photos: int = 5000,
    gallery_requests: int = 100,
) -> int:
    """Run `bench files`; 0 when it ran without errors, 1 when not."""
    setup_logging(os.environ.get("SFUMESH_LOG_LEVEL", "WARNING"))
    args = {
        "size_mb": size_mb,
        "photos": photos,
        "gallery_photos": gallery_photos,
        "gallery_requests": gallery_requests,
    }
    try:
        with tempfile.TemporaryDirectory(prefix="sfumesh-bench-") as tmp:
            data_dir = Path(tmp)
            services = BackingServices.start("", "", data_dir / "services")
            database = f"bench_{secrets.token_hex(4)}"
            node: LocalNode | None = None
            try:
                extra_env = {
                    "SFUMESH_DATABASE": database,
                    "SFUMESH_BCRYPT_COST": "4",
                    "SFUMESH_MAX_FILE_BYTES": str(int(size_mb * MIB) + MIB),
                    "SFUMESH_ROOM_QUOTA_BYTES": str(int(size_mb * MIB) * 2 + 500 * MIB),
                    "SFUMESH_USER_QUOTA_BYTES": str(int(size_mb * MIB) * 2 + 500 * MIB),
                }
                node = start_node(
                    services,
                    {"bench": new_key()},
                    name="node-1",
                    data_dir=data_dir,
                    extra_env=extra_env,
                )
                figures = asyncio.run(_drive(node, services.mongodb_uri, database, args))
            finally:
                with no_interrupts():
                    if node is not None:
                        node.stop()
                    services.stop()
    except KeyboardInterrupt:
        print("sfumesh bench: interrupted; node and services stopped", file=sys.stderr)
        return 130
    except (ServiceError, BenchFailure, httpx.HTTPError) as error:
        print(f"sfumesh bench: {error}", file=sys.stderr)
        return 1
    say(f"sfumesh bench files: 1 node, {os.cpu_count() or '?'} CPUs")
    for key, value in figures.items():
        say(f"  {key:<26} {value}")
    if json_path is not None and not write_report(json_path, figures):
        return 1
    return 0

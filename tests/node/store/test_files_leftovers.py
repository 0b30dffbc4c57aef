"""Temporary upload files of a node killed mid-upload (issue 15): on start a node removes
its own stale leftovers in `data_dir/uploads`, and nothing of other nodes sharing the
directory, through a real in-process node."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from node.store.files import FileStore, upload_prefix
from node.web.files import FILES_EXTENSION


def _file(directory: Path, name: str, age_s: float) -> Path:
    path = directory / name
    path.write_bytes(b"half an upload")
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


async def test_a_node_removes_only_its_own_stale_upload_files_on_start(
    make_app: Any, tmp_path: Path
) -> None:
    data_dir = tmp_path / "shared"
    uploads = data_dir / "uploads"
    uploads.mkdir(parents=True)
    hour = 3600.0
    own_stale = _file(uploads, f"{upload_prefix('node-a')}4242-x1", hour)
    own_stale_2 = _file(uploads, f"{upload_prefix('node-a')}77-x2", 2 * hour)
    own_recent = _file(uploads, f"{upload_prefix('node-a')}4242-x3", 60)
    other_node = _file(uploads, f"{upload_prefix('node-b')}4242-x4", hour)
    # A name that begins like node-a's but is another node: escaped, so no prefix of it.
    look_alike = _file(uploads, f"{upload_prefix('node-a-2')}4242-x5", hour)
    unrelated = _file(uploads, "notes.txt", hour)

    app = await make_app(data_dir=str(data_dir), node_name="node-a", files__stale_upload_s=600)

    assert not own_stale.exists() and not own_stale_2.exists()
    for kept in (own_recent, other_node, look_alike, unrelated):
        assert kept.exists(), kept.name
    store: FileStore = app.app.extensions[FILES_EXTENSION]
    handle, path = store._temp()
    handle.close()
    assert path.name.startswith(f"{upload_prefix('node-a')}{os.getpid()}.")
    # This process's own files are never its leftovers, however old.
    os.utime(path, (time.time() - hour, time.time() - hour))
    assert store.sweep_leftovers() == 0 and path.exists()


def test_upload_prefixes_of_distinct_names_never_overlap() -> None:
    names = ["node-a", "node-a-2", "node~a", "node.a", "node_a", "nöde", "a/b", "a~b~c"]
    prefixes = [upload_prefix(n) for n in names]
    for i, first in enumerate(prefixes):
        assert "/" not in first
        for j, second in enumerate(prefixes):
            if i != j:
                assert not second.startswith(first), (names[i], names[j])

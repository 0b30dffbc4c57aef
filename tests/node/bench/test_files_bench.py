"""`sfumesh bench files` end to end, short: real services, a real node process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from node.cli.main import main

FIGURES = (
    "upload_mb_s",
    "thumb_ms_p50",
    "thumb_ms_p95",
    "upload_rss_mb_over_idle",
    "gallery_ms_p95",
)


@pytest.fixture(autouse=True)
def _keep_test_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("node.bench.files.setup_logging", lambda *_: None)


@pytest.mark.slow
def test_bench_files_writes_every_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "files.json"
    argv = ["bench", "files", "--json", str(out), "--size-mb", "24", "--photos", "2"]
    argv += ["--gallery-photos", "300"]
    assert main(argv) == 0, capsys.readouterr()
    figures = json.loads(out.read_text())
    for key in FIGURES:
        value = figures[key]
        assert isinstance(value, int | float) and not isinstance(value, bool), (key, value)
    assert figures["upload_mb_s"] > 0 and figures["thumb_ms_p95"] > 0
    # Streamed: a 24 MB upload does not hold the file in the node's memory.
    assert figures["upload_rss_mb_over_idle"] < 24

"""`sfumesh bench happenings`, a short run end to end: 3 real node processes, one restarted
midway; every named figure written, no reminder doubled or missed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from node.cli.main import main

FIGURES = (
    "reminder_delay_ms_p50",
    "reminder_delay_ms_p99",
    "reminder_duplicates",
    "reminder_missed",
    "rsvp_per_s",
)


@pytest.fixture(autouse=True)
def _keep_test_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("node.bench.happenings.setup_logging", lambda *_: None)


@pytest.mark.slow
def test_bench_happenings_short_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    argv = ["bench", "happenings", "--json", str(out), "--reminders", "40", "--duration", "1"]
    assert main(argv) == 0, capsys.readouterr()
    figures = json.loads(out.read_text())
    for key in FIGURES:
        assert isinstance(figures[key], int | float) and not isinstance(figures[key], bool), key
    assert figures["reminders"] == 40 and figures["nodes"] == 3
    assert figures["reminder_duplicates"] == 0 and figures["reminder_missed"] == 0
    assert figures["rsvp_per_s"] > 0 and figures["errors"] == 0

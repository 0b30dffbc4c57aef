"""`sfumesh bench idle` (issue 19): a tiny real run prints its table and writes the figures."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from node.bench.idle import child_pids
from node.cli.main import main

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _keep_test_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("node.bench.idle.setup_logging", lambda *_: None)


def test_a_tiny_run_writes_both_figures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "idle.json"
    argv = ["bench", "idle", "--duration", "2", "--warmup", "0.5", "--sessions", "5"]
    code = main([*argv, "--json", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.out + printed.err
    figures = json.loads(out.read_text())
    for key in ("idle_cpu_pct", "idle_cpu_pct_100_sessions"):
        value = figures[key]
        assert isinstance(value, int | float) and not isinstance(value, bool), (key, figures)
        # a live node process spends something, and far less than a core, when idle
        assert 0 <= value < 100, (key, figures)
    # the sessions were real: signed up, connected and joined, all still open at the end
    assert figures["sessions"] == 5 and figures["sessions_open"] == 5, figures
    assert figures["duration_s"] == 2
    assert set(figures["load_average"]) == {"no_session", "sessions"}
    assert "idle sessions" in printed.out and "target: idle node" in printed.out


def test_child_pids_lists_a_process_children() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert child.pid in child_pids(os.getpid())
    finally:
        child.kill()
        child.wait()
    assert child.pid not in child_pids(os.getpid())
    assert child_pids(2**22 + 12345) == []  # no such process

"""`sfumesh bench failover`: a short real run (one client on the node killed) prints its
table and writes the issue's keys; the client, a `FailoverParticipant` with the web
client's procedure, gets its media back on another node (no client lost)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from node.cli.main import main

pytestmark = pytest.mark.slow


def test_a_short_run_brings_the_client_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "failover.json"
    code = main(["bench", "failover", "--clients", "1", "--timeout", "40", "--json", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.out + printed.err
    figures = json.loads(out.read_text())
    assert figures["clients_lost"] == 0
    assert 0 < figures["media_back_s_p50"] <= figures["media_back_s_p95"]
    assert len(figures["media_back_s"]) == 1
    assert sum(figures["landed_on"].values()) == 1 and "node-1" not in figures["landed_on"]
    assert "media back p95" in printed.out and "clients lost" in printed.out

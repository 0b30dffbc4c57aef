"""`sfumesh bench api` and `bench join` end to end: real services, real node processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from node.cli.main import main

NAMED_FIGURES = (
    "signups_per_s",
    "logins_per_s",
    "get_room_p50_ms",
    "get_room_p99_ms",
    "get_room_idle_p50_ms",
    "get_room_idle_p99_ms",
    "ping_p50_ms",
    "ping_p99_ms",
    "attack_ping_p50_ms",
    "attack_ping_p99_ms",
    "bcrypt_cost",
    "concurrency",
    "duration_s",
)

JOIN_FIGURES = (
    "spread_joins_per_s",
    "spread_join_p50_ms",
    "spread_join_p99_ms",
    "one_room_joins_per_s",
    "one_room_join_p50_ms",
    "one_room_join_p99_ms",
    "nodes",
    "clients",
    "duration_s",
)


@pytest.fixture(autouse=True)
def _keep_test_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    # The bench configures the root logger for a command-line run; not for the test session.
    monkeypatch.setattr("node.bench.api.setup_logging", lambda *_: None)
    monkeypatch.setattr("node.bench.join.setup_logging", lambda *_: None)


@pytest.mark.slow
def test_bench_api_writes_every_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    argv = ["bench", "api", "--json", str(out), "--duration", "0.5", "--bcrypt-cost", "4"]
    assert main(argv) == 0, capsys.readouterr()
    figures = json.loads(out.read_text())
    for key in NAMED_FIGURES:
        value = figures[key]
        assert isinstance(value, int | float) and not isinstance(value, bool), (key, value)
        assert value > 0, (key, value)
    assert figures["errors"] == 0
    assert figures["bcrypt_cost"] == 4 and figures["concurrency"] == 8
    # The attack phase ran: the oversized chat text was answered (refused), and the sign-up
    # flood from one address met the node's default per-address limit (10).
    phases = figures["phases"]
    assert phases["attack_unicode"]["ok"] > 0 and phases["ping_under_attack"]["ok"] > 0
    assert set(figures["attack_statuses"]["unicode"]) <= {"401", "422", "dropped"}
    signups = figures["attack_statuses"]["signup"]
    assert figures["attack_signups_accepted"] == signups.get("201", 0) <= 10
    assert set(signups) <= {"201", "429", "503", "dropped"} and signups.get("429", 0) > 0, signups
    table = capsys.readouterr().out
    assert "GET /api/rooms/{slug}" in table and "errors: none" in table
    assert "GET /api/ping under attack" in table


def test_bench_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "api", "--duration", "0"]) == 2
    assert main(["bench", "api", "--concurrency", "0"]) == 2
    assert main(["bench", "api", "--bcrypt-cost", "3"]) == 2
    assert "--duration must be > 0" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_join_writes_every_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench-join.json"
    argv = ["bench", "join", "--json", str(out), "--duration", "1", "--clients", "12"]
    assert main(argv) == 0, capsys.readouterr()
    figures = json.loads(out.read_text())
    for key in JOIN_FIGURES:
        value = figures[key]
        assert isinstance(value, int | float) and not isinstance(value, bool), (key, value)
        assert value > 0, (key, value)
    assert figures["errors"] == 0
    assert figures["nodes"] == 3 and figures["clients"] == 12 and figures["bcrypt_cost"] == 4
    # Every full join was also an HTTP join, and every one was left again.
    phases = figures["phases"]
    for key in ("spread", "one_room"):
        assert phases[f"{key}_http"]["ok"] >= phases[key]["ok"] > 0
        assert phases[f"{key}_leave"]["ok"] == phases[key]["ok"]
    table = capsys.readouterr().out
    assert "full join, one room" in table and "errors: none" in table


def test_bench_join_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "join", "--duration", "0"]) == 2
    assert main(["bench", "join", "--nodes", "0"]) == 2
    assert main(["bench", "join", "--clients", "0"]) == 2
    assert main(["bench", "join", "--bcrypt-cost", "3"]) == 2
    assert "--clients 1.." in capsys.readouterr().err


@pytest.mark.slow
def test_bench_codecs_measures_every_codec_and_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench-codecs.json"
    argv = ["bench", "codecs", "--json", str(out), "--duration", "0.3"]
    assert main(argv) == 0, capsys.readouterr()
    figures = json.loads(out.read_text())
    rows = {(row["codec"], row["width"], row["height"]): row for row in figures["results"]}
    assert set(rows) == {
        (codec, width, height)
        for codec in ("VP8", "H264")
        for width, height in ((640, 360), (1280, 720))
    }
    for key, row in rows.items():
        for figure in ("encode_ms_per_frame", "decode_ms_per_frame", "bitrate_kbps", "frames"):
            value = row[figure]
            assert isinstance(value, int | float) and not isinstance(value, bool), (key, figure)
            assert value > 0, (key, figure, value)
        assert row["frames"] == 9 and row["decoded_frames"] == 9, (key, row)
    assert figures["duration_s"] == 0.3 and figures["cpu_count"] >= 1
    table = capsys.readouterr().out
    assert "CPU time of this process" in table and "H264    1280x720" in table


def test_bench_codecs_rejects_bad_duration(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "codecs", "--duration", "0"]) == 2
    assert "--duration must be > 0" in capsys.readouterr().err

"""The command line as a newcomer meets it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from node.cli import main


@pytest.mark.slow
def test_demo_smoke_walks_the_whole_flow(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "MONGODB_URI")}
    result = subprocess.run(
        [sys.executable, "-m", "node.cli", "demo", "--smoke", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for step in ("signup", "login", "session", "create room", "qr code", "chat history"):
        assert f"ok   {step}" in result.stdout
    assert "smoke: passed" in result.stdout
    # Everything it started is gone: no process runs from the demo's data dir any more.
    assert not [line for line in _command_lines() if str(tmp_path) in line]


def _command_lines() -> list[str]:
    lines = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            lines.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, UnicodeDecodeError):
            continue  # gone meanwhile, or not ours to read
    return lines


def test_node_without_signing_keys_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("SFUMESH_TOKEN_KEYS", raising=False)
    assert main(["node", "--port", "0"]) == 2
    assert "no token signing keys" in capsys.readouterr().err


def test_node_with_bad_config_says_what_is_wrong(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("bcrypt_cost = 99\n")
    assert main(["node", "--config", str(config)]) == 2
    assert "bcrypt_cost" in capsys.readouterr().err


def test_keygen_prints_a_usable_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen"]) == 0
    assert len(capsys.readouterr().out.strip()) >= 32

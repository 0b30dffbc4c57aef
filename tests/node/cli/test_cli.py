"""The command line as a newcomer meets it."""

from __future__ import annotations

import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mesh.process import free_port
from node.cli.main import main


@pytest.mark.slow
def test_demo_smoke_walks_the_whole_flow(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "MONGODB_URI")}
    data_dir = tmp_path / ".data"
    result = subprocess.run(
        [sys.executable, "-m", "node.cli", "demo", "--smoke", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
        umask=0o022,  # a usual shell's: the demo must not depend on it
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for step in ("signup", "login", "session", "create room", "qr code", "chat history"):
        assert f"ok   {step}" in result.stdout
    assert "smoke: passed" in result.stdout
    # Its data (users' emails and hashes, secrets, logs) is the user's alone.
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    written = list(data_dir.rglob("*"))
    assert any(path.name == "redis.conf" for path in written)
    assert any(path.suffix == ".db" for path in written)
    for path in written:
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert mode & 0o077 == 0, f"{path} is {oct(mode)}"
    # Everything it started is gone: no process runs from the demo's data dir any more.
    assert not [line for line in _command_lines() if str(tmp_path) in line]


@pytest.mark.slow
def test_demo_runs_a_mesh_the_cluster_cli_can_see(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_URL", "SFUMESH_"))}
    env.pop("MONGODB_URI", None)
    argv = [sys.executable, "-m", "node.cli", "demo", "--nodes", "2", "--data-dir", str(tmp_path)]
    argv += ["--port", str(free_port())]
    demo = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        assert demo.stdout is not None
        lines: list[str] = []
        for line in demo.stdout:
            lines.append(line)
            if "Ctrl-C stops it." in line:
                break
        mesh_line = next((x for x in lines if "the mesh:" in x), None)
        assert mesh_line is not None, "".join(lines)
        cluster_env = Path(mesh_line.split(". ", 1)[1].split(" &&", 1)[0])
        assert cluster_env.stat().st_mode & 0o777 == 0o600
        for line in cluster_env.read_text().splitlines():
            key, value = line.removeprefix("export ").split("=", 1)
            env[key] = shlex.split(value)[0]
        deadline = time.monotonic() + 30
        while True:
            members = subprocess.run(
                [sys.executable, "-m", "node.cli", "cluster", "members", "--json"],
                capture_output=True,
                text=True,
                timeout=60,
                env=env,
                check=False,
            )
            assert members.returncode == 0, members.stderr
            alive = [m for m in json.loads(members.stdout) if m["status"] == "alive"]
            if len(alive) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert sorted(m["name"] for m in alive) == ["node-1", "node-2"]
        demo.send_signal(signal.SIGINT)
        assert demo.wait(60) == 0
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(10)
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


MESH_ENV = {
    "SFUMESH_TOKEN_KEYS": json.dumps({"k1": "s" * 40}),
    "SFUMESH_TOKEN_SIGNING_KEY_ID": "k1",
    "SFUMESH_SERF_MODE": "own",
    "SFUMESH_RELAY_KEY": "r" * 40,
}


@pytest.mark.parametrize(
    ("env", "complaint"),
    [
        # anyone who reaches the agent's RPC could send relay queries as any node
        ({"SFUMESH_SERF_RPC_ADDR": "0.0.0.0:7373"}, "serf.rpc_auth"),
        ({"SFUMESH_SERF_RPC_ADDR": "10.0.0.5:7373"}, "serf.rpc_auth"),
        ({"SFUMESH_SERF_RPC_ADDR": "agent.example.org:7373"}, "serf.rpc_auth"),
        # without the relay key, relay messages could not be sealed
        ({"SFUMESH_RELAY_KEY": ""}, "relay.key"),
        ({"SFUMESH_RELAY_KEY": "short"}, "relay.key"),
        ({"SFUMESH_SERF_MODE": "attach", "SFUMESH_RELAY_KEY": ""}, "relay.key"),
    ],
)
def test_node_refuses_a_mesh_it_cannot_secure(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    complaint: str,
) -> None:
    for name, value in {**MESH_ENV, **env}.items():
        monkeypatch.setenv(name, value)
    assert main(["node", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert complaint in err and "r" * 40 not in err and "s" * 40 not in err


def test_keygen_prints_a_usable_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen"]) == 0
    assert len(capsys.readouterr().out.strip()) >= 32

"""`sfumesh lab selftest`: the emulator measured through the command line, its table and its
JSON. The figures depend on the machine (the issue's 1 ms p99 target is for an idle one), so
only their presence and sanity are checked here, never the target."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.cli.main import main
from node.lab import namespaces
from node.lab.namespaces import namespace_problem

KEYS = {
    "delay_error_ms_p50",
    "delay_error_ms_p99",
    "cpu_us_per_packet",
    "loss_achieved",
    "rate_achieved_mbps",
    "reordered",
}


@pytest.mark.slow
@pytest.mark.skipif(namespace_problem() is not None, reason=f"no lab: {namespace_problem()}")
def test_selftest_prints_a_table_and_writes_the_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "selftest.json"
    code = main(["lab", "selftest", "--duration", "1.5", "--json", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    for row in ("delay error p50", "delay error p99", "loss", "rate", "reordered", "CPU"):
        assert row in table
    figures = json.loads(out.read_text())
    assert set(figures) >= KEYS
    assert figures["reordered"] == 0
    # sanity only: a 50 ms link measured within a wide margin, 1% loss, a 10 Mbit/s cap
    assert -1 <= figures["delay_error_ms_p50"] <= 10
    assert 0.0 <= figures["loss_achieved"] <= 0.03
    assert 8.5 <= figures["rate_achieved_mbps"] <= 10.5
    assert figures["cpu_us_per_packet"] > 0


def test_selftest_without_namespaces_says_why(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(namespaces, "in_private_netns", lambda: True)
    monkeypatch.setattr("node.cli.lab.in_private_netns", lambda: True)
    monkeypatch.setattr(namespaces, "_has_cap_sys_admin", lambda: False)
    assert main(["lab", "selftest", "--duration", "1"]) == 2
    assert "CAP_SYS_ADMIN" in capsys.readouterr().err


def test_selftest_refuses_bad_figures(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checked before any lab is built (and, outside a private namespace, before the
    command re-executes itself in one)."""
    monkeypatch.setattr("node.cli.lab.in_private_netns", lambda: True)
    built: list[object] = []
    monkeypatch.setattr("node.cli.lab.run_selftest", built.append)
    assert main(["lab", "selftest", "--loss", "2"]) == 2
    assert "loss" in capsys.readouterr().err
    assert main(["lab", "selftest", "--size", "9000"]) == 2
    assert built == []


def _children(pid: int) -> list[int]:
    result = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False
    )
    return [int(p) for p in result.stdout.split()]


@pytest.mark.slow
@pytest.mark.skipif(namespace_problem() is not None, reason=f"no lab: {namespace_problem()}")
def test_ctrl_c_during_the_selftest_ends_it_cleanly() -> None:
    """SIGINT to the process group mid-measurement (as a terminal's Ctrl-C): exit 130 with
    one line, no traceback, and every process of the lab gone."""
    command = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "lab", "selftest", "--duration", "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        # three holders and the emulator: the lab is up
        while len(children := _children(command.pid)) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(children) == 4
        time.sleep(1.0)  # measuring
        os.killpg(command.pid, signal.SIGINT)
        out, _ = command.communicate(timeout=30)
    finally:
        if command.poll() is None:
            command.kill()
            command.wait()
    assert command.returncode == 130, out
    assert "interrupted" in out
    assert "Traceback" not in out
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{p}") for p in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in children if os.path.exists(f"/proc/{p}")]

"""`sfumesh lab selftest`: the emulator measured through the command line, its table and its
JSON. The figures depend on the machine (the issue's 1 ms p99 target is for an idle one), so
only their presence and sanity are checked here, never the target."""

from __future__ import annotations

import json
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

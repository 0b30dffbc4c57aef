"""Issue 18 item 1: `sfumesh demo --turn` starts its own coturn, its nodes hand sessions
credentials for it, and those buy a real TURN allocation (the smoke's `turn` step); the
coturn is gone when the demo ends."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_with_turn_smokes_and_stops_its_coturn(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "node.cli",
            "demo",
            "--smoke",
            "--turn",
            "--nodes",
            "1",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(
        r"^ok   turn: relayed address 127\.0\.0\.1:\d+ for \d+:\w+$", result.stdout, re.M
    )
    pid = int((tmp_path / "coturn" / "turnserver.pid").read_text().split()[0])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)

"""Issue 13 item 8, faults in the WAN lab, through `sfumesh bench faults` (so this is also
the bench's smoke test): mid-call, the Singapore-HCM link is cut for a few seconds in the
running emulator, then the Singapore node is killed. Media comes back both ways after the
cut (the relay recovers or is rebuilt) and after the kill (A fails over to the HCM node),
and the gaps are reported under the issue's keys. About 45 s."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from node.cli.main import main
from node.lab.namespaces import namespace_problem

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(namespace_problem() is not None, reason=f"no lab: {namespace_problem()}"),
]

CUT_S = 5.0


def test_media_comes_back_after_a_link_cut_and_a_node_kill(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "faults.json"
    code = main(["bench", "faults", "--cut", str(CUT_S), "--json", str(out)])
    printed = capsys.readouterr()
    print(printed.out)
    assert code == 0, printed.out + printed.err
    figures = json.loads(out.read_text())
    assert figures["link_cut_recovered"] and figures["node_kill_recovered"], figures
    # the cut was real: packets were dropped by it, and the media stopped for its length
    assert figures["packets_cut"] > 0
    assert figures["link_cut_media_gap_s"] >= CUT_S * 0.8, figures
    assert set(figures["link_cut_gap_s"]) == {"sg->hcm", "hcm->sg"}
    assert figures["node_kill_media_back_s"] > 0
    assert [(f["client"], f["from"], f["to"]) for f in figures["failovers"]] == [
        ("A", "sg-node", "hcm-node")
    ]
    assert "media gap sg->hcm" in printed.out and "media back" in printed.out

"""Issue 18 item 4 (the parts without processes): file_sd targets from Serf members, the
atomic writer, the `metrics` tag, the shipped Prometheus files under Debian's real
`promtool`, and the Grafana dashboard's structure. (Prometheus scraping a running mesh
through them, and the metric names against a node's /metrics:
tests/node/cli/test_monitoring_scrape.py.)"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from mesh.membership import NodeMember, member_from_serf
from mesh.serf import Member
from node.runtime.cluster import metrics_address
from node.runtime.monitoring import (
    FILES,
    TARGETS_FILE,
    file_sd,
    shipped_file,
    write_atomically,
    write_monitoring_files,
    write_targets,
)


def member(name: str, status: str = "alive", **fields: Any) -> NodeMember:
    return NodeMember(name, "10.0.0.1", 7946, status, **fields)


def test_targets_follow_the_members_tags() -> None:
    groups = file_sd(
        [
            member("eu-2", region="eu-west", http="https://eu.example.org/sfu"),
            member("ap-1", region="ap-southeast", http="http://10.1.0.5:8080"),
            member("vn-1", region="ap-vn", http="https://vn.example.org", metrics="10.2.0.5:9464"),
            member("gone", status="left", http="https://gone.example.org"),
            member("dead", status="failed", region="eu-west", http="https://dead.example.org"),
            member("serf-only", region="eu-west"),  # no URL: nothing to scrape
        ]
    )
    assert groups == [
        {
            "targets": ["10.1.0.5:8080"],
            "labels": {
                "node": "ap-1",
                "region": "ap-southeast",
                "__scheme__": "http",
                "__metrics_path__": "/metrics",
            },
        },
        {
            "targets": ["dead.example.org"],
            "labels": {
                "node": "dead",
                "region": "eu-west",
                "__scheme__": "https",
                "__metrics_path__": "/metrics",
            },
        },
        {
            "targets": ["eu.example.org"],
            "labels": {
                "node": "eu-2",
                "region": "eu-west",
                "__scheme__": "https",
                "__metrics_path__": "/sfu/metrics",
            },
        },
        {
            "targets": ["10.2.0.5:9464"],
            "labels": {"node": "vn-1", "region": "ap-vn", "__scheme__": "http"},
        },
    ]


def test_the_metrics_tag_is_validated() -> None:
    def parsed(tag: str) -> str:
        raw = Member("n", "10.0.0.1", 7946, {"metrics": tag}, "alive")
        return member_from_serf(raw).metrics

    assert parsed("10.0.0.1:9464") == "10.0.0.1:9464"
    assert parsed("[fd00::1]:9464") == "[fd00::1]:9464"
    assert parsed("metrics.example.org:9464") == "metrics.example.org:9464"
    for bad in ("10.0.0.1", "http://x:1/", "a b:1", "x:123456"):
        assert parsed(bad) == ""


def test_metrics_address_from_the_listener() -> None:
    assert metrics_address("", "https://eu.example.org") == ""
    assert metrics_address("10.0.0.5:9464", "https://eu.example.org") == "10.0.0.5:9464"
    assert metrics_address("0.0.0.0:9464", "https://eu.example.org") == "eu.example.org:9464"
    assert metrics_address("[::]:9464", "http://[fd00::2]:8080") == "[fd00::2]:9464"


def test_targets_are_written_atomically_and_only_on_change(tmp_path: Path) -> None:
    path = tmp_path / "targets" / "sfumesh.json"
    members = [member("a", http="http://10.0.0.1:8080")]
    assert write_targets(path, members) == (True, 1)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # Prometheus runs as its own user
    inode = path.stat().st_ino
    assert write_targets(path, members) == (False, 1)
    assert path.stat().st_ino == inode  # untouched
    assert write_targets(path, [*members, member("b", http="http://10.0.0.2:8080")]) == (True, 2)
    assert path.stat().st_ino != inode  # a new file renamed over the old one
    assert [g["labels"]["node"] for g in json.loads(path.read_text())] == ["a", "b"]
    assert os.listdir(path.parent) == ["sfumesh.json"]  # no temporary file left behind


def test_a_failed_write_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    write_atomically(path, "old\n")
    with pytest.raises(TypeError):
        write_atomically(path, None)  # type: ignore[arg-type]
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["t.json"]


def test_shipped_prometheus_files_pass_promtool(tmp_path: Path) -> None:
    written = write_monitoring_files(tmp_path)
    assert {p.name for p in written} == {*FILES, Path(TARGETS_FILE).name}
    config = subprocess.run(
        ["promtool", "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert config.returncode == 0, config.stdout + config.stderr
    assert "1 rule files found" in config.stdout + config.stderr
    rules = subprocess.run(
        ["promtool", "check", "rules", str(tmp_path / "sfumesh.rules.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert rules.returncode == 0, rules.stdout + rules.stderr


def test_promtool_would_catch_a_broken_rule(tmp_path: Path) -> None:
    """The check above can fail: the same rules with one expression broken do not pass."""
    broken = shipped_file("sfumesh.rules.yml").replace(
        "sum(sfumesh_media_sessions)", "sum(sfumesh_media_sessions"
    )
    assert broken != shipped_file("sfumesh.rules.yml")
    (tmp_path / "rules.yml").write_text(broken)
    result = subprocess.run(
        ["promtool", "check", "rules", str(tmp_path / "rules.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0


#: The part of Grafana's dashboard model (schemaVersion 39) this dashboard relies on: what
#: Grafana needs to import it and draw each panel from Prometheus.
DASHBOARD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["title", "uid", "schemaVersion", "panels", "templating", "time"],
    "properties": {
        "uid": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"},
        "title": {"type": "string", "minLength": 1},
        "schemaVersion": {"type": "integer", "minimum": 36},
        "time": {
            "type": "object",
            "required": ["from", "to"],
            "properties": {"from": {"type": "string"}, "to": {"type": "string"}},
        },
        "templating": {
            "type": "object",
            "required": ["list"],
            "properties": {
                "list": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "type"],
                        "properties": {
                            "name": {"type": "string"},
                            "type": {"enum": ["datasource", "query", "custom", "constant"]},
                        },
                    },
                }
            },
        },
        "panels": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["id", "type", "title", "gridPos", "targets", "datasource"],
                "properties": {
                    "id": {"type": "integer", "minimum": 1},
                    "type": {"enum": ["timeseries", "stat", "gauge", "table", "bargauge"]},
                    "title": {"type": "string", "minLength": 1},
                    "gridPos": {
                        "type": "object",
                        "required": ["h", "w", "x", "y"],
                        "properties": {
                            "h": {"type": "integer", "minimum": 1},
                            "w": {"type": "integer", "minimum": 1, "maximum": 24},
                            "x": {"type": "integer", "minimum": 0, "maximum": 23},
                            "y": {"type": "integer", "minimum": 0},
                        },
                    },
                    "datasource": {
                        "type": "object",
                        "required": ["type", "uid"],
                        "properties": {"type": {"const": "prometheus"}},
                    },
                    "targets": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["refId", "expr"],
                            "properties": {
                                "refId": {"type": "string", "pattern": "^[A-Z]$"},
                                "expr": {"type": "string", "minLength": 1},
                                "legendFormat": {"type": "string"},
                            },
                        },
                    },
                },
            },
        },
    },
}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(shipped_file("grafana-dashboard.json"))
    return loaded


def test_the_dashboard_loads_and_fits_grafanas_model() -> None:
    board = dashboard()
    jsonschema.validate(board, DASHBOARD_SCHEMA)
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "node"} <= variables
    titles = " ".join(p["title"].lower() for p in panels)
    for subject in ("rooms", "sessions", "forwarded", "relayed", "loss", "rtt", "joins", "errors"):
        assert subject in titles, subject
    # Per node and per relay: the series are split by those labels.
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    assert any("by (node, peer" in e for e in exprs) and any("by (node)" in e for e in exprs)


def test_the_schema_check_can_fail() -> None:
    board = dashboard()
    del board["panels"][0]["targets"][0]["expr"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(board, DASHBOARD_SCHEMA)

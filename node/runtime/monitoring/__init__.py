"""Prometheus and Grafana for a mesh whose nodes come and go (issue 18 item 4).

Prometheus finds the nodes through `file_sd`: `sfumesh cluster targets` writes one target
group per Serf member (alive or failed: a failed node stays a target, so `up == 0` raises
the alert, until Serf reaps it), labelled with its node name and region, from the member's
tags (its `metrics` listener, else its public URL). The file is replaced atomically, so
Prometheus never reads half of it, and only when it changes. The Prometheus configuration,
its recording and alert rules and a Grafana dashboard ship here as package data;
`sfumesh cluster monitoring-files` writes them out.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mesh.membership import NodeMember

#: the files shipped here, as `monitoring-files` writes them
FILES = ("prometheus.yml", "sfumesh.rules.yml", "grafana-dashboard.json")
#: where prometheus.yml looks for the targets (relative to its own directory)
TARGETS_FILE = "targets/sfumesh.json"
#: members that are (or may again be) nodes to scrape; "left" ones went away on purpose
SCRAPED_STATUSES = ("alive", "failed")


def scrape_target(member: NodeMember) -> dict[str, Any] | None:
    """One file_sd target group for a member, or None when its tags say nowhere to scrape."""
    labels = {"node": member.name, "region": member.region or "unknown"}
    if member.metrics:
        return {"targets": [member.metrics], "labels": {**labels, "__scheme__": "http"}}
    if not member.http:
        return None
    url = urlsplit(member.http)
    if not url.netloc:
        return None
    path = url.path.rstrip("/") + "/metrics"
    return {
        "targets": [url.netloc],
        "labels": {**labels, "__scheme__": url.scheme, "__metrics_path__": path},
    }


def file_sd(members: Iterable[NodeMember]) -> list[dict[str, Any]]:
    """The file_sd document for these members, in name order (stable: rewritten only when
    something changed)."""
    groups = []
    for member in sorted(members, key=lambda m: m.name):
        if member.status not in SCRAPED_STATUSES:
            continue
        group = scrape_target(member)
        if group is not None:
            groups.append(group)
    return groups


def write_atomically(path: Path, text: str, mode: int = 0o644) -> bool:
    """Replace `path` by `text` in one rename (a reader sees the old file or the new one),
    unless it already holds exactly that; whether it was written. World-readable by default:
    Prometheus runs as a user of its own, and these files hold no secret."""
    try:
        if path.read_text() == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def write_targets(path: Path, members: Iterable[NodeMember]) -> tuple[bool, int]:
    """(written, number of targets)."""
    groups = file_sd(members)
    return write_atomically(path, json.dumps(groups, indent=2) + "\n"), len(groups)


def shipped_file(name: str) -> str:
    if name not in FILES:
        raise KeyError(name)
    return (resources.files(__package__) / name).read_text()


def write_monitoring_files(directory: Path) -> list[Path]:
    """The Prometheus configuration and rules and the Grafana dashboard, into `directory`
    (with an empty targets file where prometheus.yml looks, unless one is there)."""
    written = []
    for name in FILES:
        path = directory / name
        write_atomically(path, shipped_file(name))
        written.append(path)
    targets = directory / TARGETS_FILE
    if not targets.exists():
        write_atomically(targets, "[]\n")
        written.append(targets)
    return written

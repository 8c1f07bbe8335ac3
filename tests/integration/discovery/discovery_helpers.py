"""Helpers for the discovery integration tests: standalone discovery nodes in lab racks.

Each rack runs ``python -m meshcloud.discovery --simulate-formation`` as its
"daemon" (the lab's ``daemon_argv``), which prints one JSON event per line
(``admitted``, ``decision``, ``formed``) into the rack's daemon.log, mixed
with its JSON log lines.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

from meshcloud.lab.lab import Lab

NODE_ARGV = [
    sys.executable, "-m", "meshcloud.discovery", "--config", "{config}", "--simulate-formation",
]  # fmt: skip
API_PORT = 8440


def log_path(lab: Lab, rack: str, service: str = "daemon") -> Path:
    return lab.log_dir(rack) / f"{service}.log"


def events(lab: Lab, rack: str, service: str = "daemon") -> list[dict[str, Any]]:
    """The JSON events a node printed (log lines, which have no "event" key, are skipped)."""
    path = log_path(lab, rack, service)
    out = []
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and "event" in doc:
            out.append(doc)
    return out


def log_text(lab: Lab, rack: str, service: str = "daemon") -> str:
    path = log_path(lab, rack, service)
    return path.read_text(errors="replace") if path.exists() else ""


def admitted(lab: Lab, rack: str, service: str = "daemon") -> set[str]:
    return {e["peer"] for e in events(lab, rack, service) if e["event"] in ("admitted", "updated")}


def formed(lab: Lab, rack: str, service: str = "daemon") -> dict[str, Any] | None:
    """The rack's first ``formed`` event (how, cluster_uuid), or None."""
    return next((e for e in events(lab, rack, service) if e["event"] == "formed"), None)


def edit_config(lab: Lab, rack: str, dest: Path | None = None, **cluster: Any) -> Path:
    """Change keys under ``cluster:`` in the rack's config (in place, or written to ``dest``)."""
    source = lab.config_path(rack)
    data = yaml.safe_load(source.read_text())
    data["cluster"].update(cluster)
    target = dest or source
    target.write_text(yaml.safe_dump(data, sort_keys=False))
    return target


def tails(lab: Lab, racks: list[str], services: tuple[str, ...] = ("daemon",)) -> str:
    """The end of each rack's logs, for assertion messages."""
    parts = []
    for rack in racks:
        for service in services:
            parts.append(f"--- {rack}/{service}\n{log_text(lab, rack, service)[-2500:]}")
    return "\n".join(parts)

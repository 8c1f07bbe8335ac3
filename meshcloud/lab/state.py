"""The lab's persisted state: ``<root>/<lab>/state.json``, written atomically under a lock.

Each CLI call is a separate process, so everything the lab needs to find its
namespaces and processes again lives in this file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from meshcloud.core.errors import MeshcloudError, NotFound

STATE_VERSION = 1
DEFAULT_ROOT = Path("/var/lib/meshcloud-lab")


class LabStateError(MeshcloudError):
    """The lab's state file is missing or unreadable."""


def default_root() -> Path:
    """Where labs live: ``$MESHCLOUD_LAB_ROOT`` or /var/lib/meshcloud-lab."""
    return Path(os.environ.get("MESHCLOUD_LAB_ROOT") or DEFAULT_ROOT)


@dataclass
class ProcessRecord:
    """A process the lab started: pid plus kernel start time (guards against pid reuse)."""

    pid: int
    starttime: int
    argv: list[str]
    log: str


@dataclass
class RackState:
    name: str
    index: int
    site: str
    ip: str
    netns: str
    port: str
    power: str = "on"  # "on" or "off" (killed)
    link: str = ""  # canonical LinkSpec text, "" = plain
    services: dict[str, list[str]] = field(default_factory=dict)  # wanted: name -> argv
    processes: dict[str, ProcessRecord] = field(default_factory=dict)


@dataclass
class LabState:
    name: str
    root: str
    bridge_netns: str
    shaper_backend: str
    daemon_argv: list[str]
    bootstrap_expect: int
    default_link: str = ""
    owner_pid: int | None = None
    owner_starttime: int | None = None  # with owner_pid: survives pid reuse
    partition: list[list[str]] | None = None
    racks: dict[str, RackState] = field(default_factory=dict)
    version: int = STATE_VERSION
    nut: bool = False  # every rack has a UPS: NUT's dummy-ups and upsd (docs/power.md)
    tls: bool = False  # racks serve and call HTTPS with the lab's CA (docs/lab.md)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabState:
        if data.get("version") != STATE_VERSION:
            raise LabStateError(
                f"lab state version {data.get('version')!r} is not {STATE_VERSION}:"
                " run `meshcloud lab down` and start the lab again"
            )
        racks = {}
        for name, raw in data.get("racks", {}).items():
            procs = {k: ProcessRecord(**v) for k, v in raw.pop("processes", {}).items()}
            racks[name] = RackState(**raw, processes=procs)
        data = {**data, "racks": racks}
        return cls(**data)


def lab_dir(root: Path, name: str) -> Path:
    return root / name


def state_path(root: Path, name: str) -> Path:
    return lab_dir(root, name) / "state.json"


def load_state(root: Path, name: str) -> LabState | None:
    """The lab's state, or None when it has none."""
    path = state_path(root, name)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return LabState.from_dict(json.loads(text))
    except (ValueError, TypeError, KeyError) as exc:
        raise LabStateError(
            f"{path} is damaged ({exc}): run `meshcloud lab down --name {name}` to clean up"
        ) from exc


def save_state(state: LabState) -> None:
    """Write the state atomically (temp file, fsync, rename)."""
    path = state_path(Path(state.root), state.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(state.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def list_labs(root: Path) -> list[str]:
    """Names of labs with a state file under ``root``."""
    if not root.is_dir():
        return []
    return sorted(p.parent.name for p in root.glob("*/state.json"))


class LabNotUp(NotFound):
    """The lab has no directory: it is not up."""


@contextlib.contextmanager
def locked(root: Path, name: str, *, create: bool = False) -> Iterator[None]:
    """Hold the lab's lock: one operation at a time per lab, across processes.

    Raises LabNotUp when the lab's directory does not exist, unless ``create``.
    """
    directory = lab_dir(root, name)
    if create:
        directory.mkdir(parents=True, exist_ok=True)
    elif not directory.is_dir():
        raise LabNotUp(
            f"lab {name} is not up (no {directory}): start it with `meshcloud lab up --name {name}`"
        )
    fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)

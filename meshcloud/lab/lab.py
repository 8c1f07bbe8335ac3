"""The lab: several racks on one machine, each in its own network namespace.

:class:`Lab` is the one API behind ``meshcloud lab ...`` and the pytest
fixture. Every operation loads the persisted state, acts, and saves it, so
each CLI call can be a separate process. See docs/lab.md.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from meshcloud.config import parse_config
from meshcloud.core.errors import Conflict, MeshcloudError, NotFound
from meshcloud.lab import netns, network, plan, procs
from meshcloud.lab.linkspec import LinkSpec, parse_link_spec, shaper_argv
from meshcloud.lab.state import (
    LabState,
    LabStateError,
    RackState,
    default_root,
    lab_dir,
    list_labs,
    load_state,
    locked,
    save_state,
)
from meshcloud.lab.wait import wait_for

SERVICE_ORDER = ("sshd", "fencer", "daemon")


class LabError(MeshcloudError):
    """A lab operation failed; the message says what to do."""


def default_daemon_argv() -> list[str]:
    """``<venv>/bin/meshcloud daemon --config {config}``."""
    exe = Path(sys.executable).with_name("meshcloud")
    return [str(exe) if exe.exists() else "meshcloud", "daemon", "--config", "{config}"]


def standin_daemon_argv() -> list[str]:
    """The stand-in daemon (meshcloud.lab.standin): for testing the lab itself."""
    return [sys.executable, "-m", "meshcloud.lab.standin", "--config", "{config}"]


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (it creates network namespaces): run it as root")


@dataclass(frozen=True)
class RackInfo:
    """Where a rack lives: its namespace, address, and files."""

    name: str
    index: int
    site: str
    ip: str
    netns: str
    power: str
    link: str
    rack_dir: Path
    state_dir: Path
    config_path: Path
    log_dir: Path
    ssh_dir: Path  # sshd_config, host key, authorized_keys (append keys here)


@dataclass(frozen=True)
class ProcessStatus:
    name: str
    pid: int
    alive: bool
    frozen: bool


@dataclass(frozen=True)
class RackStatus:
    name: str
    site: str
    ip: str
    netns: str
    power: str
    link: str
    processes: tuple[ProcessStatus, ...]


@dataclass(frozen=True)
class LabStatus:
    name: str
    root: Path
    up: bool
    bridge_netns: str
    observer_ip: str
    shaper_backend: str
    racks: tuple[RackStatus, ...]
    partition: tuple[tuple[str, ...], ...] | None
    leftovers: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "root": str(self.root),
            "up": self.up,
            "bridge_netns": self.bridge_netns,
            "observer_ip": self.observer_ip,
            "shaper_backend": self.shaper_backend,
            "partition": [list(g) for g in self.partition] if self.partition else None,
            "leftovers": list(self.leftovers),
            "racks": [
                {
                    "name": r.name,
                    "site": r.site,
                    "ip": r.ip,
                    "netns": r.netns,
                    "power": r.power,
                    "link": r.link,
                    "processes": {
                        p.name: {"pid": p.pid, "alive": p.alive, "frozen": p.frozen}
                        for p in r.processes
                    },
                }
                for r in self.racks
            ],
        }


def write_ups_dev(path: Path, text: str, now: Callable[[], float] = time.time) -> None:
    """Replace the dummy-ups file ``path`` with ``text`` so that the driver notices.

    NUT's dummy-ups (2.8, a ``.dev`` file: mode dummy-once) re-reads the file
    only when its mtime changed *in whole seconds* (it compares
    ``st_mtim.tv_sec``): a second write within the same second as the one it
    last read is never seen. So the new file's mtime is the current second,
    or one second past the previous file's when that is not later (a burst of
    writes runs a few seconds ahead of the clock, which is harmless).
    """
    try:
        previous_s = path.stat().st_mtime_ns // 1_000_000_000
    except FileNotFoundError:
        previous_s = None
    mtime_s = int(now())
    if previous_s is not None and mtime_s <= previous_s:
        mtime_s = previous_s + 1
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.utime(tmp, ns=(mtime_s * 1_000_000_000, mtime_s * 1_000_000_000))
    os.replace(tmp, path)


class Lab:
    """One lab, by name; its state lives in ``<root>/<name>/``.

    Racks are named r1..rN; rack rN has address 10.77.0.N and namespace
    ``mcl-<name>-rN``. Methods raise InvalidInput for bad names and specs,
    Conflict when the rack is in the wrong state, LabError otherwise.
    """

    def __init__(self, name: str = "lab", root: Path | str | None = None) -> None:
        self.name = plan.check_lab_name(name)
        self.root = Path(root) if root is not None else default_root()
        self.dir = lab_dir(self.root, self.name)
        self.bridge_netns = plan.bridge_netns(self.name)
        self.observer_ip = plan.OBSERVER_IP

    # -- paths ---------------------------------------------------------------

    @property
    def secret_file(self) -> Path:
        """The cluster secret every rack's daemon reads (0600, 64 hex characters)."""
        return self.dir / "cluster.secret"

    @property
    def ssh_key(self) -> Path:
        """The lab's SSH client key, authorised on every rack's sshd as root."""
        return self.dir / "ssh" / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        """Every rack's host key by lab address."""
        return self.dir / "ssh" / "known_hosts"

    @property
    def replication_key(self) -> Path:
        """The lab cluster's replication key (the kit's ``ssh/replication_ed25519``).

        Every rack's daemon ships with it and installs its public half, with a
        forced command, in ``<state_dir>/ssh/authorized_keys`` (docs/failover.md).
        """
        return self.dir / "ssh" / "replication_ed25519"

    @property
    def tls_dir(self) -> Path:
        """The lab's CA (``ca.crt``, ``ca.key``) when it runs with TLS."""
        return self.dir / "tls"

    @property
    def ca_file(self) -> Path:
        """The lab CA's certificate: what clients trust when the lab runs with TLS."""
        return self.tls_dir / "ca.crt"

    @property
    def tls(self) -> bool:
        """True when the racks serve HTTPS (``up(tls=True)``); False when the lab is down."""
        state = load_state(self.root, self.name)
        return state is not None and state.tls

    def nut_dir(self, rack: str) -> Path:
        """The rack's NUT config (ups.conf, upsd.conf, ups.dev) when the lab has UPSes."""
        return self.rack_dir(rack) / "nut"

    def set_ups(
        self, rack: str, status: str, charge_pct: float = 100.0, runtime_s: float = 3600.0
    ) -> None:
        """Change what ``rack``'s UPS reports (``"OB DISCHRG"``, ``"OB LB"``, ``"OL CHRG"``).

        Rewrites the dummy-ups driver's ``ups.dev`` atomically
        (:func:`write_ups_dev`); the driver re-reads it when it changes
        (within its poll interval, 2 s).
        """
        plan.rack_index(rack)
        text = plan.ups_dev(status, charge_pct, runtime_s)
        with locked(self.root, self.name):  # one writer at a time: mtimes only go up
            self._rack(self._state(), rack)  # the lab and the rack exist
            path = self.nut_dir(rack) / "ups.dev"
            if not path.exists():
                raise LabError(f"rack {rack} has no UPS: start the lab with nut=True (--nut)")
            write_ups_dev(path, text)

    def fencer_socket(self, rack: str) -> Path:
        """The rack's fencing helper socket (the daemon arms it with its lease expiry)."""
        return self.rack_dir(rack) / "run" / "fencer.sock"

    def rack_dir(self, rack: str) -> Path:
        plan.rack_index(rack)
        return self.dir / "racks" / rack

    def config_path(self, rack: str) -> Path:
        """The rack daemon's config file (daemon.yaml)."""
        return self.rack_dir(rack) / "daemon.yaml"

    def state_dir(self, rack: str) -> Path:
        """The rack daemon's state_dir (journal, volumes, libvirt root)."""
        return self.rack_dir(rack) / "state"

    def log_dir(self, rack: str) -> Path:
        return self.rack_dir(rack) / "logs"

    # -- state ---------------------------------------------------------------

    def exists(self) -> bool:
        """True when the lab is up (has a state file)."""
        return load_state(self.root, self.name) is not None

    def _state(self) -> LabState:
        state = load_state(self.root, self.name)
        if state is None:
            raise NotFound(
                f"lab {self.name} is not up (no {self.dir}/state.json):"
                f" start it with `meshcloud lab up --name {self.name}`"
            )
        return state

    def _rack(self, state: LabState, rack: str) -> RackState:
        plan.rack_index(rack)
        if rack not in state.racks:
            raise NotFound(f"lab {self.name} has no rack {rack} (racks: {', '.join(state.racks)})")
        return state.racks[rack]

    def racks(self) -> list[str]:
        """Names of the lab's racks, in order."""
        return list(self._state().racks)

    def rack(self, rack: str) -> RackInfo:
        """Where ``rack`` lives."""
        r = self._rack(self._state(), rack)
        return RackInfo(
            name=r.name,
            index=r.index,
            site=r.site,
            ip=r.ip,
            netns=r.netns,
            power=r.power,
            link=r.link,
            rack_dir=self.rack_dir(rack),
            state_dir=self.state_dir(rack),
            config_path=self.config_path(rack),
            log_dir=self.log_dir(rack),
            ssh_dir=self.rack_dir(rack) / "ssh",
        )

    def pid(self, rack: str, service: str = "daemon") -> int | None:
        """The pid of ``service`` (daemon, sshd, shaper, ...) on ``rack`` if it runs."""
        record = self._rack(self._state(), rack).processes.get(service)
        return record.pid if record is not None and procs.is_alive(record) else None

    # -- up ------------------------------------------------------------------

    def up(
        self,
        racks: int = 3,
        sites: str | Sequence[str] | None = None,
        link: str | LinkSpec | None = None,
        *,
        daemon_argv: Sequence[str] | None = None,
        start_daemons: bool | Iterable[str] = True,
        bootstrap_expect: int | None = None,
        wait: bool = True,
        timeout: float = 60.0,
        owner_pid: int | None = None,
        nut: bool = False,
        tls: bool = False,
    ) -> None:
        """Create the lab: bridge, ``racks`` racks with sshd and (by default) their daemons.

        ``tls``: the lab makes a CA and a certificate per rack (as ``meshcloud kit
        new`` does) and sets ``console.tls_*``: racks serve HTTPS and call each
        other over it; :class:`~meshcloud.lab.api.LabApi` trusts :attr:`ca_file`.

        ``nut``: every rack also gets a UPS (NUT's dummy-ups driver and upsd in
        its namespace) and its daemon reads it (``power.source: nut``); change
        a rack's UPS state with :meth:`set_ups`.

        ``daemon_argv`` is a template (placeholders {config} {rack} {ip}
        {state_dir} {rack_dir} {lab}); default ``meshcloud daemon --config
        {config}``. ``start_daemons`` is True, False, or the racks whose
        daemon starts now (start the others later with :meth:`start_daemon`).
        ``bootstrap_expect`` defaults to the number of daemons started now (every rack
        when none is started now).
        With ``wait``, returns once every started daemon accepts TCP on its
        API port. On a failure while building, everything is torn down again.
        """
        require_root()
        network.check_tools()
        if nut:
            _check_nut()
        if not isinstance(racks, int) or not 1 <= racks <= plan.MAX_RACKS:
            raise LabError(f"--racks must be 1..{plan.MAX_RACKS}, not {racks!r}")
        site_list = plan.parse_sites(sites, racks)
        spec = parse_link_spec(link)
        template = list(daemon_argv) if daemon_argv else default_daemon_argv()
        plan.expand_argv(template, dict.fromkeys(plan.PLACEHOLDERS, "x"))
        names = [plan.rack_name(i) for i in range(1, racks + 1)]
        if start_daemons is True:
            starting = list(names)
        elif start_daemons is False:
            starting = []
        else:
            starting = list(start_daemons)
            for rack in starting:
                plan.rack_index(rack)
            unknown = sorted(set(starting) - set(names))
            if unknown:
                raise LabError(f"cannot start daemons on {unknown}: the lab has {names}")
        # default: the daemons started now; with none started, every rack (they start later)
        expect = bootstrap_expect if bootstrap_expect is not None else len(starting) or racks
        if not 1 <= expect <= 64:
            raise LabError(f"bootstrap_expect must be 1..64, not {expect}")
        with locked(self.root, self.name, create=True):
            if load_state(self.root, self.name) is not None:
                raise Conflict(
                    f"lab {self.name} is already up: `meshcloud lab down --name {self.name}` first"
                )
            self._remove_leftovers()
            state = LabState(
                name=self.name,
                root=str(self.root),
                bridge_netns=self.bridge_netns,
                shaper_backend="nfqueue",
                daemon_argv=template,
                bootstrap_expect=expect,
                default_link=str(spec),
                owner_pid=owner_pid,
                owner_starttime=_starttime(owner_pid),
                nut=nut,
                tls=tls,
            )
            try:
                self._write_lab_files(tls)
                save_state(state)
                network.create_bridge_netns(self.bridge_netns)
                state.shaper_backend = network.detect_shaper_backend(self.bridge_netns)
                for index, site in enumerate(site_list, start=1):
                    self._add_rack(state, index, site, spec)
                    save_state(state)
                self._write_known_hosts(state)
                for rack in starting:
                    self._start_daemon(state, state.racks[rack])
                save_state(state)
            except BaseException:
                self._teardown(state)
                raise
        if wait:
            self.wait_ready(starting, timeout=timeout)

    def add_rack(
        self, site: str = plan.DEFAULT_SITE, *, start_daemon: bool = True, wait: bool = True
    ) -> str:
        """Add one more rack (a late arrival) to a running lab; returns its name."""
        require_root()
        plan.parse_sites(site, 1)
        with locked(self.root, self.name):
            state = self._state()
            index = max((r.index for r in state.racks.values()), default=0) + 1
            name = plan.rack_name(index)
            self._add_rack(state, index, site, parse_link_spec(state.default_link))
            self._write_known_hosts(state)
            if start_daemon:
                self._start_daemon(state, state.racks[name])
            save_state(state)
        if start_daemon and wait:
            self.wait_ready([name])
        return name

    def _write_lab_files(self, tls: bool) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if tls:
            from meshcloud.lab.pki import write_ca

            write_ca(self.tls_dir, self.name)
        fd = os.open(self.secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        self.ssh_key.parent.mkdir(parents=True, exist_ok=True)
        _keygen(self.ssh_key, f"meshcloud-lab-{self.name}")
        _keygen(self.replication_key, f"meshcloud-replication-{self.name}")

    def _add_rack(self, state: LabState, index: int, site: str, spec: LinkSpec) -> None:
        name = plan.rack_name(index)
        rack = RackState(
            name=name,
            index=index,
            site=site,
            ip=plan.rack_ip(index),
            netns=plan.rack_netns(self.name, name),
            port=plan.rack_port(name),
            link=str(spec),
        )
        state.racks[name] = rack
        rack_dir = self.rack_dir(name)
        for sub in ("ssh", "logs", "run", "state"):
            (rack_dir / sub).mkdir(parents=True, exist_ok=True)
        ssh_dir = rack_dir / "ssh"
        host_key = ssh_dir / "ssh_host_ed25519_key"
        if not host_key.exists():
            _keygen(host_key, f"{self.name}-{name}")
        shutil.copyfile(self.ssh_key.with_suffix(".pub"), ssh_dir / "authorized_keys")
        (ssh_dir / "sshd_config").write_text(
            plan.sshd_config(rack.ip, ssh_dir, rack_dir / "run" / "sshd.pid", self.state_dir(name))
        )
        self._write_daemon_config(state, rack)
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        rack.services["sshd"] = [sshd, "-D", "-e", "-f", str(ssh_dir / "sshd_config")]
        # The fencing helper: kills the rack's QEMU when its daemon stops re-arming it.
        rack.services["fencer"] = [sys.executable, "-m", "meshcloud.agent.fencer",
                                   "--socket", str(self.fencer_socket(name))]  # fmt: skip
        if state.nut:
            nut_dir = self.nut_dir(name)
            nut_dir.mkdir(parents=True, exist_ok=True)
            for file_name, text in plan.nut_files().items():
                (nut_dir / file_name).write_text(text)
            (nut_dir / "upsd.users").chmod(0o600)
            rack.services.update(plan.nut_services(nut_dir, rack_dir / "run"))
        self._power_on(state, rack)

    def _write_daemon_config(self, state: LabState, rack: RackState) -> None:
        data = plan.daemon_config(
            rack=rack.name,
            site=rack.site,
            ip=rack.ip,
            secret_file=self.secret_file,
            bootstrap_expect=state.bootstrap_expect,
            state_dir=self.state_dir(rack.name),
            fencer_socket=self.fencer_socket(rack.name),
            replication_key=self.replication_key if self.replication_key.exists() else None,
            known_hosts=self.known_hosts,
            replication_user=_replication_login(),
            power=plan.nut_power_config() if state.nut else None,
            tls=self._rack_tls(rack) if state.tls else None,
        )
        parse_config(data, f"lab config for {rack.name}")  # the schema is the contract
        self.config_path(rack.name).write_text(
            "# written by meshcloud lab up; see docs/lab.md\n"
            + yaml.safe_dump(data, sort_keys=False)
        )

    def _rack_tls(self, rack: RackState) -> tuple[Path, Path, Path]:
        """Sign ``rack``'s certificate for its lab address; (cert, key, CA) paths."""
        from meshcloud.lab.pki import write_rack_cert

        cert, key = write_rack_cert(
            self.tls_dir, self.rack_dir(rack.name) / "tls", self.name, rack.name, rack.site, rack.ip
        )
        return cert, key, self.ca_file

    def _write_known_hosts(self, state: LabState) -> None:
        lines = []
        for rack in state.racks.values():
            pub = (self.rack_dir(rack.name) / "ssh" / "ssh_host_ed25519_key.pub").read_text()
            key_type, key = pub.split()[:2]
            lines.append(f"{rack.ip} {key_type} {key}\n")
        self.known_hosts.write_text("".join(lines))

    # -- power ---------------------------------------------------------------

    def _power_on(self, state: LabState, rack: RackState) -> None:
        """Network, shaping, then every wanted service (sshd first)."""
        network.create_rack_netns(
            self.bridge_netns, rack.netns, rack.port, rack.ip, plan.rack_mac(rack.index)
        )
        rack.power = "on"
        self._apply_link(state, rack, parse_link_spec(rack.link))
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        for service in _ordered(rack.services):
            self._spawn(state, rack, service)

    def _spawn(self, state: LabState, rack: RackState, service: str) -> None:
        record = procs.spawn(
            rack.netns,
            rack.services[service],
            self.log_dir(rack.name) / f"{service}.log",
            cwd=self.rack_dir(rack.name),
            env={"MESHCLOUD_LAB": self.name, "MESHCLOUD_RACK": rack.name},
        )
        rack.processes[service] = record

    def _power_off(self, state: LabState, rack: RackState) -> None:
        """Kill everything in the rack (after its link was cut) and remove its namespace."""
        procs.kill_hard(rack.processes.pop("shaper", None))
        procs.kill_netns_processes(rack.netns)
        for record in rack.processes.values():
            procs.kill_hard(record)  # normally gone already, with the namespace's processes
        rack.processes.clear()
        network.destroy_rack_netns(self.bridge_netns, rack.netns, rack.port)
        rack.power = "off"

    def kill(self, rack: str) -> float:
        """Power-cut ``rack``: cut its link first, then kill every process in it.

        Nothing the rack says while dying (TCP FIN/RST, mDNS goodbyes) reaches
        anyone. Returns the ``time.monotonic()`` of the cut.
        """
        require_root()
        with locked(self.root, self.name):
            state = self._state()
            r = self._rack(state, rack)
            if r.power != "on":
                raise Conflict(f"rack {rack} is already off: `meshcloud lab restart {rack}`")
            network.cut_link(self.bridge_netns, r.port)
            cut_at = time.monotonic()
            try:
                self._power_off(state, r)
            finally:
                save_state(state)
        return cut_at

    def restart(self, rack: str, *, wait: bool = True, timeout: float = 60.0) -> None:
        """Power comes back: fresh namespace, same state dir, sshd and daemon started again."""
        require_root()
        with locked(self.root, self.name):
            state = self._state()
            r = self._rack(state, rack)
            if r.power == "on":
                raise Conflict(f"rack {rack} is running: `meshcloud lab kill {rack}` first")
            try:
                self._power_on(state, r)
            finally:
                save_state(state)
        if wait and "daemon" in r.services:
            self.wait_ready([rack], timeout=timeout)

    # -- services ------------------------------------------------------------

    def _start_daemon(self, state: LabState, rack: RackState) -> None:
        values = {
            "config": str(self.config_path(rack.name)),
            "rack": rack.name,
            "ip": rack.ip,
            "state_dir": str(self.state_dir(rack.name)),
            "rack_dir": str(self.rack_dir(rack.name)),
            "lab": self.name,
        }
        rack.services["daemon"] = plan.expand_argv(state.daemon_argv, values)
        if rack.power == "on":
            self._spawn(state, rack, "daemon")

    def start_daemon(self, rack: str, *, wait: bool = True, timeout: float = 60.0) -> None:
        """Start the rack's daemon (for a rack brought up without one, or after stop_daemon)."""
        require_root()
        with locked(self.root, self.name):
            state = self._state()
            r = self._rack(state, rack)
            if procs.is_alive(r.processes.get("daemon")):
                raise Conflict(
                    f"the daemon of {rack} already runs (pid {r.processes['daemon'].pid})"
                )
            if r.power != "on":
                raise Conflict(f"rack {rack} is off: `meshcloud lab restart {rack}`")
            self._start_daemon(state, r)
            save_state(state)
        if wait:
            self.wait_ready([rack], timeout=timeout)

    def stop_daemon(self, rack: str, timeout: float = 10.0) -> None:
        """Stop the rack's daemon cleanly (SIGTERM, then SIGKILL after ``timeout``)."""
        self.stop_service(rack, "daemon", timeout=timeout)

    def start_service(self, rack: str, service: str, argv: Sequence[str]) -> int:
        """Run an extra per-rack process (a watchdog, a probe) that restarts with the rack.

        ``argv`` is expanded like the daemon command. Returns its pid.
        """
        require_root()
        plan.check_lab_name(service)
        if service in ("sshd", "fencer", "daemon", "shaper"):
            raise Conflict(f"service name {service} is reserved")
        with locked(self.root, self.name):
            state = self._state()
            r = self._rack(state, rack)
            values = {"config": str(self.config_path(rack)), "rack": rack, "ip": r.ip,
                      "state_dir": str(self.state_dir(rack)),
                      "rack_dir": str(self.rack_dir(rack)), "lab": self.name}  # fmt: skip
            r.services[service] = plan.expand_argv(list(argv), values)
            if r.power == "on":
                procs.stop(r.processes.pop(service, None))
                self._spawn(state, r, service)
            save_state(state)
            return r.processes[service].pid if service in r.processes else 0

    def stop_service(self, rack: str, service: str, timeout: float = 10.0) -> None:
        """Stop a service and forget it (it does not come back on restart)."""
        require_root()
        with locked(self.root, self.name):
            state = self._state()
            r = self._rack(state, rack)
            r.services.pop(service, None)
            procs.stop(r.processes.pop(service, None), timeout=timeout)
            save_state(state)

    def freeze(self, rack: str, service: str = "daemon") -> int:
        """SIGSTOP the rack's daemon only (a hung daemon); QEMU and sshd keep running."""
        return self._signal_service(rack, service, signal.SIGSTOP, want_stopped=True)

    def thaw(self, rack: str, service: str = "daemon") -> int:
        """SIGCONT the rack's daemon."""
        return self._signal_service(rack, service, signal.SIGCONT, want_stopped=False)

    def _signal_service(self, rack: str, service: str, sig: int, want_stopped: bool) -> int:
        require_root()
        with locked(self.root, self.name):
            state = self._state()
            r = self._rack(state, rack)
            record = r.processes.get(service)
            if r.power != "on" or not procs.is_alive(record):
                raise Conflict(f"the {service} of {rack} is not running")
            assert record is not None
            procs.send(record, sig)
            wait_for(
                lambda: procs.is_stopped(record) == want_stopped,
                5.0,
                f"{service} of {rack} to {'stop' if want_stopped else 'continue'}",
            )
            return record.pid

    def is_frozen(self, rack: str, service: str = "daemon") -> bool:
        return procs.is_stopped(self._rack(self._state(), rack).processes.get(service))

    def wait_ready(self, racks: Iterable[str] | None = None, timeout: float = 60.0) -> None:
        """Wait until each rack's daemon accepts TCP on its API port (from the observer).

        Raises LabError with the end of the daemon's log if it dies first.
        """
        state = self._state()
        names = list(racks) if racks is not None else list(state.racks)
        for name in names:
            r = self._rack(state, name)
            record = r.processes.get("daemon")
            if record is None:
                continue

            def ready(r: RackState = r, record: Any = record) -> bool:
                if not procs.is_alive(record):
                    raise LabError(
                        f"the daemon of {r.name} exited; end of {record.log}:\n"
                        f"{procs.tail(record.log)}"
                    )
                return network.tcp_open(self.bridge_netns, r.ip, plan.API_PORT)

            wait_for(ready, timeout, f"the daemon of {name} to listen on {r.ip}:{plan.API_PORT}")

    # -- network faults --------------------------------------------------------

    def partition(self, *groups: str | Iterable[str]) -> list[list[str]]:
        """Split the racks into groups that cannot reach each other; replaces any partition.

        ``partition("r1,r2", "r3,r4,r5")``; racks named in no group form one
        more group, so ``partition("r3")`` cuts r3 off. The observer reaches all.
        """
        require_root()
        with locked(self.root, self.name):
            state = self._state()
            result = plan.parse_groups(groups, list(state.racks))
            network.apply_partition(self.bridge_netns, result)
            state.partition = result
            save_state(state)
            return result

    def heal(self) -> None:
        """Remove every partition."""
        require_root()
        with locked(self.root, self.name):
            state = self._state()
            network.heal(self.bridge_netns)
            state.partition = None
            save_state(state)

    def degrade(self, rack: str, spec: str | LinkSpec | None) -> LinkSpec:
        """Shape what ``rack`` receives (``"delay=50ms loss=1% rate=20mbit"``; ``"clear"`` undoes)."""
        require_root()
        parsed = parse_link_spec(spec)
        with locked(self.root, self.name):
            state = self._state()
            r = self._rack(state, rack)
            r.link = str(parsed)
            if r.power == "on":
                self._apply_link(state, r, parsed)
            save_state(state)
        return parsed

    def _apply_link(self, state: LabState, rack: RackState, spec: LinkSpec) -> None:
        procs.kill_hard(rack.processes.pop("shaper", None))
        if not network.apply_shaping(rack.netns, spec, state.shaper_backend):
            return
        record = procs.spawn(
            self.bridge_netns,
            shaper_argv(sys.executable, rack.netns, spec),
            self.log_dir(rack.name) / "shaper.log",
        )
        rack.processes["shaper"] = record

        def bound() -> bool:
            if not procs.is_alive(record):
                raise LabError(f"the link shaper of {rack.name} exited:\n{procs.tail(record.log)}")
            return network.shaper_queue_bound(rack.netns)

        wait_for(bound, 10.0, f"the link shaper of {rack.name} to bind its queue")

    # -- running things in racks ---------------------------------------------

    def _ns(self, rack: str | None) -> str:
        if rack is None or rack == "observer":
            return self.bridge_netns
        r = self._rack(self._state(), rack)
        if r.power != "on":
            raise Conflict(f"rack {rack} is off")
        return r.netns

    def exec(
        self,
        rack: str | None,
        argv: Sequence[str],
        *,
        timeout: float = 30.0,
        check: bool = True,
        input_text: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside ``rack`` (None or "observer": the bridge namespace)."""
        if not argv:
            raise LabError("nothing to run: give a command after --")
        return netns.run(
            netns.in_netns(self._ns(rack), argv),
            check=check,
            timeout=timeout,
            input_text=input_text,
        )

    def exec_argv(self, rack: str | None, argv: Sequence[str]) -> list[str]:
        """The argv that runs ``argv`` inside ``rack`` (for callers managing the process)."""
        return netns.in_netns(self._ns(rack), argv)

    def popen(self, rack: str | None, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside ``rack`` in the background; the caller owns the process."""
        return subprocess.Popen(self.exec_argv(rack, argv), **kwargs)

    def socket(
        self, rack: str | None, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM
    ) -> socket.socket:
        """A socket living in ``rack``'s namespace (None: the observer's). Close it yourself."""
        return network.socket_in(self._ns(rack), family, kind)

    def ssh_argv(self, rack: str, *command: str) -> list[str]:
        """``ssh`` argv reaching ``rack``'s sshd as root with the lab key (run it in a rack)."""
        r = self._rack(self._state(), rack)
        return ["ssh", "-i", str(self.ssh_key), "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
                "-o", "ConnectTimeout=5", f"root@{r.ip}", *command]  # fmt: skip

    # -- status and down ---------------------------------------------------------

    def leftovers(self) -> list[str]:
        """Namespaces of this lab that its state does not account for."""
        state = load_state(self.root, self.name)
        known = set()
        if state is not None:
            known = {state.bridge_netns} | {
                r.netns for r in state.racks.values() if r.power == "on"
            }
        pattern = plan.netns_pattern(self.name)
        return [ns for ns in netns.list_netns() if pattern.match(ns) and ns not in known]

    def status(self) -> LabStatus:
        """What runs where; works on a lab that is not up (shows leftovers)."""
        try:
            state = load_state(self.root, self.name)
        except LabStateError:
            state = None
        racks = []
        if state is not None:
            for r in state.racks.values():
                processes = tuple(
                    ProcessStatus(name, rec.pid, procs.is_alive(rec), procs.is_stopped(rec))
                    for name, rec in sorted(r.processes.items(), key=lambda kv: _rank(kv[0]))
                )
                racks.append(RackStatus(r.name, r.site, r.ip, r.netns, r.power, r.link, processes))
        return LabStatus(
            name=self.name,
            root=self.root,
            up=state is not None,
            bridge_netns=self.bridge_netns,
            observer_ip=self.observer_ip,
            shaper_backend=state.shaper_backend if state else "",
            racks=tuple(racks),
            partition=tuple(tuple(g) for g in state.partition)
            if state and state.partition
            else None,
            leftovers=tuple(self.leftovers()),
        )

    def down(self, keep_logs: Path | None = None) -> None:
        """Kill everything the lab started and remove its namespaces and files.

        Also removes leftovers of a crashed lab of the same name (namespaces
        matching ``mcl-<name>-net`` / ``mcl-<name>-rN``, their processes).
        With ``keep_logs``, the racks' logs are copied there first.
        """
        require_root()
        if not self.dir.is_dir():  # nothing but possible leftovers: no lock to take
            self._teardown(LabState(self.name, str(self.root), self.bridge_netns, "", [], 1))
            return
        with locked(self.root, self.name):
            try:
                state = load_state(self.root, self.name)
            except LabStateError:
                state = None
            if state is None:
                state = LabState(self.name, str(self.root), self.bridge_netns, "", [], 1)
            self._teardown(state, keep_logs)

    def _teardown(self, state: LabState, keep_logs: Path | None = None) -> None:
        pattern = plan.netns_pattern(self.name)
        if netns.netns_exists(self.bridge_netns):
            for rack in state.racks.values():
                if netns.link_exists(rack.port, self.bridge_netns):
                    network.cut_link(self.bridge_netns, rack.port)
        for rack in state.racks.values():
            procs.kill_hard(rack.processes.pop("shaper", None))
        spaces = [ns for ns in netns.list_netns() if pattern.match(ns)]
        for ns in sorted(spaces, key=lambda n: n == self.bridge_netns):  # racks first
            procs.kill_netns_processes(ns)
            netns.delete_netns(ns)
        for rack in state.racks.values():
            for record in rack.processes.values():
                procs.kill_hard(record)
        if keep_logs is not None and (self.dir / "racks").is_dir():
            for logs in (self.dir / "racks").glob("*/logs"):
                shutil.copytree(logs, Path(keep_logs) / logs.parent.name, dirs_exist_ok=True)
        if self.dir.is_dir():
            shutil.rmtree(self.dir, ignore_errors=True)

    def _remove_leftovers(self) -> None:
        pattern = plan.netns_pattern(self.name)
        for ns in netns.list_netns():
            if pattern.match(ns):
                procs.kill_netns_processes(ns)
                netns.delete_netns(ns)


def _check_nut() -> None:
    missing = [p for p in (plan.NUT_DRIVER, plan.NUT_UPSD) if not Path(p).exists()]
    if missing:
        raise LabError(
            f"a lab with UPSes needs {', '.join(missing)}: install the Debian package nut-server"
            " (make bootstrap)"
        )


def _rank(service: str) -> tuple[int, str]:
    order = (*SERVICE_ORDER, "shaper")
    return (order.index(service) if service in order else len(order), service)


def _ordered(services: dict[str, list[str]]) -> list[str]:
    return sorted(services, key=_rank)


def _starttime(pid: int | None) -> int | None:
    stat = procs.proc_stat(pid) if pid is not None else None
    return stat[1] if stat else None


def _replication_login() -> str:
    """The login the racks' replication key uses: a uid-0 account whose shell is /bin/sh.

    sshd runs forced commands through the login shell; root's bash reads
    ~/.bashrc on every ssh session (hundreds of ms on a busy machine), so the
    lab creates ``mcrepl`` once (docs/replication.md); root if that fails.
    """
    from meshcloud.replication.testbed import ensure_login_user

    try:
        return ensure_login_user()
    except (OSError, subprocess.CalledProcessError):
        return "root"


def _keygen(path: Path, comment: str) -> None:
    for old in (path, path.with_suffix(".pub")):
        old.unlink(missing_ok=True)
    netns.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])


def labs(root: Path | str | None = None) -> list[str]:
    """Names of the labs that are up under ``root``."""
    return list_labs(Path(root) if root is not None else default_root())

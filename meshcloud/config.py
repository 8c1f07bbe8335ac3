"""The daemon's configuration: one typed schema mirroring the YAML file.

Load with :func:`load_config`; every problem is reported as a ConfigError
whose message names the key and the broken rule, for example
``timers.lease_s (3.0) must exceed 3 x timers.renew_s (1.5)``.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from meshcloud.core.errors import ConfigError
from meshcloud.core.names import name_problem

WEAK_SECRETS = frozenset(
    {"", "secret", "changeme", "change-me", "password", "meshcloud", "default"}
)
MIN_SECRET_LEN = 32
MIN_MARGIN_S = 0.5


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _name(value: str) -> str:
    problem = name_problem(value)
    if problem:
        raise ValueError(f"name {value!r} {problem}")
    return value


class CapacityConfig(_Strict):
    vcpus: int = Field(4, ge=1, le=100_000, description="vCPUs offered to appliances")
    memory_mib: int = Field(8192, ge=64, description="memory offered to appliances, MiB")
    disk_gib: int = Field(200, ge=1, description="disk offered to appliance volumes, GiB")


class RackConfig(_Strict):
    name: str = Field(description="this rack's name, unique in the cluster")
    site: str = Field("default", description="the site the rack stands at (spreads replicas)")
    capacity: CapacityConfig = CapacityConfig()

    _v_name = field_validator("name", "site")(_name)


class ClusterConfig(_Strict):
    secret: str | None = Field(None, description="cluster secret inline (prefer secret_file)")
    secret_file: Path | None = Field(None, description="file holding the cluster secret")
    bootstrap_expect: int = Field(3, ge=1, le=64, description="racks that form the cluster")
    peers: tuple[str, ...] = Field((), description="static peers host:api_port (no mDNS)")
    max_voters: int = Field(5, description="Raft voters (3 or 5); other racks follow")
    mdns: bool = Field(True, description="announce and browse over mDNS")

    @field_validator("max_voters")
    @classmethod
    def _voters(cls, v: int) -> int:
        if v not in (1, 3, 5):
            raise ValueError(f"must be 1, 3 or 5, not {v}")
        return v

    @field_validator("peers")
    @classmethod
    def _peers(cls, peers: tuple[str, ...]) -> tuple[str, ...]:
        for peer in peers:
            host, sep, port = peer.rpartition(":")
            if not sep or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"peer {peer!r} must be host:port")
            try:
                ipaddress.ip_address(host.strip("[]"))
            except ValueError:
                raise ValueError(f"peer {peer!r}: host must be an IP address") from None
        return peers


class NetworkConfig(_Strict):
    bind_address: str = Field("127.0.0.1", description="the rack's mesh address; Raft binds here")
    api_port: int = Field(8440, ge=1, le=65535, description="HTTP API and console port")
    raft_port: int = Field(7440, ge=1, le=65535, description="Raft port (encrypted)")
    appliance_bridge: str = Field("mcbr0", description="bridge appliances' taps join")

    @field_validator("bind_address")
    @classmethod
    def _addr(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v)
        except ValueError:
            raise ValueError(f"{v!r} is not an IP address") from None
        return v

    @field_validator("appliance_bridge")
    @classmethod
    def _bridge(cls, v: str) -> str:
        if not v or len(v) > 15 or not all(c.isalnum() or c in "-_." for c in v) or ".." in v:
            raise ValueError(f"{v!r} is not a valid interface name (1-15 of [A-Za-z0-9-_.])")
        return v

    @model_validator(mode="after")
    def _ports(self) -> NetworkConfig:
        if self.api_port == self.raft_port:
            raise ValueError(f"api_port and raft_port must differ (both {self.api_port})")
        return self


class HypervisorConfig(_Strict):
    uri: str = Field("", description="libvirt URI; empty = embedded driver under state_dir")
    kvm: str = Field("auto", description="auto | on | off: use KVM acceleration")
    guest_nice: int = Field(
        19,
        ge=0,
        le=19,
        description="CPU niceness of appliances (0 = as the daemon): under contention the"
        " control plane (leases, Raft, API, replication) runs first",
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        if v and not (v == "qemu:///system" or v.startswith("qemu:///embed?root=/")):
            raise ValueError("must be qemu:///system or qemu:///embed?root=/ABSOLUTE/DIR")
        return v

    @field_validator("kvm")
    @classmethod
    def _kvm(cls, v: str) -> str:
        if v not in ("auto", "on", "off"):
            raise ValueError("must be auto, on or off")
        return v


class TimersConfig(_Strict):
    """Lease and Raft timers; see docs/safety.md for the reasoning behind the defaults."""

    renew_s: float = Field(0.5, gt=0, description="how often a rack renews its lease")
    lease_s: float = Field(3.0, gt=0, description="a rack fences itself after this without renewal")
    margin_s: float = Field(
        1.5, gt=0, description="extra wait before the leader declares a rack lost"
    )
    fence_grace_s: float = Field(
        10.0, gt=0, description="paused appliances are destroyed after this"
    )
    pause_ahead_s: float = Field(
        0.5,
        ge=0,
        description="a rack pauses its appliances this long before its lease runs out",
    )
    raft_min_timeout_s: float = Field(0.6, gt=0, description="Raft election timeout, lower bound")
    raft_max_timeout_s: float = Field(1.4, gt=0, description="Raft election timeout, upper bound")
    raft_append_period_s: float = Field(0.05, gt=0, description="leader heartbeat period")
    raft_connection_timeout_s: float = Field(1.5, gt=0, description="Raft connection timeout")

    @model_validator(mode="after")
    def _together(self) -> TimersConfig:
        if self.lease_s <= 3 * self.renew_s:
            raise ValueError(
                f"lease_s ({self.lease_s}) must exceed 3 x renew_s ({self.renew_s})"
                " so that one lost renewal does not fence a healthy rack"
            )
        if self.margin_s < MIN_MARGIN_S:
            raise ValueError(
                f"margin_s ({self.margin_s}) must be at least {MIN_MARGIN_S}: it covers the"
                " fencing helper's kill latency and clock-rate drift (docs/safety.md)"
            )
        if self.pause_ahead_s >= self.lease_s - 2 * self.renew_s:
            raise ValueError(
                f"pause_ahead_s ({self.pause_ahead_s}) must be less than lease_s ({self.lease_s})"
                f" - 2 x renew_s ({self.renew_s}) so that a healthy rack never pauses"
            )
        if self.raft_max_timeout_s <= self.raft_min_timeout_s:
            raise ValueError(
                f"raft_max_timeout_s ({self.raft_max_timeout_s}) must exceed"
                f" raft_min_timeout_s ({self.raft_min_timeout_s})"
            )
        if self.raft_append_period_s * 3 > self.raft_min_timeout_s:
            raise ValueError(
                f"raft_append_period_s ({self.raft_append_period_s}) must be at most a third of"
                f" raft_min_timeout_s ({self.raft_min_timeout_s})"
            )
        if self.lease_s <= self.raft_max_timeout_s * 2:
            raise ValueError(
                f"lease_s ({self.lease_s}) must exceed 2 x raft_max_timeout_s"
                f" ({self.raft_max_timeout_s}) so that a leader election does not fence racks"
            )
        return self


class WatchdogConfig(_Strict):
    """What stops appliances if the daemon hangs: see docs/safety.md."""

    mode: str = Field("auto", description="auto | device | fencer | none")
    device: Path = Field(Path("/dev/watchdog"), description="watchdog device (softdog)")
    socket: Path | None = Field(None, description="the fencing helper's socket (mode fencer)")

    @field_validator("mode")
    @classmethod
    def _mode(cls, v: str) -> str:
        if v not in ("auto", "device", "fencer", "none"):
            raise ValueError("must be auto, device, fencer or none")
        return v

    @model_validator(mode="after")
    def _socket(self) -> WatchdogConfig:
        if self.mode == "fencer" and self.socket is None:
            raise ValueError("mode fencer needs socket (the fencing helper's unix socket)")
        return self


class ReplicationConfig(_Strict):
    interval_s: float = Field(2.0, gt=0, le=3600, description="ship a delta this often")
    max_interval_s: float = Field(
        12.0,
        ge=0,
        le=3600,
        description="on a slow link, let an appliance's interval grow up to this, so each"
        " rsync run carries more (docs/replication.md); a fast link keeps interval_s;"
        " 0 = always interval_s",
    )
    bwlimit_kbps: int = Field(0, ge=0, description="per-link rate limit in KiB/s, 0 = none")
    nice: int = Field(
        10,
        ge=0,
        le=19,
        description="CPU priority of replication's processes (rsync, ssh, qemu-img) on both"
        " sides: background work, below the API, Raft and the agent (0 = as the daemon)",
    )
    compress: bool = Field(True, description="compress deltas on the wire")
    ssh_key: Path | None = Field(
        None,
        description="the cluster's replication private key (kit: ssh/replication_ed25519);"
        " unset: nothing is shipped (docs/failover.md)",
    )
    known_hosts: Path | None = Field(
        None, description="pinned host keys of the other racks (no trust on first use)"
    )
    ssh_user: str = Field("root", description="login on the other racks for replication")
    ssh_port: int = Field(22, ge=1, le=65535, description="sshd port of the other racks")

    @field_validator("ssh_user")
    @classmethod
    def _user(cls, v: str) -> str:
        if not v or len(v) > 32 or not all(c.isalnum() or c in "-_" for c in v) or v[0] == "-":
            raise ValueError(f"{v!r} is not a valid user name")
        return v

    @model_validator(mode="after")
    def _keys(self) -> ReplicationConfig:
        if self.ssh_key is not None and self.known_hosts is None:
            raise ValueError("ssh_key needs known_hosts (the racks' pinned host keys)")
        return self


class ConsoleConfig(_Strict):
    """The web console: users, sessions and TLS (see docs/console.md)."""

    users_file: Path | None = Field(
        None, description="console users and emergency codes; default state_dir/console/users.json"
    )
    kit_users_file: Path = Field(
        Path("/etc/meshcloud/users.json"),
        description="the kit's users.json, copied to users_file when the rack has none yet",
    )
    session_idle_s: float = Field(
        8 * 3600.0, gt=60, le=7 * 86400, description="a session ends after this long unused"
    )
    tls_cert: Path | None = Field(None, description="the rack's TLS certificate (PEM)")
    tls_key: Path | None = Field(None, description="the rack certificate's private key (PEM)")
    tls_ca: Path | None = Field(
        None,
        description="the kit's CA certificate (PEM): other racks' certificates must chain to it",
    )

    @model_validator(mode="after")
    def _tls_set(self) -> ConsoleConfig:
        given = [k for k in ("tls_cert", "tls_key", "tls_ca") if getattr(self, k) is not None]
        if given and len(given) < 3:
            missing = [k for k in ("tls_cert", "tls_key", "tls_ca") if k not in given]
            raise ValueError(
                f"TLS needs tls_cert, tls_key and tls_ca together; {', '.join(given)} set but"
                f" {', '.join(missing)} not: set all three (the kit's /etc/meshcloud/tls/rack.crt,"
                " rack.key and ca.crt) or none (plain HTTP)"
            )
        return self

    @property
    def tls(self) -> bool:
        """True when the API port speaks HTTPS and calls to other racks use it too."""
        return self.tls_cert is not None


class PowerConfig(_Strict):
    """The rack's power source: a UPS through Network UPS Tools, or none (docs/power.md)."""

    source: str = Field("none", description="none (always on mains) | nut (a UPS via upsd)")
    nut_host: str = Field("127.0.0.1", description="upsd's address (an IP address)")
    nut_port: int = Field(3493, ge=1, le=65535, description="upsd's TCP port")
    nut_ups: str = Field("ups", description="the UPS's name in ups.conf")
    nut_timeout_s: float = Field(3.0, gt=0, le=60, description="deadline of one read of upsd")
    poll_s: float = Field(5.0, gt=0, le=3600, description="read the power source this often")
    evacuate_below_s: float = Field(
        600.0,
        ge=0,
        le=86400,
        description="on battery with less runtime than this, move the rack's appliances away",
    )

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if v not in ("none", "nut"):
            raise ValueError("must be none or nut")
        return v

    @field_validator("nut_host")
    @classmethod
    def _host(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v)
        except ValueError:
            raise ValueError(f"{v!r} is not an IP address") from None
        return v

    @field_validator("nut_ups")
    @classmethod
    def _ups(cls, v: str) -> str:
        if (
            not v
            or len(v) > 64
            or not all(c.isalnum() or c in "_.-" for c in v)
            or not v[0].isalnum()
        ):
            raise ValueError(f"{v!r} is not a valid UPS name (1-64 of [A-Za-z0-9_.-])")
        return v


class DaemonConfig(_Strict):
    """The whole daemon configuration file."""

    rack: RackConfig
    cluster: ClusterConfig = ClusterConfig()
    network: NetworkConfig = NetworkConfig()
    state_dir: Path = Field(Path("/var/lib/meshcloud"), description="journal, volumes, images")
    hypervisor: HypervisorConfig = HypervisorConfig()
    timers: TimersConfig = TimersConfig()
    replication: ReplicationConfig = ReplicationConfig()
    watchdog: WatchdogConfig = WatchdogConfig()
    console: ConsoleConfig = ConsoleConfig()
    power: PowerConfig = PowerConfig()

    @field_validator("state_dir")
    @classmethod
    def _abs(cls, v: Path) -> Path:
        if not v.is_absolute():
            raise ValueError(f"must be an absolute path, not {str(v)!r}")
        return v

    def users_path(self) -> Path:
        """The rack's console users file (in the state dir unless configured)."""
        return self.console.users_file or self.state_dir / "console" / "users.json"

    def libvirt_uri(self) -> str:
        """The libvirt URI to open: the configured one, or an embedded root in state_dir."""
        return self.hypervisor.uri or f"qemu:///embed?root={self.state_dir / 'libvirt'}"

    def read_secret(self) -> str:
        """The cluster secret; raises ConfigError if it is missing, empty or weak."""
        c = self.cluster
        if c.secret is not None and c.secret_file is not None:
            raise ConfigError("cluster.secret and cluster.secret_file are exclusive: set one")
        if c.secret_file is not None:
            try:
                secret = c.secret_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    f"cluster.secret_file: cannot read {c.secret_file}: {exc}"
                ) from exc
        elif c.secret is not None:
            secret = c.secret.strip()
        else:
            raise ConfigError(
                "cluster.secret_file is not set: the daemon refuses to start without a cluster"
                " secret (make one with `meshcloud kit new`)"
            )
        if secret.lower() in WEAK_SECRETS:
            raise ConfigError("cluster secret is empty or a well-known default: use a random one")
        if len(secret) < MIN_SECRET_LEN:
            raise ConfigError(
                f"cluster secret is {len(secret)} characters; at least {MIN_SECRET_LEN} are needed"
            )
        return secret


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see docs/configuration.md)"
        elif err["type"] == "missing":
            msg = "is required"
        lines.append(f"{key}: {msg}")
    return "; ".join(lines)


def parse_config(data: Any, source: str = "config") -> DaemonConfig:
    """Validate plain data (as parsed from YAML) into a DaemonConfig."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: must be a mapping of keys, not {type(data).__name__}")
    try:
        return DaemonConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_format_errors(exc)}") from None


def load_config(path: Path) -> DaemonConfig:
    """Read and validate the YAML file at ``path``."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse_config(data, str(path))

"""Deployment kits: everything a cluster's racks need to know who they are.

``meshcloud kit new --cluster NAME --racks rack-1,rack-2 --out DIR`` makes::

    DIR/                      0700
      kit.json                summary, no secrets (what `kit show` prints)
      cluster-secret          0600  the cluster secret (guard it like a root password)
      ca/ca.crt, ca/ca.key    the cluster CA (key 0600)
      racks/<rack>/           0700  rack.crt, rack.key (0600), daemon.yaml
      ssh/replication_ed25519 0600  the replication key pair (+ .pub)
      users.json              0600  console users and emergency codes, argon2 hashes only
      flash-log.jsonl         0600  one JSON line per flashed device (append only)
      passports/<rack>.pdf          printed rack passports

The first admin password and the emergency codes are printed once and are
not stored in clear anywhere. Making a kit is split in two phases: a pure
:func:`plan_kit` that validates names and addresses, then
:func:`create_kit` that makes keys and writes files.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import os
import secrets
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from argon2 import PasswordHasher
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshcloud.config import MIN_SECRET_LEN, parse_config
from meshcloud.core.errors import InvalidInput
from meshcloud.core.names import validate_name
from meshcloud.images.identity import Identity
from meshcloud.images.tools import KitError

KIT_VERSION = 1
DEFAULT_SUBNET = "10.44.0.0/24"
FIRST_HOST = 11
DEFAULT_CONFIG_DIR = "/etc/meshcloud"
EMERGENCY_CODES = 10
ADMIN_USER = "admin"
CA_YEARS = 20
# Where a rack keeps its TLS files, relative to the config dir (identity.py, Ansible).
CA_CERT_FILE = "tls/ca.crt"
RACK_CERT_FILE = "tls/rack.crt"
RACK_KEY_FILE = "tls/rack.key"
RACK_CERT_YEARS = 10
# No 0/O, 1/I/L: codes are read off paper and typed in a hurry.
_CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"
_PASSWORD_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"  # noqa: S105 (an alphabet)


@dataclass(frozen=True)
class RackPlan:
    name: str
    site: str
    address: str


@dataclass(frozen=True)
class KitPlan:
    """A validated kit request: names, sites, addresses, ports."""

    cluster: str
    racks: tuple[RackPlan, ...]
    prefix_len: int
    api_port: int = 8440
    raft_port: int = 7440
    mesh_interface: str = "en* eth*"
    config_dir: str = DEFAULT_CONFIG_DIR
    bootstrap_expect: int = 3
    max_voters: int = 3

    def rack(self, name: str) -> RackPlan:
        for rack in self.racks:
            if rack.name == name:
                return rack
        raise KitError(f"rack {name!r} is not in this kit (racks: {[r.name for r in self.racks]})")


@dataclass(frozen=True)
class KitSecrets:
    """What `kit new` prints once and never stores in clear."""

    admin_user: str
    admin_password: str
    emergency_codes: tuple[str, ...]


def _split(value: str | Sequence[str]) -> list[str]:
    items = value.split(",") if isinstance(value, str) else list(value)
    return [item.strip() for item in items if item.strip()]


def plan_kit(
    cluster: str,
    racks: str | Sequence[str],
    *,
    sites: str | Sequence[str] = (),
    addresses: str | Sequence[str] = (),
    subnet: str = DEFAULT_SUBNET,
    api_port: int = 8440,
    raft_port: int = 7440,
    mesh_interface: str = "en* eth*",
    config_dir: str = DEFAULT_CONFIG_DIR,
    bootstrap_expect: int | None = None,
) -> KitPlan:
    """Validate a kit request (no I/O). Sites and addresses pair with racks in order;
    one site applies to every rack; without addresses racks get .11, .12, ... of ``subnet``.
    """
    validate_name("cluster", cluster)
    rack_names = [validate_name("rack", r) for r in _split(racks)]
    if not rack_names:
        raise InvalidInput("--racks: name at least one rack, e.g. --racks rack-1,rack-2,rack-3")
    duplicates = sorted({r for r in rack_names if rack_names.count(r) > 1})
    if duplicates:
        raise InvalidInput(f"--racks: each rack name must be unique; repeated: {duplicates}")
    site_names = [validate_name("site", s) for s in _split(sites)] or ["default"]
    if len(site_names) == 1:
        site_names = site_names * len(rack_names)
    if len(site_names) != len(rack_names):
        raise InvalidInput(
            f"--sites: give one site for all racks or one per rack ({len(rack_names)}),"
            f" not {len(site_names)}"
        )
    try:
        network = ipaddress.ip_network(subnet, strict=False)
    except ValueError as exc:
        raise InvalidInput(f"--subnet {subnet!r} is not a network (e.g. 10.44.0.0/24)") from exc
    hosts = [str(a) for a in _split(addresses)]
    if hosts:
        if len(hosts) != len(rack_names):
            raise InvalidInput(
                f"--addresses: give one address per rack ({len(rack_names)}), not {len(hosts)}"
            )
        for host in hosts:
            try:
                addr = ipaddress.ip_address(host)
            except ValueError:
                raise InvalidInput(f"--addresses: {host!r} is not an IP address") from None
            if addr not in network or addr in (network.network_address, network.broadcast_address):
                raise InvalidInput(f"--addresses: {host} is not a host address of {network}")
        if len(set(hosts)) != len(hosts):
            raise InvalidInput("--addresses: each rack needs its own address")
    else:
        if network.num_addresses < FIRST_HOST + len(rack_names) + 1:
            raise InvalidInput(f"--subnet {network} is too small for {len(rack_names)} racks")
        hosts = [str(network.network_address + FIRST_HOST + i) for i in range(len(rack_names))]
    for port_name, port in (("--api-port", api_port), ("--raft-port", raft_port)):
        if not 0 < port < 65536:
            raise InvalidInput(f"{port_name} {port} is not a TCP port")
    if api_port == raft_port:
        raise InvalidInput("--api-port and --raft-port must differ")
    if not mesh_interface or not all(c.isalnum() or c in "*-_. " for c in mesh_interface):
        raise InvalidInput(f"--mesh-interface {mesh_interface!r}: use interface names or globs")
    if not config_dir.startswith("/") or any(c.isspace() or c in "\"'\\" for c in config_dir):
        raise InvalidInput(f"--config-dir {config_dir!r} must be an absolute path")
    expect = bootstrap_expect or min(3, len(rack_names))
    if not 1 <= expect <= len(rack_names):
        raise InvalidInput(f"--bootstrap-expect must be between 1 and {len(rack_names)}")
    voters = 1 if len(rack_names) < 3 else 3 if len(rack_names) < 5 else 5
    return KitPlan(
        cluster=cluster,
        racks=tuple(
            RackPlan(n, s, a) for n, s, a in zip(rack_names, site_names, hosts, strict=True)
        ),
        prefix_len=network.prefixlen,
        api_port=api_port,
        raft_port=raft_port,
        mesh_interface=mesh_interface,
        config_dir=config_dir.rstrip("/") or "/",
        bootstrap_expect=expect,
        max_voters=voters,
    )


def render_daemon_yaml(plan: KitPlan, rack: RackPlan, cluster_id: str) -> str:
    """The rack's daemon.yaml, as it will be on the rack (checked against the schema)."""
    data: dict[str, Any] = {
        "rack": {"name": rack.name, "site": rack.site},
        "cluster": {
            "secret_file": f"{plan.config_dir}/cluster-secret",
            "bootstrap_expect": plan.bootstrap_expect,
            "max_voters": plan.max_voters,
        },
        "network": {
            "bind_address": rack.address,
            "api_port": plan.api_port,
            "raft_port": plan.raft_port,
        },
        "state_dir": "/var/lib/meshcloud",
        "hypervisor": {"uri": "qemu:///system"},
        # where the identity unpacker (and Ansible) install the kit's tls/ files
        "console": {
            "tls_cert": f"{plan.config_dir}/{RACK_CERT_FILE}",
            "tls_key": f"{plan.config_dir}/{RACK_KEY_FILE}",
            "tls_ca": f"{plan.config_dir}/{CA_CERT_FILE}",
        },
    }
    parse_config(data, f"daemon.yaml for {rack.name}")
    header = (
        f"# meshcloud daemon config: rack {rack.name} (site {rack.site}) of cluster"
        f" {plan.cluster} ({cluster_id}).\n# Made by `meshcloud kit new`; on the rack it is"
        f" installed from the identity partition.\n"
    )
    return header + yaml.safe_dump(data, sort_keys=False)


def _random_text(alphabet: str, groups: int, size: int) -> str:
    return "-".join("".join(secrets.choice(alphabet) for _ in range(size)) for _ in range(groups))


def _name(common_name: str, cluster: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"meshcloud {cluster}"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(cluster: str, now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(f"meshcloud {cluster} CA", cluster)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365 * CA_YEARS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_rack_cert(
    cluster: str,
    rack: RackPlan,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    now: dt.datetime,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A rack's TLS certificate: server and client auth, for its name and mesh address."""
    key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName(
        [
            x509.DNSName(rack.name),
            x509.DNSName(f"{rack.name}.local"),
            x509.IPAddress(ipaddress.ip_address(rack.address)),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(rack.name, cluster))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365 * RACK_CERT_YEARS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(san, critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _write(path: Path, data: bytes | str, mode: int) -> None:
    """Create a new file with ``mode`` from the start (never briefly world-readable)."""
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, raw)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(path, mode)


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def create_kit(
    plan: KitPlan,
    out: Path,
    now: dt.datetime | None = None,
    hasher: PasswordHasher | None = None,
) -> KitSecrets:
    """Make keys and certificates and write the kit to ``out`` (new or empty).

    Refuses an existing kit or any non-empty directory; on failure removes
    what it wrote. Returns the secrets to print once. ``hasher`` defaults to
    argon2id with argon2-cffi's recommended cost (tests pass a cheaper one).
    """
    now = now or dt.datetime.now(dt.UTC)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "a kit" if (out / "kit.json").exists() else "not empty"
        raise KitError(
            f"{out} already exists and is {what}: kits are never overwritten;"
            " choose a new --out directory"
        )
    created_dir = not out.exists()
    old_umask = os.umask(0o077)
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(out, 0o700)
        result = _write_kit(plan, out, now, hasher or PasswordHasher())
    except BaseException:
        if created_dir:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for child in out.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise
    finally:
        os.umask(old_umask)
    return result


def _write_kit(plan: KitPlan, out: Path, now: dt.datetime, hasher: PasswordHasher) -> KitSecrets:
    cluster_id = str(uuid.uuid4())
    secret = secrets.token_urlsafe(36)
    assert len(secret) >= MIN_SECRET_LEN
    _write(out / "cluster-secret", secret + "\n", 0o600)

    (out / "ca").mkdir(mode=0o700)
    ca_key, ca_cert = make_ca(plan.cluster, now)
    _write(out / "ca" / "ca.key", _pem_key(ca_key), 0o600)
    _write(out / "ca" / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)

    rack_entries = []
    (out / "racks").mkdir(mode=0o700)
    for rack in plan.racks:
        rdir = out / "racks" / rack.name
        rdir.mkdir(mode=0o700)
        key, cert = make_rack_cert(plan.cluster, rack, ca_key, ca_cert, now)
        _write(rdir / "rack.key", _pem_key(key), 0o600)
        _write(rdir / "rack.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644)
        _write(rdir / "daemon.yaml", render_daemon_yaml(plan, rack, cluster_id), 0o644)
        rack_entries.append(
            {
                "name": rack.name,
                "site": rack.site,
                "address": rack.address,
                "cert_sha256": _fingerprint(cert),
                "cert_not_after": cert.not_valid_after_utc.isoformat(),
            }
        )

    (out / "ssh").mkdir(mode=0o700)
    ssh_key = ed25519.Ed25519PrivateKey.generate()
    ssh_private = ssh_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    ssh_public = (
        ssh_key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
        + f" meshcloud-replication@{plan.cluster}"
    )
    _write(out / "ssh" / "replication_ed25519", ssh_private, 0o600)
    _write(out / "ssh" / "replication_ed25519.pub", ssh_public + "\n", 0o644)

    password = _random_text(_PASSWORD_ALPHABET, 4, 5)
    codes = tuple(_random_text(_CODE_ALPHABET, 3, 4) for _ in range(EMERGENCY_CODES))
    users = {
        "version": 1,
        "users": [
            {
                "name": ADMIN_USER,
                "role": "admin",
                "password_argon2": hasher.hash(password),
                "must_change_password": True,
            }
        ],
        "emergency_codes": [
            {"id": i + 1, "argon2": hasher.hash(code), "used": False}
            for i, code in enumerate(codes)
        ],
    }
    _write(out / "users.json", json.dumps(users, indent=2) + "\n", 0o600)

    summary = {
        "kit_version": KIT_VERSION,
        "cluster": plan.cluster,
        "cluster_id": cluster_id,
        "created": now.isoformat(timespec="seconds"),
        "prefix_len": plan.prefix_len,
        "api_port": plan.api_port,
        "raft_port": plan.raft_port,
        "mesh_interface": plan.mesh_interface,
        "config_dir": plan.config_dir,
        "bootstrap_expect": plan.bootstrap_expect,
        "max_voters": plan.max_voters,
        "ca": {
            "subject": ca_cert.subject.rfc4514_string(),
            "sha256": _fingerprint(ca_cert),
            "not_after": ca_cert.not_valid_after_utc.isoformat(),
        },
        "racks": rack_entries,
        "ssh_public_key": ssh_public,
        "admin_user": ADMIN_USER,
        "emergency_codes": len(codes),
    }
    # Written last: a directory with kit.json is a complete kit.
    _write(out / "kit.json", json.dumps(summary, indent=2) + "\n", 0o644)
    return KitSecrets(ADMIN_USER, password, codes)


# -- reading a kit ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Kit:
    """A kit directory and its summary (kit.json)."""

    directory: Path
    summary: dict[str, Any]

    @property
    def cluster(self) -> str:
        return str(self.summary["cluster"])

    @property
    def cluster_id(self) -> str:
        return str(self.summary["cluster_id"])

    @property
    def api_port(self) -> int:
        return int(self.summary["api_port"])

    @property
    def rack_names(self) -> list[str]:
        return [str(r["name"]) for r in self.summary["racks"]]

    def rack(self, name: str) -> dict[str, Any]:
        validate_name("rack", name)
        for entry in self.summary["racks"]:
            if entry["name"] == name:
                return dict(entry)
        raise KitError(
            f"rack {name!r} is not in the kit for cluster {self.cluster}"
            f" (racks: {', '.join(self.rack_names)})"
        )

    def console_url(self, name: str) -> str:
        address = ipaddress.ip_address(self.rack(name)["address"])
        host = f"[{address}]" if address.version == 6 else str(address)
        return f"https://{host}:{self.api_port}/"

    @property
    def flash_log(self) -> Path:
        return self.directory / "flash-log.jsonl"


def load_kit(directory: Path) -> Kit:
    """Read a kit's summary; raises KitError if ``directory`` is not a complete kit."""
    path = directory / "kit.json"
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        raise KitError(
            f"{directory} is not a kit (no kit.json): make one with `meshcloud kit new`"
        ) from None
    except (OSError, ValueError) as exc:
        raise KitError(f"cannot read {path}: {exc}") from exc
    if summary.get("kit_version") != KIT_VERSION:
        raise KitError(f"{path}: kit version {summary.get('kit_version')} is not {KIT_VERSION}")
    return Kit(directory, summary)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise KitError(f"kit file missing or unreadable: {path}: {exc}") from exc


def rack_identity(kit: Kit, rack: str) -> Identity:
    """The identity record for one rack, with the files the rack needs (secrets included)."""
    entry = kit.rack(rack)
    d = kit.directory
    info = {
        "rack": rack,
        "site": entry["site"],
        "cluster": kit.cluster,
        "cluster_id": kit.cluster_id,
        "address": entry["address"],
        "console": kit.console_url(rack),
    }
    files = {
        "daemon.yaml": _read(d / "racks" / rack / "daemon.yaml"),
        "cluster-secret": _read(d / "cluster-secret"),
        CA_CERT_FILE: _read(d / "ca" / "ca.crt"),
        RACK_CERT_FILE: _read(d / "racks" / rack / "rack.crt"),
        RACK_KEY_FILE: _read(d / "racks" / rack / "rack.key"),
        "ssh/replication_ed25519": _read(d / "ssh" / "replication_ed25519"),
        "ssh/replication_ed25519.pub": _read(d / "ssh" / "replication_ed25519.pub"),
        "users.json": _read(d / "users.json"),
        "identity.json": json.dumps(info, indent=2) + "\n",
    }
    return Identity(
        rack=rack,
        site=str(entry["site"]),
        cluster=kit.cluster,
        cluster_id=kit.cluster_id,
        address=str(entry["address"]),
        prefix_len=int(kit.summary["prefix_len"]),
        api_port=kit.api_port,
        mesh_interface=str(kit.summary["mesh_interface"]),
        files=files,
    )


def show_kit(kit: Kit) -> str:
    """A human summary of a kit, without any secret."""
    s = kit.summary
    lines = [
        f"kit:        {kit.directory}",
        f"cluster:    {s['cluster']}  (id {s['cluster_id']})",
        f"created:    {s['created']}",
        f"CA:         {s['ca']['subject']}  until {s['ca']['not_after'][:10]}",
        f"CA SHA-256: {_colons(s['ca']['sha256'])}",
        "            (the consoles speak HTTPS: laptops trust ca/ca.crt, or check this)",
        f"ports:      api {s['api_port']}, raft {s['raft_port']}; mesh interface"
        f" {s['mesh_interface']!r}; bootstrap_expect {s['bootstrap_expect']}",
        f"replication key: {_ssh_fingerprint(s['ssh_public_key'])}",
        f"console:    user {s['admin_user']!r}; {s['emergency_codes']} emergency codes"
        " (hashes only in the kit)",
        "racks:",
    ]
    flashed = _last_flash_per_rack(kit)
    for rack in s["racks"]:
        last = flashed.get(rack["name"])
        when = f"flashed {last['time'][:19]} on {last['device']}" if last else "not flashed yet"
        lines.append(
            f"  {rack['name']:<16} site {rack['site']:<12} {rack['address']:<15}"
            f" {kit.console_url(rack['name'])}  ({when})"
        )
    return "\n".join(lines)


def _colons(hex_digest: str) -> str:
    """A fingerprint as browsers show it: AB:CD:..."""
    return ":".join(hex_digest[i : i + 2] for i in range(0, len(hex_digest), 2)).upper()


def _ssh_fingerprint(public_line: str) -> str:
    import base64

    try:
        blob = base64.b64decode(public_line.split()[1])
    except (IndexError, ValueError):
        return "(unreadable)"
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"ED25519 SHA256:{digest}"


def _last_flash_per_rack(kit: Kit) -> dict[str, dict[str, Any]]:
    last: dict[str, dict[str, Any]] = {}
    try:
        text = kit.flash_log.read_text()
    except OSError:
        return last
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("result") == "pass" and isinstance(entry.get("rack"), str):
            last[entry["rack"]] = entry
    return last

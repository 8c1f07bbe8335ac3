"""Deployment kits: validation, keys and certificates, permissions, no secret in summaries."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from meshcloud.config import load_config
from meshcloud.core.errors import InvalidInput
from meshcloud.images.identity import install_identity
from meshcloud.images.kit import KitError, create_kit, load_kit, plan_kit, rack_identity, show_kit
from meshcloud.web.tls import peer_tls, tls_context

HASHER = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"cluster": "Relief"}, "cluster name"),
        ({"racks": "rack-1,rack 2"}, "rack name"),
        ({"racks": "rack-1,rack-1"}, "unique"),
        ({"racks": ""}, "at least one rack"),
        ({"sites": "a,b"}, "one site for all racks or one per rack"),
        ({"sites": "north,Süd,x"}, "site name"),
        ({"addresses": "10.44.0.5"}, "one address per rack"),
        ({"addresses": "10.44.0.5,10.44.0.5,10.44.0.6"}, "its own address"),
        ({"addresses": "10.44.0.5,10.9.0.1,10.44.0.6"}, "not a host address"),
        ({"subnet": "banana"}, "not a network"),
        ({"subnet": "10.44.0.0/29"}, "too small"),
        ({"api_port": 7440}, "must differ"),
        ({"config_dir": "etc/meshcloud"}, "absolute"),
        ({"mesh_interface": "eth0;reboot"}, "mesh-interface"),
    ],
)
def test_plan_refuses_bad_requests(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"cluster": "relief", "racks": "rack-1,rack-2,rack-3"}
    args.update(kwargs)
    with pytest.raises(InvalidInput, match=message):
        plan_kit(**args)  # type: ignore[arg-type]


def test_plan_assigns_sites_addresses_and_voters() -> None:
    plan = plan_kit("relief", "rack-1, rack-2, rack-3, rack-4, rack-5", sites="north")
    assert [r.site for r in plan.racks] == ["north"] * 5
    assert [r.address for r in plan.racks] == [f"10.44.0.{i}" for i in range(11, 16)]
    assert plan.bootstrap_expect == 3 and plan.max_voters == 5
    assert plan_kit("relief", "rack-1").max_voters == 1


def make_kit(tmp_path: Path, racks: str = "rack-1,rack-2") -> tuple[Path, object]:
    plan = plan_kit("relief", racks, sites="north,south", config_dir=str(tmp_path / "etc"))
    out = tmp_path / "kit"
    return out, create_kit(plan, out, hasher=HASHER)


def test_kit_files_and_permissions(tmp_path: Path) -> None:
    out, _ = make_kit(tmp_path)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o700
    private = ["cluster-secret", "ca/ca.key", "racks/rack-1/rack.key", "ssh/replication_ed25519",
               "users.json"]  # fmt: skip
    for name in private:
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o600, name
    for directory in ("ca", "racks", "racks/rack-1", "ssh"):
        assert stat.S_IMODE(os.stat(out / directory).st_mode) == 0o700, directory
    secret = (out / "cluster-secret").read_text().strip()
    assert len(secret) >= 32


def test_certificates_chain_to_the_ca_and_name_the_rack(tmp_path: Path) -> None:
    out, _ = make_kit(tmp_path)
    ca = x509.load_pem_x509_certificate((out / "ca/ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((out / "racks/rack-2/rack.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "rack-2" in san.get_values_for_type(x509.DNSName)
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.44.0.12"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku and ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=3000)
    key = ec.EllipticCurvePrivateKey  # the rack key matches its certificate
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    loaded = load_pem_private_key((out / "racks/rack-2/rack.key").read_bytes(), None)
    assert isinstance(loaded, key)
    assert loaded.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]


def test_login_and_codes_are_stored_as_argon2_hashes_only(tmp_path: Path) -> None:
    out, secrets = make_kit(tmp_path)
    users = json.loads((out / "users.json").read_text())
    admin = users["users"][0]
    assert admin["name"] == "admin" and admin["role"] == "admin"
    assert admin["password_argon2"].startswith("$argon2id$")
    assert HASHER.verify(admin["password_argon2"], secrets.admin_password)  # type: ignore[attr-defined]
    codes = secrets.emergency_codes  # type: ignore[attr-defined]
    assert len(codes) == 10 and len(set(codes)) == 10
    for entry, code in zip(users["emergency_codes"], codes, strict=True):
        assert HASHER.verify(entry["argon2"], code)
    everything = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert secrets.admin_password.encode() not in everything  # type: ignore[attr-defined]
    assert not any(code.encode() in everything for code in codes)


def test_show_prints_no_secret(tmp_path: Path) -> None:
    out, secrets = make_kit(tmp_path)
    text = show_kit(load_kit(out))
    assert "relief" in text and "rack-2" in text and "https://10.44.0.12:8440/" in text
    fingerprint = load_kit(out).summary["ca"]["sha256"].upper()
    assert ":".join(fingerprint[i : i + 2] for i in range(0, 64, 2)) in text
    secret = (out / "cluster-secret").read_text().strip()
    assert secret not in text and "PRIVATE KEY" not in text
    assert secrets.admin_password not in text  # type: ignore[attr-defined]
    assert "$argon2" not in text
    kit_json = (out / "kit.json").read_text()
    assert secret not in kit_json and "PRIVATE" not in kit_json


def test_an_existing_kit_is_never_overwritten(tmp_path: Path) -> None:
    out, _ = make_kit(tmp_path)
    before = (out / "cluster-secret").read_text()
    plan = plan_kit("other", "rack-9")
    with pytest.raises(KitError, match="never overwritten"):
        create_kit(plan, out, hasher=HASHER)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(KitError, match="not empty"):
        create_kit(plan, tmp_path / "busy", hasher=HASHER)
    assert (out / "cluster-secret").read_text() == before


def test_rack_daemon_config_is_ready_to_use(tmp_path: Path) -> None:
    """The rack's identity, installed where the kit said, gives a config that loads."""
    out, _ = make_kit(tmp_path)
    kit = load_kit(out)
    ident = rack_identity(kit, "rack-2")
    install_identity(ident, tmp_path / "etc", tmp_path / "sysetc")
    cfg = load_config(tmp_path / "etc" / "daemon.yaml")
    assert cfg.rack.name == "rack-2" and cfg.rack.site == "south"
    assert cfg.network.bind_address == "10.44.0.12"
    assert cfg.read_secret() == (out / "cluster-secret").read_text().strip()
    assert ident.files["tls/rack.crt"] == (out / "racks/rack-2/rack.crt").read_text()
    # TLS is on, with the files where the identity unpacker put them
    etc = tmp_path / "etc"
    tls = cfg.console
    assert (tls.tls_cert, tls.tls_key, tls.tls_ca) == (
        etc / "tls/rack.crt",
        etc / "tls/rack.key",
        etc / "tls/ca.crt",
    )
    assert tls_context(tls.tls_cert, tls.tls_key) is not None
    client = peer_tls(tls)
    assert client.base_url("10.44.0.11", 8440) == "https://10.44.0.11:8440"


def test_unknown_rack_and_missing_kit(tmp_path: Path) -> None:
    out, _ = make_kit(tmp_path)
    with pytest.raises(KitError, match="not in the kit"):
        rack_identity(load_kit(out), "rack-7")
    with pytest.raises(KitError, match="not a kit"):
        load_kit(tmp_path / "nowhere")

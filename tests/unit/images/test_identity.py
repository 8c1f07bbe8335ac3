"""The identity record: encoding, damage detection, installation on the rack."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from meshcloud.core.errors import InvalidInput
from meshcloud.images.identity import (
    HEADER,
    Identity,
    decode_record,
    encode_record,
    install_identity,
    networkd_unit,
    read_record_at,
)


def identity(**changes: object) -> Identity:
    base: dict[str, object] = {
        "rack": "rack-1", "site": "north", "cluster": "relief",
        "cluster_id": "0b9e3c5e-6a57-4c3e-9a55-2d1b0b6f1a11", "address": "10.44.0.11",
        "prefix_len": 24, "api_port": 8440,
        "files": {"daemon.yaml": "rack: {name: rack-1}\n", "cluster-secret": "s" * 48 + "\n",
                  "tls/rack.key": "KEY\n", "tls/rack.crt": "CERT\n"},
    }  # fmt: skip
    base.update(changes)
    return Identity(**base)  # type: ignore[arg-type]


def test_round_trip_and_blank_record() -> None:
    ident = identity()
    record = encode_record(ident)
    assert len(record) % 4096 == 0
    assert decode_record(record) == ident
    assert decode_record(encode_record(None)) is None


def test_damage_is_detected() -> None:
    record = bytearray(encode_record(identity()))
    record[HEADER.size + 10] ^= 0x01
    with pytest.raises(InvalidInput, match="checksum"):
        decode_record(bytes(record))
    with pytest.raises(InvalidInput, match="magic"):
        decode_record(b"\0" * 4096)


@pytest.mark.parametrize(
    "field,value",
    [("rack", "Rack_1"), ("site", "../etc"), ("files", {"../../etc/shadow": "x"})],
)
def test_malformed_payloads_are_refused(field: str, value: object) -> None:
    record = encode_record(identity(**{field: value}))
    with pytest.raises(InvalidInput):
        decode_record(record)


def test_read_record_at_an_offset(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    with open(disk, "wb") as f:
        f.truncate(2 << 20)
        f.seek(1 << 20)
        f.write(encode_record(identity()))
    assert read_record_at(disk, 1 << 20, 1 << 20) == identity()
    with pytest.raises(InvalidInput, match="exceeds"):
        read_record_at(disk, 1 << 20, 100)


def test_install_writes_files_with_private_modes(tmp_path: Path) -> None:
    dest, etc = tmp_path / "meshcloud", tmp_path / "etc"
    install_identity(identity(), dest, etc)
    assert (dest / "daemon.yaml").read_text().startswith("rack:")
    for secret in ("cluster-secret", "tls/rack.key"):
        assert stat.S_IMODE(os.stat(dest / secret).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(dest / "tls/rack.crt").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(dest / "tls").st_mode) == 0o700
    assert (etc / "hostname").read_text() == "rack-1\n"
    network = (etc / "systemd/network/10-meshcloud-mesh.network").read_text()
    assert "Address=10.44.0.11/24" in network and "Name=en* eth*" in network


def test_networkd_unit_uses_the_mesh_interface() -> None:
    text = networkd_unit(identity(mesh_interface="enp3s0"))
    assert "Name=enp3s0\n" in text

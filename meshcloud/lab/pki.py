"""A kit-like CA and rack certificates for a lab started with ``tls=True`` (docs/lab.md).

The same functions as ``meshcloud kit new`` (:func:`meshcloud.images.kit.make_ca`,
:func:`~meshcloud.images.kit.make_rack_cert`): the CA is named after the lab,
each rack's certificate carries its name and lab address.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshcloud.images.kit import RackPlan, make_ca, make_rack_cert

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
RACK_CERT = "rack.crt"
RACK_KEY = "rack.key"


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_ca(directory: Path, cluster: str, now: dt.datetime | None = None) -> Path:
    """Make the lab's CA in ``directory`` (ca.crt, ca.key 0600); returns ca.crt's path."""
    key, cert = make_ca(cluster, now or dt.datetime.now(dt.UTC))
    _write(directory / CA_KEY, _key_pem(key), 0o600)
    _write(directory / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return directory / CA_CERT


def write_rack_cert(
    ca_dir: Path, directory: Path, cluster: str, rack: str, site: str, address: str
) -> tuple[Path, Path]:
    """Sign ``rack``'s certificate (name and ``address`` as SANs); returns (cert, key) paths."""
    ca_key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
    key, cert = make_rack_cert(
        cluster, RackPlan(rack, site, address), ca_key, ca_cert, dt.datetime.now(dt.UTC)
    )
    _write(directory / RACK_KEY, _key_pem(key), 0o600)
    _write(directory / RACK_CERT, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return directory / RACK_CERT, directory / RACK_KEY

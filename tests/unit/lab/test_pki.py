"""The lab's kit-like CA: rack certificates that the racks' TLS settings load and verify."""

from __future__ import annotations

import ssl
import stat
from pathlib import Path

from cryptography import x509

from meshcloud.config import parse_config
from meshcloud.lab import plan
from meshcloud.lab.pki import write_ca, write_rack_cert
from meshcloud.web.tls import peer_tls, tls_context


def test_lab_certificates_are_kit_certificates_for_the_lab_address(tmp_path: Path) -> None:
    ca = write_ca(tmp_path / "tls", "t1")
    cert, key = write_rack_cert(tmp_path / "tls", tmp_path / "r2", "t1", "r2", "north", "10.77.0.2")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "tls" / "ca.key").stat().st_mode) == 0o600
    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    san = loaded.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.77.0.2"]
    assert "r2" in san.get_values_for_type(x509.DNSName)
    # the lab rack's config turns TLS on with these files, and they load
    data = plan.daemon_config(rack="r2", site="north", ip="10.77.0.2", secret_file=tmp_path / "s",
                              bootstrap_expect=3, state_dir=tmp_path / "state",
                              tls=(cert, key, ca))  # fmt: skip
    console = parse_config(data).console
    assert console.tls and console.tls_ca == ca
    assert isinstance(tls_context(console.tls_cert, console.tls_key), ssl.SSLContext)
    assert peer_tls(console).base_url("10.77.0.1", plan.API_PORT).startswith("https://")


def test_lab_config_without_tls_stays_plain(tmp_path: Path) -> None:
    data = plan.daemon_config(rack="r1", site="north", ip="10.77.0.1", secret_file=tmp_path / "s",
                              bootstrap_expect=3, state_dir=tmp_path / "state")  # fmt: skip
    assert "console" not in data
    assert not parse_config(data).console.tls

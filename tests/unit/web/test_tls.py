"""TLS between racks and for the CLI: real handshakes on loopback with kit-made certificates."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization

from meshcloud.client import ApiClient, resolve_client
from meshcloud.config import ConsoleConfig
from meshcloud.core.errors import ConfigError, Unavailable
from meshcloud.discovery import admission
from meshcloud.discovery.admission import AdmissionRefused
from meshcloud.discovery.proof import ClusterKeys
from meshcloud.images.kit import RackPlan, make_ca, make_rack_cert
from meshcloud.web.tls import PLAIN, certificate_problem, peer_tls, rack_url, tls_context

NOW = dt.datetime.now(dt.UTC)
HOST = "127.0.0.1"


@dataclass(frozen=True)
class Pki:
    """A kit-like CA and one rack certificate, as files."""

    ca: Path
    cert: Path
    key: Path

    def console(self) -> ConsoleConfig:
        return ConsoleConfig(tls_cert=self.cert, tls_key=self.key, tls_ca=self.ca)


def make_pki(directory: Path, address: str = HOST) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = make_ca("relief", NOW)
    key, cert = make_rack_cert("relief", RackPlan("rack-1", "north", address), ca_key, ca_cert, NOW)
    pem = serialization.Encoding.PEM
    (directory / "ca.crt").write_bytes(ca_cert.public_bytes(pem))
    (directory / "rack.crt").write_bytes(cert.public_bytes(pem))
    (directory / "rack.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return Pki(directory / "ca.crt", directory / "rack.crt", directory / "rack.key")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


async def health(_request: web.Request) -> web.Response:
    return web.json_response({"rack": "rack-1"})


@pytest.fixture
async def https_rack(tmp_path: Path) -> AsyncIterator[tuple[Pki, int]]:
    """A rack API serving HTTPS with its kit certificate (for 127.0.0.1)."""
    pki = make_pki(tmp_path / "kit")
    app = web.Application()
    app.router.add_get("/api/v1/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, HOST, port, ssl_context=tls_context(pki.cert, pki.key))
    await site.start()
    yield pki, port
    await runner.cleanup()


async def fetch(console: ConsoleConfig, port: int) -> int:
    tls = peer_tls(console)
    url = tls.base_url(HOST, port) + "/api/v1/health"
    async with aiohttp.ClientSession(connector=tls.connector()) as session, session.get(url) as r:
        return r.status


def test_base_urls() -> None:
    assert PLAIN.base_url("10.44.0.11", 8440) == "http://10.44.0.11:8440"
    assert rack_url("fd00::11", 8440, https=True) == "https://[fd00::11]:8440"
    assert peer_tls(ConsoleConfig()) is PLAIN


def test_a_missing_ca_file_is_a_config_error(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    missing = ConsoleConfig(tls_cert=pki.cert, tls_key=pki.key, tls_ca=tmp_path / "nope.crt")
    with pytest.raises(ConfigError, match=r"console\.tls_ca: cannot load .*nope\.crt"):
        peer_tls(missing)


async def test_a_peer_with_a_kit_certificate_is_reached_over_https(
    https_rack: tuple[Pki, int],
) -> None:
    pki, port = https_rack
    assert await fetch(pki.console(), port) == 200


async def test_a_peer_from_another_ca_is_refused(
    https_rack: tuple[Pki, int], tmp_path: Path
) -> None:
    _, port = https_rack
    other = make_pki(tmp_path / "other-kit")
    with pytest.raises(aiohttp.ClientConnectorCertificateError) as info:
        await fetch(other.console(), port)
    problem = certificate_problem(info.value)
    assert problem is not None
    assert f"refused {HOST}:{port}" in problem
    assert "does not verify against this cluster's CA" in problem


async def test_a_certificate_for_another_address_is_refused(tmp_path: Path) -> None:
    """The kit's CA signed it, but for 127.0.0.2: served on 127.0.0.1 it does not pass."""
    pki = make_pki(tmp_path, address="127.0.0.2")
    app = web.Application()
    app.router.add_get("/api/v1/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, HOST, port, ssl_context=tls_context(pki.cert, pki.key)).start()
    try:
        with pytest.raises(aiohttp.ClientConnectorCertificateError) as info:
            await fetch(pki.console(), port)
        assert "IP address mismatch" in str(certificate_problem(info.value))
    finally:
        await runner.cleanup()


async def test_admission_refuses_a_rack_with_a_foreign_certificate(
    https_rack: tuple[Pki, int], tmp_path: Path
) -> None:
    _, port = https_rack
    tls = peer_tls(make_pki(tmp_path / "other-kit").console())
    keys = ClusterKeys.from_secret("correct horse battery staple, 32+ chars long")
    async with aiohttp.ClientSession(connector=tls.connector()) as session:
        with pytest.raises(AdmissionRefused, match="does not verify against this cluster's CA"):
            await admission.hello(
                session,
                keys,
                "rack-2",
                lambda: pytest.fail("no report is sent: TLS fails first"),
                HOST,
                port,
                tls=tls,
            )


async def test_plain_http_against_a_tls_rack_fails(https_rack: tuple[Pki, int]) -> None:
    """A rack without TLS cannot talk to one with it: a cluster is all TLS or none."""
    _, port = https_rack
    with pytest.raises(aiohttp.ClientError):
        await fetch(ConsoleConfig(), port)


async def test_the_cli_client_verifies_with_the_kits_ca(
    https_rack: tuple[Pki, int], tmp_path: Path
) -> None:
    pki, port = https_rack
    url = f"https://{HOST}:{port}"
    good = ApiClient(url, "token", timeout_s=5, ca=pki.ca)
    assert await asyncio.to_thread(good.request, "GET", "/api/v1/health") == {"rack": "rack-1"}
    without_ca = ApiClient(url, "token", timeout_s=5)
    with pytest.raises(Unavailable, match=r"pass --ca with the kit's ca/ca\.crt"):
        await asyncio.to_thread(without_ca.request, "GET", "/api/v1/health")
    other = make_pki(tmp_path / "other-kit")
    foreign = ApiClient(url, "token", timeout_s=5, ca=other.ca)
    with pytest.raises(Unavailable, match="not a rack of the kit whose CA is"):
        await asyncio.to_thread(foreign.request, "GET", "/api/v1/health")


def test_the_cli_takes_https_and_the_ca_from_a_rack_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pki = make_pki(tmp_path)
    monkeypatch.delenv("MESHCLOUD_API", raising=False)
    monkeypatch.delenv("MESHCLOUD_TOKEN", raising=False)
    monkeypatch.delenv("MESHCLOUD_CA", raising=False)
    config = tmp_path / "daemon.yaml"
    config.write_text(
        "rack: {name: rack-1}\n"
        f"cluster: {{secret: {'k' * 40}}}\n"
        "network: {bind_address: 10.44.0.11, api_port: 8440}\n"
        f"console: {{tls_cert: {pki.cert}, tls_key: {pki.key}, tls_ca: {pki.ca}}}\n"
    )
    client = resolve_client(None, None, config)
    assert client.base_url == "https://10.44.0.11:8440" and client.ca == pki.ca
    monkeypatch.setenv("MESHCLOUD_CA", str(tmp_path / "laptop-ca.crt"))
    assert resolve_client(None, None, config).ca == tmp_path / "laptop-ca.crt"


def test_config_check_loads_the_tls_files(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from meshcloud.cli import main

    pki = make_pki(tmp_path)
    config = tmp_path / "daemon.yaml"
    config.write_text(
        f"rack: {{name: rack-1}}\ncluster: {{secret: {'k' * 40}}}\n"
        f"console: {{tls_cert: {pki.cert}, tls_key: {pki.key}, tls_ca: {tmp_path / 'gone.crt'}}}\n"
    )
    result = CliRunner().invoke(main, ["config", "check", str(config)])
    assert result.exit_code != 0 and "console.tls_ca: cannot load" in result.output
    config.write_text(config.read_text().replace(str(tmp_path / "gone.crt"), str(pki.ca)))
    result = CliRunner().invoke(main, ["config", "check", str(config)])
    assert result.exit_code == 0 and "TLS with the kit's CA" in result.output

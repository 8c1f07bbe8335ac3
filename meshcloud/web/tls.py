"""TLS with the kit's CA: the API port's server side, and calls from rack to rack.

A rack with ``console.tls_cert``, ``tls_key`` and ``tls_ca`` set serves
HTTPS on its API port and calls every other rack (admission hello, users
sync, the leader's view) over HTTPS, trusting only the kit's CA and checking
that the certificate names the address it called: kit certificates carry the
rack's mesh address as an IP SAN (and its name as a DNS SAN), and racks call
each other by mesh address. Verification is never skipped. Without TLS
everything is plain HTTP. A cluster is one or the other on every rack.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from meshcloud.core.errors import ConfigError

if TYPE_CHECKING:
    import aiohttp

    from meshcloud.config import ConsoleConfig


def tls_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """A server context for ``cert``/``key`` (TLS 1.2 or later), or None for plain HTTP."""
    if cert is None or key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"console.tls_cert/tls_key: cannot load {cert} and {key}: {exc};"
            " install the rack's files from the kit or unset both keys"
        ) from exc
    return context


def client_context(ca: Path) -> ssl.SSLContext:
    """A client context that trusts only ``ca`` and checks the peer's address or name."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"console.tls_ca: cannot load {ca}: {exc}; install the kit's ca.crt there"
            " (the same on every rack) or unset the three console.tls_* keys"
        ) from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def rack_url(address: str, api_port: int, https: bool) -> str:
    """The base URL of the rack API at ``address:api_port`` (IPv6 in brackets, no slash)."""
    try:
        ip = ipaddress.ip_address(address)
        host = f"[{ip}]" if ip.version == 6 else str(ip)
    except ValueError:
        host = address
    return f"{'https' if https else 'http'}://{host}:{api_port}"


@dataclass(frozen=True)
class PeerTLS:
    """How this rack calls other racks: plain HTTP (``context`` None) or verified HTTPS."""

    context: ssl.SSLContext | None = None

    def base_url(self, address: str, api_port: int) -> str:
        """The base URL of the rack API at ``address:api_port`` (no trailing slash)."""
        return rack_url(address, api_port, https=self.context is not None)

    def connector(
        self, local_addr: tuple[str, int] | None = None, limit: int = 100
    ) -> aiohttp.TCPConnector:
        """An aiohttp connector that verifies peers against the kit's CA (when TLS is on)."""
        import aiohttp

        return aiohttp.TCPConnector(
            ssl=self.context if self.context is not None else True,
            local_addr=local_addr,
            limit=limit,
        )


PLAIN = PeerTLS()


def peer_tls(console: ConsoleConfig) -> PeerTLS:
    """The rack's client side from its config: verified HTTPS when TLS is set, else plain."""
    if console.tls_ca is None or not console.tls:
        return PLAIN
    return PeerTLS(client_context(console.tls_ca))


def certificate_problem(exc: BaseException) -> str | None:
    """If ``exc`` is a refused peer certificate, a sentence saying so; else None."""
    import aiohttp

    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        error = exc.certificate_error
        reason = getattr(error, "verify_message", None) or str(error)
        return (
            f"refused {exc.host}:{exc.port}: its TLS certificate does not verify against this"
            f" cluster's CA ({reason}); it is not a rack of this kit, or its certificate was"
            " made for another address"
        )
    if isinstance(exc, aiohttp.ClientConnectorSSLError):
        return (
            f"TLS with {exc.host}:{exc.port} failed ({exc.os_error}); does that rack serve"
            " plain HTTP? every rack of a cluster needs console.tls_* set, or none"
        )
    return None

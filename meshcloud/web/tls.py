"""TLS for the API and console port, with the rack certificate from the kit."""

from __future__ import annotations

import ssl
from pathlib import Path

from meshcloud.core.errors import ConfigError


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

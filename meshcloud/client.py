"""A small synchronous client of the v1 API, used by the CLI."""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshcloud.core.errors import (
    Conflict,
    InvalidInput,
    MeshcloudError,
    NotFound,
    Unavailable,
)

DEFAULT_RACK_CONFIG = Path("/etc/meshcloud/daemon.yaml")
_ERRORS: dict[int, type[MeshcloudError]] = {
    400: InvalidInput,
    404: NotFound,
    409: Conflict,
    413: InvalidInput,
    503: Unavailable,
}


@dataclass(frozen=True)
class ApiClient:
    """``base_url`` http:// or https://; with https, ``ca`` (the kit's ca.crt) is the only
    certificate authority trusted (the system's otherwise). Certificates are always checked."""

    base_url: str
    token: str
    timeout_s: float = 15.0
    ca: Path | None = None

    def _context(self) -> ssl.SSLContext | None:
        if not self.base_url.startswith("https://"):
            return None
        if self.ca is None:
            return ssl.create_default_context()
        from meshcloud.web.tls import client_context

        return client_context(self.ca)

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """Send one request; return the decoded JSON or raise a MeshcloudError."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(  # noqa: S310 - the URL is the configured API address
            self.base_url.rstrip("/") + path, data=data, method=method
        )
        req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(  # noqa: S310
                req, timeout=self.timeout_s, context=self._context()
            ) as resp:
                return json.load(resp)
        except urllib.error.HTTPError as exc:
            try:
                message = json.load(exc)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = exc.reason
            raise _ERRORS.get(exc.code, MeshcloudError)(f"{message} (HTTP {exc.code})") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, ssl.SSLCertVerificationError):
                hint = (
                    "pass --ca with the kit's ca/ca.crt (or set MESHCLOUD_CA)"
                    if self.ca is None
                    else f"it is not a rack of the kit whose CA is {self.ca}"
                )
                raise Unavailable(
                    f"refused the certificate of {self.base_url}: {reason.verify_message}; {hint}"
                ) from None
            raise Unavailable(
                f"cannot reach the API at {self.base_url}: {exc}; is the rack up?"
                " (set --api or MESHCLOUD_API)"
            ) from None


def resolve_client(
    api: str | None, token: str | None, rack_config: Path | None, ca: Path | None = None
) -> ApiClient:
    """Find the API address, token and CA: flags, then environment, then a rack's config file."""
    api = api or os.environ.get("MESHCLOUD_API")
    token = token or os.environ.get("MESHCLOUD_TOKEN")
    ca_env = os.environ.get("MESHCLOUD_CA")
    ca = ca or (Path(ca_env) if ca_env else None)
    config_path = rack_config or (DEFAULT_RACK_CONFIG if DEFAULT_RACK_CONFIG.exists() else None)
    if (api is None or token is None or ca is None) and config_path is not None:
        from meshcloud.config import load_config
        from meshcloud.web.auth import api_token
        from meshcloud.web.tls import rack_url

        cfg = load_config(config_path)
        net = cfg.network
        api = api or rack_url(net.bind_address, net.api_port, https=cfg.console.tls)
        ca = ca or cfg.console.tls_ca
        token = token or api_token(cfg.read_secret())
    if api is None or token is None:
        raise InvalidInput(
            "no API address or token: pass --api URL and --token TOKEN, set MESHCLOUD_API and"
            " MESHCLOUD_TOKEN, or run on a rack (reads /etc/meshcloud/daemon.yaml)"
        )
    if not api.startswith(("http://", "https://")):
        raise InvalidInput(f"--api {api!r}: give a URL, e.g. https://10.44.0.11:8440")
    return ApiClient(api, token, ca=ca)

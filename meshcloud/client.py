"""A small synchronous client of the v1 API, used by the CLI."""

from __future__ import annotations

import json
import os
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
    base_url: str
    token: str
    timeout_s: float = 15.0

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
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # noqa: S310
                return json.load(resp)
        except urllib.error.HTTPError as exc:
            try:
                message = json.load(exc)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = exc.reason
            raise _ERRORS.get(exc.code, MeshcloudError)(f"{message} (HTTP {exc.code})") from None
        except (urllib.error.URLError, OSError) as exc:
            raise Unavailable(
                f"cannot reach the API at {self.base_url}: {exc}; is the rack up?"
                " (set --api or MESHCLOUD_API)"
            ) from None


def resolve_client(api: str | None, token: str | None, rack_config: Path | None) -> ApiClient:
    """Find the API address and token: flags, then environment, then a rack's config file."""
    api = api or os.environ.get("MESHCLOUD_API")
    token = token or os.environ.get("MESHCLOUD_TOKEN")
    config_path = rack_config or (DEFAULT_RACK_CONFIG if DEFAULT_RACK_CONFIG.exists() else None)
    if (api is None or token is None) and config_path is not None:
        from meshcloud.config import load_config
        from meshcloud.web.auth import api_token

        cfg = load_config(config_path)
        api = api or f"http://{cfg.network.bind_address}:{cfg.network.api_port}"
        token = token or api_token(cfg.read_secret())
    if api is None or token is None:
        raise InvalidInput(
            "no API address or token: pass --api URL and --token TOKEN, set MESHCLOUD_API and"
            " MESHCLOUD_TOKEN, or run on a rack (reads /etc/meshcloud/daemon.yaml)"
        )
    return ApiClient(api, token)

"""Talk to the racks' API from the lab's observer namespace (tests, benchmarks, the demo)."""

from __future__ import annotations

import http.client
import json
import ssl
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from meshcloud.core.errors import MeshcloudError
from meshcloud.lab.lab import Lab
from meshcloud.lab.plan import API_PORT
from meshcloud.web.auth import api_token
from meshcloud.web.tls import client_context


class ApiError(MeshcloudError):
    """A request to a rack's API failed (connection or HTTP status)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _NsConnection(http.client.HTTPConnection):
    """An HTTP(S) connection whose socket is made in the lab's observer namespace.

    With ``context`` the socket speaks TLS, and the rack's certificate must
    verify against the context's CA and name ``host`` (the rack's lab address).
    """

    def __init__(
        self, lab: Lab, host: str, port: int, timeout: float, context: ssl.SSLContext | None
    ) -> None:
        super().__init__(host, port, timeout=timeout)
        self.lab = lab
        self.context = context

    def connect(self) -> None:
        sock = self.lab.socket(None)
        sock.settimeout(self.timeout)
        try:
            sock.connect((self.host, self.port))
        except OSError:
            sock.close()
            raise
        if self.context is not None:
            try:
                sock = self.context.wrap_socket(sock, server_hostname=self.host)
            except OSError:
                sock.close()
                raise
        self.sock = sock


class LabApi:
    """Requests to any rack's v1 API, authenticated with the lab's cluster secret.

    A lab up with ``tls=True`` is spoken to over HTTPS, trusting ``ca`` (default:
    the lab's CA, :attr:`Lab.ca_file`) and nothing else.
    """

    def __init__(self, lab: Lab, timeout_s: float = 10.0, ca: Path | None = None) -> None:
        self.lab = lab
        self.timeout_s = timeout_s
        self.token = api_token(lab.secret_file.read_text().strip())
        if ca is None and lab.tls:
            ca = lab.ca_file
        self.context = client_context(ca) if ca is not None else None

    @property
    def scheme(self) -> str:
        return "http" if self.context is None else "https"

    def request(self, rack: str, method: str, path: str, body: Any = None) -> Any:
        """Send one request to ``rack``; return the decoded JSON or raise ApiError."""
        ip = self.lab.rack(rack).ip
        conn = _NsConnection(self.lab, ip, API_PORT, self.timeout_s, self.context)
        headers = {"Authorization": f"Bearer {self.token}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ApiError(f"{rack}: {method} {path}: {exc}") from None
        finally:
            conn.close()
        try:
            doc = json.loads(raw) if raw else None
        except ValueError:
            raise ApiError(f"{rack}: {method} {path}: not JSON", resp.status) from None
        if resp.status >= 400:
            message = (
                doc.get("error", {}).get("message")
                if isinstance(doc, dict)
                else raw[:200].decode(errors="replace")
            )
            raise ApiError(f"{rack}: {method} {path}: {resp.status} {message}", resp.status)
        return doc

    def get(self, rack: str, path: str) -> Any:
        return self.request(rack, "GET", path)

    def cluster(self, rack: str) -> dict[str, Any]:
        doc: dict[str, Any] = self.get(rack, "/api/v1/cluster")
        return doc

    def health(self, rack: str) -> dict[str, Any]:
        doc: dict[str, Any] = self.get(rack, "/api/v1/health")
        return doc

    def put_appliance(self, rack: str, spec: dict[str, Any]) -> Any:
        return self.request(rack, "PUT", f"/api/v1/appliances/{spec['name']}", spec)

    def delete_appliance(self, rack: str, name: str) -> Any:
        return self.request(rack, "DELETE", f"/api/v1/appliances/{name}")

    # -- probes used by tests and benchmarks ------------------------------------------------

    def health_or_none(self, rack: str) -> dict[str, Any] | None:
        try:
            return self.health(rack)
        except ApiError:
            return None

    def one_cluster(self, racks: list[str]) -> str | None:
        """The cluster uuid if every rack answers from one cluster whose map holds all ``racks``.

        The racks are asked at once (one thread each), so that a probe takes one
        round trip, not one per rack: benchmarks time the cluster, not the prober.
        """

        def ask(rack: str) -> dict[str, Any] | None:
            try:
                return self.cluster(rack)
            except ApiError:
                return None

        with ThreadPoolExecutor(max_workers=max(1, len(racks))) as pool:
            docs = list(pool.map(ask, racks))
        ids = set()
        for doc in docs:
            if doc is None or sorted(doc["racks"]) != sorted(racks):
                return None
            ids.add(doc["cluster_id"])
        return ids.pop() if len(ids) == 1 else None

    def try_write(self, rack: str, name: str) -> bool:
        """Store a small appliance spec through ``rack``; True if it was acknowledged."""
        try:
            self.put_appliance(rack, {"name": name, "image": "demo", "replicas": 0})
        except ApiError:
            return False
        return True

    def appliances(self, rack: str) -> set[str]:
        return set(self.cluster(rack)["appliances"])

    def leader_of(self, racks: list[str]) -> str | None:
        """The leader every reachable rack agrees on, if any."""
        seen = {h.get("leader") for r in racks if (h := self.health_or_none(r)) is not None}
        if len(seen) == 1:
            (leader,) = seen
            return leader if isinstance(leader, str) else None
        return None

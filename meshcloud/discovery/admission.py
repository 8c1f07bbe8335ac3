"""Admission over HTTP: ``POST /api/v1/peer/hello``, its handler and its client.

A peer is admitted only when it proves it holds the cluster secret (see
:mod:`meshcloud.discovery.proof` for the exchange). The handler is mounted
on the rack's API application with :func:`add_routes`; :func:`hello` is the
client. Both sides exchange a :class:`RackReport` (formation status,
members, leader hint, the racks each has admitted), authenticated by MACs
bound to the two fresh nonces, both rack names and the cluster id.

Bodies are capped (:data:`MAX_BODY_BYTES`); malformed JSON and fields get
400 with a message naming the problem; a wrong cluster, a failed proof, a
replayed or unknown challenge get 403; a rack claiming our own name gets
409. Nothing here blocks the event loop.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from meshcloud.core.errors import InvalidInput, MeshcloudError
from meshcloud.core.names import validate_name
from meshcloud.discovery import proof
from meshcloud.discovery.proof import ChallengeBook, ClusterKeys
from meshcloud.discovery.records import RackReport, report_from_json, report_to_json
from meshcloud.web.errors import error_response
from meshcloud.web.tls import PLAIN, PeerTLS, certificate_problem

log = logging.getLogger(__name__)

HELLO_PATH = "/api/v1/peer/hello"
MAX_BODY_BYTES = 64 * 1024
LOG_REPEAT_S = 60.0


class AdmissionRefused(MeshcloudError):
    """The other side did not prove it holds the cluster secret, or refused our proof."""


class AdmissionFailed(MeshcloudError):
    """The exchange could not complete (network, timeout, malformed answer); retry later."""


@dataclass(frozen=True)
class AdmittedPeer:
    """A rack that proved it holds the cluster secret, and what it reported.

    ``observed_address`` is the address we reached it at (or that its request
    came from); ``report.address`` is the one it says it binds to.
    ``via`` is how we first reached it: "mdns", "static", "gossip" (a peer knew it) or
    "inbound" (it knocked at us).
    """

    report: RackReport
    observed_address: str
    via: str

    @property
    def name(self) -> str:
        return self.report.name

    @property
    def site(self) -> str:
        return self.report.site

    @property
    def address(self) -> str:
        return self.report.address

    @property
    def api_port(self) -> int:
        return self.report.api_port

    @property
    def raft_port(self) -> int:
        return self.report.raft_port


class BodyTooLarge(InvalidInput):
    """A request or answer body is larger than the limit."""


async def read_limited(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """Read a whole body of at most ``limit`` bytes; raise BodyTooLarge beyond that."""
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = await stream.read(min(65536, limit + 1 - total))
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > limit:
            raise BodyTooLarge(f"body exceeds {limit} bytes")
        chunks.append(chunk)


def parse_json_object(body: bytes) -> dict[str, Any]:
    """Decode a JSON object; raise InvalidInput with a clear message otherwise."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise InvalidInput("body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidInput("body must be a JSON object")
    return data


def _field(doc: dict[str, Any], key: str) -> Any:
    if key not in doc:
        raise InvalidInput(f"missing field {key!r}")
    return doc[key]


def _nonce(doc: dict[str, Any], key: str) -> str:
    value = _field(doc, key)
    if not proof.is_nonce(value):
        raise InvalidInput(f"{key} must be {2 * proof.NONCE_BYTES} lowercase hex digits")
    assert isinstance(value, str)
    return value


class HelloForbidden(Exception):
    """A hello that fails the proof, names another cluster or a used challenge (HTTP 403)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class HelloNameTaken(Exception):
    """A hello from a rack that claims this rack's own name (HTTP 409)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class AdmissionServer:
    """Answers hello requests for one rack.

    ``report`` builds this rack's current report (called after ``on_admitted``,
    so that the report already counts the new peer); ``on_admitted`` is
    called, synchronously, for every client that proved itself. ``clock`` is
    a monotonic clock (seconds).
    """

    def __init__(
        self,
        keys: ClusterKeys,
        rack_name: str,
        report: Callable[[], RackReport],
        on_admitted: Callable[[AdmittedPeer], None],
        *,
        challenge_ttl_s: float = 10.0,
        max_pending: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.keys = keys
        self.rack_name = validate_name("rack", rack_name)
        self.report = report
        self.on_admitted = on_admitted
        self.book = ChallengeBook(ttl_s=challenge_ttl_s, max_entries=max_pending)
        self.clock = clock
        self._logged: dict[tuple[str, str], tuple[float, int]] = {}

    def _log_refusal(self, level: int, remote: str, message: str) -> None:
        """Log a refusal once per remote and message per LOG_REPEAT_S (a flood stays one line)."""
        key = (remote, message)
        now = self.clock()
        last = self._logged.get(key)
        if last is not None and now - last[0] < LOG_REPEAT_S:
            self._logged[key] = (last[0], last[1] + 1)
            return
        if len(self._logged) >= 1024:
            self._logged.clear()
        self._logged[key] = (now, 0)
        repeats = f" ({last[1]} more like it since)" if last and last[1] else ""
        log.log(level, "hello from %s refused: %s%s", remote, message, repeats)

    async def handle(self, request: web.Request) -> web.Response:
        """The aiohttp handler of ``POST /api/v1/peer/hello``."""
        remote = request.remote or "?"
        try:
            if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
                raise BodyTooLarge(f"body exceeds {MAX_BODY_BYTES} bytes")
            body = await read_limited(request.content, MAX_BODY_BYTES)
            doc = parse_json_object(body)
            answer = self.answer(doc, remote)
        except BodyTooLarge as exc:
            self._log_refusal(logging.WARNING, remote, str(exc))
            return error_response(413, f"hello too large: {exc}")
        except InvalidInput as exc:
            self._log_refusal(logging.INFO, remote, str(exc))
            return error_response(400, f"malformed hello: {exc}")
        except HelloForbidden as exc:
            self._log_refusal(logging.WARNING, remote, exc.message)
            return error_response(403, exc.message)
        except HelloNameTaken as exc:
            self._log_refusal(logging.ERROR, remote, exc.message)
            return error_response(409, exc.message)
        return web.json_response(answer)

    def answer(self, doc: dict[str, Any], remote: str) -> dict[str, Any]:
        """Answer one decoded hello message (sync: no await between check and report)."""
        if _field(doc, "protocol") != proof.PROTOCOL_VERSION:
            raise InvalidInput(f"protocol must be {proof.PROTOCOL_VERSION}")
        if _field(doc, "cluster_id") != self.keys.cluster_id:
            raise HelloForbidden(
                "this rack belongs to another cluster (cluster id differs): check that both"
                " racks were flashed from the same kit"
            )
        client = validate_name("client rack", _field(doc, "client"))
        if client == self.rack_name:
            raise HelloNameTaken(
                f"rack name {client} is this rack's own name: two racks must not share a name"
            )
        step = _field(doc, "step")
        if step == "challenge":
            return self._challenge(doc, client)
        if step == "prove":
            return self._prove(doc, client, remote)
        raise InvalidInput("step must be 'challenge' or 'prove'")

    def _challenge(self, doc: dict[str, Any], client: str) -> dict[str, Any]:
        client_nonce = _nonce(doc, "client_nonce")
        given = _field(doc, "mac")
        if not proof.macs_equal(proof.challenge_mac(self.keys, client, client_nonce), given):
            raise HelloForbidden(
                "the challenge does not prove the cluster secret: the sender is not part of this"
                " cluster (or holds a different secret)"
            )
        now = self.clock()
        if not self.book.remember_client_nonce(client_nonce, now):
            raise HelloForbidden("replayed challenge (client nonce already used): start again")
        server_nonce = proof.new_nonce()
        self.book.issue(client, client_nonce, server_nonce, now)
        return {
            "protocol": proof.PROTOCOL_VERSION,
            "server": self.rack_name,
            "server_nonce": server_nonce,
            "proof": proof.server_proof(
                self.keys, client, self.rack_name, client_nonce, server_nonce
            ),
        }

    def _prove(self, doc: dict[str, Any], client: str, remote: str) -> dict[str, Any]:
        client_nonce = _nonce(doc, "client_nonce")
        server_nonce = _nonce(doc, "server_nonce")
        if _field(doc, "server") != self.rack_name:
            raise HelloForbidden(f"this is rack {self.rack_name}, not {str(doc['server'])[:63]!r}")
        report_text = _field(doc, "report")
        if not isinstance(report_text, str):
            raise InvalidInput("report must be a string holding JSON")
        pending = self.book.take(server_nonce, self.clock())
        if pending is None:
            raise HelloForbidden("unknown, expired or already used challenge: start again")
        if pending.client != client or pending.client_nonce != client_nonce:
            raise HelloForbidden("the proof does not match the challenge: start again")
        expected = proof.client_proof(
            self.keys, client, self.rack_name, client_nonce, server_nonce, report_text
        )
        if not proof.macs_equal(expected, _field(doc, "proof")):
            raise HelloForbidden("the proof is wrong: the sender does not hold the cluster secret")
        report = report_from_json(report_text)  # parsed only once authenticated
        if report.name != client:
            raise InvalidInput(f"report names rack {report.name}, not {client}")
        self.on_admitted(AdmittedPeer(report=report, observed_address=remote, via="inbound"))
        mine = report_to_json(self.report())
        return {
            "protocol": proof.PROTOCOL_VERSION,
            "report": mine,
            "mac": proof.server_report_mac(
                self.keys, client, self.rack_name, client_nonce, server_nonce, mine
            ),
        }


def add_routes(app: web.Application, server: AdmissionServer) -> None:
    """Register ``POST /api/v1/peer/hello`` on ``app``."""
    app.router.add_post(HELLO_PATH, server.handle)


def hello_url(address: str, api_port: int, tls: PeerTLS = PLAIN) -> str:
    return tls.base_url(address, api_port) + HELLO_PATH


async def _post(session: aiohttp.ClientSession, url: str, doc: dict[str, Any]) -> dict[str, Any]:
    try:
        async with session.post(url, json=doc) as resp:
            body = await read_limited(resp.content, MAX_BODY_BYTES)
            status = resp.status
    except InvalidInput as exc:
        raise AdmissionFailed(f"{url}: answer {exc}") from None
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        problem = certificate_problem(exc)
        if isinstance(exc, aiohttp.ClientConnectorCertificateError) and problem is not None:
            raise AdmissionRefused(f"{url}: {problem}") from None
        raise AdmissionFailed(f"{url}: {problem or f'{type(exc).__name__}: {exc}'}") from None
    try:
        answer = parse_json_object(body)
    except InvalidInput as exc:
        raise AdmissionFailed(f"{url}: HTTP {status}, {exc}") from None
    if status != 200:
        error = answer.get("error")
        message = error.get("message") if isinstance(error, dict) else None
        text = str(message)[:300] if message is not None else "no message"
        if status in (403, 409):
            raise AdmissionRefused(f"{url} refused us: {text}")
        raise AdmissionFailed(f"{url}: HTTP {status}: {text}")
    return answer


async def hello(
    session: aiohttp.ClientSession,
    keys: ClusterKeys,
    own_name: str,
    report: Callable[[], RackReport],
    address: str,
    api_port: int,
    *,
    via: str = "static",
    tls: PeerTLS = PLAIN,
) -> AdmittedPeer:
    """Run the admission exchange with the rack at ``address:api_port``.

    ``report`` builds our report just before it is sent. Returns the admitted
    peer; raises AdmissionRefused if the other side cannot prove the secret
    (or refuses ours, or its TLS certificate is not from the kit's CA) and
    AdmissionFailed on network or protocol trouble. ``tls`` says http or https.
    """
    url = hello_url(address, api_port, tls)
    client_nonce = proof.new_nonce()
    first = await _post(
        session,
        url,
        {
            "protocol": proof.PROTOCOL_VERSION,
            "step": "challenge",
            "cluster_id": keys.cluster_id,
            "client": own_name,
            "client_nonce": client_nonce,
            "mac": proof.challenge_mac(keys, own_name, client_nonce),
        },
    )
    try:
        server = validate_name("server rack", first.get("server"))
    except InvalidInput as exc:
        raise AdmissionFailed(f"{url}: {exc}") from None
    server_nonce = first.get("server_nonce")
    if not proof.is_nonce(server_nonce):
        raise AdmissionFailed(f"{url}: server_nonce is missing or malformed")
    assert isinstance(server_nonce, str)
    if not proof.macs_equal(
        proof.server_proof(keys, own_name, server, client_nonce, server_nonce),
        first.get("proof"),
    ):
        raise AdmissionRefused(f"{url}: rack {server!r} did not prove it holds the cluster secret")
    if server == own_name:
        raise AdmissionRefused(f"{url}: that is a rack with our own name {own_name}")
    mine = report_to_json(report())
    second = await _post(
        session,
        url,
        {
            "protocol": proof.PROTOCOL_VERSION,
            "step": "prove",
            "cluster_id": keys.cluster_id,
            "client": own_name,
            "server": server,
            "client_nonce": client_nonce,
            "server_nonce": server_nonce,
            "report": mine,
            "proof": proof.client_proof(keys, own_name, server, client_nonce, server_nonce, mine),
        },
    )
    theirs = second.get("report")
    expected = proof.server_report_mac(
        keys,
        own_name,
        server,
        client_nonce,
        server_nonce,
        theirs if isinstance(theirs, str) else "",
    )
    if not isinstance(theirs, str) or not proof.macs_equal(expected, second.get("mac")):
        raise AdmissionRefused(f"{url}: rack {server}'s report is not authenticated")
    try:
        peer_report = report_from_json(theirs)
    except InvalidInput as exc:
        raise AdmissionFailed(f"{url}: rack {server} sent a bad report: {exc}") from None
    if peer_report.name != server:
        raise AdmissionFailed(f"{url}: report names {peer_report.name}, not {server}")
    return AdmittedPeer(report=peer_report, observed_address=address, via=via)

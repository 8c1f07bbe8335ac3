"""The admission proof: keys from the cluster secret, MACs over transcripts, single-use nonces.

Pure functions (plus :func:`new_nonce`, which reads the OS random source).
The exchange, run over HTTP by :mod:`meshcloud.discovery.admission`::

    client -> server  challenge: cluster_id, client, client_nonce,
                      mac = MAC("challenge", cluster_id, client, client_nonce)
    server -> client  server, server_nonce,
                      proof = MAC("server", cluster_id, client, server, client_nonce, server_nonce)
    client -> server  prove: ..., report,
                      proof = MAC("client", cluster_id, client, server, client_nonce, server_nonce,
                                  report)
    server -> client  report, mac = MAC("server-report", ..., client_nonce, server_nonce, report)

Every MAC is HMAC-SHA256 under a key derived from the secret, over a
length-prefixed transcript that starts with a distinct label, so that no
message can be replayed as another kind, reflected back, or re-attributed
to other racks. Each side proves itself over the *other* side's fresh
nonce; the server's nonce is single-use (:class:`ChallengeBook`), so a
recorded exchange cannot be replayed. The challenge MAC only keeps strangers
from filling the server's table of pending challenges; it proves nothing
by itself (it can be replayed, and a replayed client nonce is refused).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections import OrderedDict
from dataclasses import dataclass

PROTOCOL_VERSION = 1
NONCE_BYTES = 32
CLUSTER_ID_HEX_LEN = 32
MAC_HEX_LEN = 64
_HEX_RE = re.compile(r"^[0-9a-f]+$")

LABEL_CHALLENGE = "meshcloud admission v1 challenge"
LABEL_SERVER = "meshcloud admission v1 server proof"
LABEL_CLIENT = "meshcloud admission v1 client proof"
LABEL_SERVER_REPORT = "meshcloud admission v1 server report"


@dataclass(frozen=True)
class ClusterKeys:
    """What a rack derives from the cluster secret: a public id and a private MAC key."""

    cluster_id: str
    admission_key: bytes = b""

    def __repr__(self) -> str:  # never print the key
        return f"ClusterKeys(cluster_id={self.cluster_id!r})"

    @classmethod
    def from_secret(cls, secret: str) -> ClusterKeys:
        """Derive the cluster id (public, announced over mDNS) and the admission key."""
        if not secret:
            raise ValueError("the cluster secret is empty")
        raw = secret.encode()
        cluster_id = hmac.new(raw, b"meshcloud cluster id", hashlib.sha256).hexdigest()
        key = hmac.new(raw, b"meshcloud admission key v1", hashlib.sha256).digest()
        return cls(cluster_id=cluster_id[:CLUSTER_ID_HEX_LEN], admission_key=key)


def transcript(label: str, *fields: str) -> bytes:
    """An unambiguous encoding: each part as a 4-byte big-endian length and its UTF-8 bytes."""
    out = bytearray()
    for part in (label, *fields):
        data = part.encode()
        out += len(data).to_bytes(4, "big") + data
    return bytes(out)


def mac(key: bytes, label: str, *fields: str) -> str:
    """HMAC-SHA256 of the transcript, as 64 lowercase hex digits."""
    return hmac.new(key, transcript(label, *fields), hashlib.sha256).hexdigest()


def macs_equal(expected: str, given: object) -> bool:
    """Constant-time comparison; anything but a string of the right length is unequal."""
    if not isinstance(given, str) or len(given) != len(expected) or not given.isascii():
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


def new_nonce() -> str:
    """A fresh random nonce: 32 bytes from the OS, as 64 hex digits."""
    return secrets.token_hex(NONCE_BYTES)


def is_hex(value: object, length: int) -> bool:
    """True for a lowercase hex string of exactly ``length`` digits."""
    return isinstance(value, str) and len(value) == length and bool(_HEX_RE.match(value))


def is_nonce(value: object) -> bool:
    return is_hex(value, 2 * NONCE_BYTES)


def challenge_mac(keys: ClusterKeys, client: str, client_nonce: str) -> str:
    return mac(keys.admission_key, LABEL_CHALLENGE, keys.cluster_id, client, client_nonce)


def server_proof(
    keys: ClusterKeys, client: str, server: str, client_nonce: str, server_nonce: str
) -> str:
    return mac(
        keys.admission_key,
        LABEL_SERVER,
        keys.cluster_id,
        client,
        server,
        client_nonce,
        server_nonce,
    )


def client_proof(
    keys: ClusterKeys,
    client: str,
    server: str,
    client_nonce: str,
    server_nonce: str,
    report: str,
) -> str:
    return mac(
        keys.admission_key,
        LABEL_CLIENT,
        keys.cluster_id,
        client,
        server,
        client_nonce,
        server_nonce,
        report,
    )


def server_report_mac(
    keys: ClusterKeys,
    client: str,
    server: str,
    client_nonce: str,
    server_nonce: str,
    report: str,
) -> str:
    return mac(
        keys.admission_key,
        LABEL_SERVER_REPORT,
        keys.cluster_id,
        client,
        server,
        client_nonce,
        server_nonce,
        report,
    )


@dataclass(frozen=True)
class PendingChallenge:
    client: str
    client_nonce: str
    expires_at: float


class ChallengeBook:
    """The server's single-use challenges, bounded in size and age; time is passed in.

    ``remember_client_nonce`` refuses a client nonce seen within ``ttl_s``;
    ``issue`` stores a server nonce; ``take`` removes and returns it (once).
    When full, the oldest entries are dropped: a flood can only make
    legitimate handshakes retry, never let a stranger in.
    """

    def __init__(self, ttl_s: float = 10.0, max_entries: int = 1024) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._pending: OrderedDict[str, PendingChallenge] = OrderedDict()
        self._seen_client_nonces: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pending)

    def _expire(self, now: float) -> None:
        for book in (self._pending, self._seen_client_nonces):
            while book:
                first = next(iter(book))
                entry = book[first]
                expires_at = entry.expires_at if isinstance(entry, PendingChallenge) else entry
                if expires_at > now and len(book) <= self.max_entries:
                    break
                del book[first]

    def remember_client_nonce(self, client_nonce: str, now: float) -> bool:
        """Record a client nonce; False if it was already seen (a replayed challenge)."""
        self._expire(now)
        if client_nonce in self._seen_client_nonces:
            return False
        self._seen_client_nonces[client_nonce] = now + self.ttl_s
        self._expire(now)
        return True

    def issue(self, client: str, client_nonce: str, server_nonce: str, now: float) -> None:
        self._pending[server_nonce] = PendingChallenge(client, client_nonce, now + self.ttl_s)
        self._expire(now)

    def take(self, server_nonce: str, now: float) -> PendingChallenge | None:
        """The pending challenge for ``server_nonce``, removed; None if unknown, used or expired."""
        self._expire(now)
        return self._pending.pop(server_nonce, None)

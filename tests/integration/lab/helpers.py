"""Small probes for lab tests: TCP, HTTP and multicast from inside a rack."""

from __future__ import annotations

import json
import socket
import struct
import time
from typing import Any

from meshcloud.lab.lab import Lab

API_PORT = 8440
ECHO_PORT = 7440  # the stand-in daemon echoes on the Raft port


def connect(lab: Lab, src: str | None, ip: str, port: int, timeout: float = 2.0) -> socket.socket:
    """A connected TCP socket from rack ``src`` (None: the observer) to ip:port."""
    sock = lab.socket(src)
    sock.settimeout(timeout)
    try:
        sock.connect((ip, port))
    except BaseException:
        sock.close()
        raise
    return sock


def can_connect(lab: Lab, src: str | None, ip: str, port: int, timeout: float = 1.0) -> bool:
    try:
        connect(lab, src, ip, port, timeout).close()
    except OSError:
        return False
    return True


def connect_time(lab: Lab, src: str, ip: str, port: int) -> float:
    """Seconds a TCP handshake from ``src`` to ip:port takes (one round trip)."""
    sock = lab.socket(src)
    sock.settimeout(10.0)
    try:
        start = time.monotonic()
        sock.connect((ip, port))
        return time.monotonic() - start
    finally:
        sock.close()


def health(lab: Lab, src: str | None, ip: str, timeout: float = 2.0) -> dict[str, Any]:
    """GET /health from the stand-in daemon at ``ip``."""
    sock = connect(lab, src, ip, API_PORT, timeout)
    with sock:
        sock.sendall(b"GET /health HTTP/1.0\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), head
    return dict(json.loads(body))


def multicast_receiver(lab: Lab, rack: str, group: str, port: int) -> socket.socket:
    """A UDP socket in ``rack`` that joined ``group`` on the rack's lab address."""
    sock = lab.socket(rack, socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("", port))
    mreq = struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton(lab.rack(rack).ip))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    sock.settimeout(3.0)
    return sock


def multicast_send(lab: Lab, rack: str, group: str, port: int, payload: bytes) -> None:
    sock = lab.socket(rack, socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        sock.sendto(payload, (group, port))

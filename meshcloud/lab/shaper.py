"""A userspace delay line for kernels without ``sch_netem``.

The rack's namespace sends its outgoing packets to NFQUEUE queue 0 (see
:mod:`meshcloud.lab.linkspec`); this process binds that queue over
nfnetlink and accepts each packet ``--delay-ms`` after it was queued. The
delay is constant, so packets leave in order and one batch verdict ("accept
every packet up to id N") releases all that are due.

The process lives in the lab's bridge namespace (so a rack power cut does
not kill it); only its netlink socket is opened inside the rack's namespace.
Run: ``python -m meshcloud.lab.shaper --netns NS --queue 0 --delay-ms 50``.

Message layouts follow ``linux/netfilter/nfnetlink_queue.h``; the pure
encoders and the parser are unit-tested.
"""

from __future__ import annotations

import argparse
import collections
import os
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterator
from types import FrameType

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQA_CFG_F_GSO = 4
NF_ACCEPT = 1
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2
NLA_TYPE_MASK = 0x3FFF
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
SO_RCVBUFFORCE = 33
QUEUE_MAXLEN = 20_000

_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("!BBH")
_NLATTR = struct.Struct("=HH")


def _align(n: int) -> int:
    return (n + 3) & ~3


def nlattr(attr_type: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    length = _NLATTR.size + len(payload)
    return _NLATTR.pack(length, attr_type) + payload + b"\0" * (_align(length) - length)


def nfq_message(msg_type: int, queue: int, attrs: bytes, seq: int, flags: int = 0) -> bytes:
    """A complete nfnetlink_queue message for ``queue``."""
    body = _NFGENMSG.pack(socket.AF_UNSPEC, 0, queue) + attrs
    return (
        _NLMSGHDR.pack(
            _NLMSGHDR.size + len(body),
            (NFNL_SUBSYS_QUEUE << 8) | msg_type,
            NLM_F_REQUEST | flags,
            seq,
            0,
        )
        + body
    )


def bind_messages(queue: int) -> list[bytes]:
    """Messages that bind ``queue``, ask for metadata only, and enlarge the queue."""
    cmd = nlattr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, socket.AF_INET))
    params = nlattr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META))
    maxlen = nlattr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_MAXLEN))
    flags = nlattr(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_GSO)) + nlattr(
        NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_GSO)
    )
    return [
        nfq_message(NFQNL_MSG_CONFIG, queue, cmd, seq=1, flags=NLM_F_ACK),
        nfq_message(NFQNL_MSG_CONFIG, queue, params + maxlen, seq=2, flags=NLM_F_ACK),
        nfq_message(NFQNL_MSG_CONFIG, queue, flags, seq=3, flags=NLM_F_ACK),
    ]


def batch_accept_message(queue: int, packet_id: int, seq: int) -> bytes:
    """Accept every queued packet whose id is at most ``packet_id``."""
    verdict = nlattr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packet_id))
    return nfq_message(NFQNL_MSG_VERDICT_BATCH, queue, verdict, seq)


def parse_messages(data: bytes) -> Iterator[tuple[str, int]]:
    """Yield ``("packet", id)`` for queued packets and ``("error", errno)`` for errors/acks."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, msg_type, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            return
        body = data[offset + _NLMSGHDR.size : offset + length]
        if msg_type == NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", body, 0)
            yield ("error", -err)
        elif msg_type == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            packet_id = _packet_id(body[_NFGENMSG.size :])
            if packet_id is not None:
                yield ("packet", packet_id)
        offset += _align(length)


def _packet_id(attrs: bytes) -> int | None:
    offset = 0
    while offset + _NLATTR.size <= len(attrs):
        length, attr_type = _NLATTR.unpack_from(attrs, offset)
        if length < _NLATTR.size:
            return None
        if attr_type & NLA_TYPE_MASK == NFQA_PACKET_HDR and length >= _NLATTR.size + 4:
            (packet_id,) = struct.unpack_from("!I", attrs, offset + _NLATTR.size)
            return int(packet_id)
        offset += _align(length)
    return None


def open_queue_socket(netns: str | None, queue: int) -> socket.socket:
    """A netlink socket bound to ``queue`` inside ``netns`` (the current one when None)."""
    if netns is None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    else:
        from meshcloud.lab.netns import thread_in_netns

        with thread_in_netns(netns):
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.bind((0, 0))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 * 1024 * 1024)
        sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
    except OSError:
        pass
    for message in bind_messages(queue):
        sock.send(message)
        for kind, value in parse_messages(sock.recv(65536)):
            if kind == "error" and value != 0:
                raise OSError(value, f"binding NFQUEUE {queue}: {os.strerror(value)}")
    return sock


def serve(sock: socket.socket, queue: int, delay_s: float) -> None:
    """Accept each queued packet ``delay_s`` after it arrived; runs until signalled."""
    pending: collections.deque[tuple[float, int]] = collections.deque()
    seq = 10
    while True:
        now = time.monotonic()
        due_id = None
        while pending and pending[0][0] <= now:
            due_id = pending.popleft()[1]
        if due_id is not None:
            seq += 1
            sock.send(batch_accept_message(queue, due_id, seq))
        timeout = max(0.0, pending[0][0] - now) if pending else None
        readable, _, _ = select.select([sock], [], [], timeout)
        if not readable:
            continue
        try:
            data = sock.recv(1 << 20)
        except OSError:
            continue  # ENOBUFS: a later batch verdict still releases the unseen packets
        arrived = time.monotonic() + delay_s
        for kind, value in parse_messages(data):
            if kind == "packet":
                pending.append((arrived, value))


def _stop(_signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--netns", help="namespace whose queue to serve (default: current)")
    parser.add_argument("--queue", type=int, default=0)
    parser.add_argument("--delay-ms", type=float, required=True)
    args = parser.parse_args(argv)
    if not 0 <= args.delay_ms <= 10_000 or not 0 <= args.queue <= 65535:
        parser.error("--delay-ms must be 0..10000 and --queue 0..65535")
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    sock = open_queue_socket(args.netns, args.queue)
    print(f"shaper: queue {args.queue} in {args.netns}: delay {args.delay_ms} ms", flush=True)
    try:
        serve(sock, args.queue, args.delay_ms / 1000)
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

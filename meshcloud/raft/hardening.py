"""pysyncobj 0.3.17, hardened: the corrections meshcloud needs to trust its Raft library.

pysyncobj is not safe as shipped (see docs/raft.md for the measurements,
the causes found in its source and the tests). This module subclasses its
classes and replaces the faulty behaviour with code written here; it
refuses to load against any other pysyncobj version, because it relies on
that version's private names.

==  =====================================================================
a   Lost acknowledged writes: a follower advanced its commit index over its
    own, unverified log while receiving snapshot chunks (or empty
    heartbeats while the leader was busy dumping). Fixed in
    :meth:`HardenedSyncObj._on_append_entries`: the commit index only moves
    up to the last entry verified to match the leader's log; matching
    entries are never truncated; responses carry the term; a stale leader
    is told the newer term and steps down at once.
b   Failed elections: idle follower-follower connections trip the read
    timeout on the first send. Fixed by :class:`HardenedTransport` pinging
    every authenticated peer every ``ping_period_s``.
c   Slow rejoin: no connect timeout. :class:`HardenedTransport` abandons a
    connection attempt after ``connect_timeout_s`` and retries.
d   Stuck after restart (journal, no usable full dump). A rack whose journal
    starts after its applied state keeps its log position for voting,
    empties its log, refuses to stand for election and catches up from the
    leader (:meth:`HardenedSyncObj._check_state_gap`). Full dumps are
    required with a journal, journal compaction is crash-safe
    (:class:`DurableJournal`) and a restart keeps journal entries newer
    than the dump (:meth:`HardenedSyncObj._load_dump`).
e   Stale commands replayed: ``commandsWaitLeader`` must be False.
f   Two leaders: ``leaderFallbackTimeout`` must be short (1 s), stale
    leaders step down on the first answer naming a newer term, and nothing
    in meshcloud decides liveness from ``state``/``has_quorum``.
g   Security: a password is mandatory; frames are capped (tiny before
    authentication, :class:`HardenedConnection`); unauthenticated
    connections are dropped after ``auth_deadline_s`` and their number is
    capped; the admin utility commands (status/add/remove/set_version/
    transfer over the Raft port) are disabled; messages are sent only over
    connections whose handshake is complete.
==  =====================================================================
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import shutil
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pysyncobj
import pysyncobj.pickle as pysyncobj_pickle
import pysyncobj.version
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf
from pysyncobj.journal import FileJournal
from pysyncobj.node import Node, TCPNode
from pysyncobj.poller import POLL_EVENT_TYPE
from pysyncobj.syncobj import _COMMAND_TYPE, _RAFT_STATE, SyncObjExceptionWrongVer
from pysyncobj.tcp_connection import CONNECTION_STATE, TcpConnection
from pysyncobj.tcp_server import TcpServer
from pysyncobj.transport import TCPTransport

from meshcloud.core.errors import MeshcloudError

log = logging.getLogger("meshcloud.raft")

PINNED_PYSYNCOBJ = "0.3.17"
NOOP_COMMAND = bytes([_COMMAND_TYPE.NO_OP])
PING = {"type": "mc_ping"}


class RaftHardeningError(MeshcloudError):
    """The Raft library or its configuration cannot be made safe."""


def check_pysyncobj_version() -> str:
    """Return the pinned version if both the installed dist and the module report it, else raise."""
    try:
        dist = metadata.version("pysyncobj")
    except metadata.PackageNotFoundError:
        dist = "not installed"
    module = getattr(pysyncobj.version, "VERSION", "unknown")
    if dist != PINNED_PYSYNCOBJ or module != PINNED_PYSYNCOBJ:
        raise RaftHardeningError(
            f"meshcloud's Raft hardening is written for pysyncobj {PINNED_PYSYNCOBJ}, but"
            f" {dist} (module {module}) is installed: install pysyncobj=={PINNED_PYSYNCOBJ}"
            " (pyproject.toml pins it); review meshcloud/raft/hardening.py before moving"
        )
    return PINNED_PYSYNCOBJ


check_pysyncobj_version()


@dataclass(frozen=True)
class HardeningOptions:
    """Limits and timers the hardened classes enforce (defaults suit a wireless mesh)."""

    max_frame_bytes: int = 4 * 1024 * 1024
    max_handshake_frame_bytes: int = 1024
    auth_deadline_s: float = 2.0
    max_pending_handshakes: int = 32
    connect_timeout_s: float = 1.0
    ping_period_s: float = 0.2
    max_transmission_bytes: int = 16 * 1024 * 1024
    tick_s: float = 0.05
    apply_budget_s: float = 0.02


# --- connections -------------------------------------------------------------------------


class HardenedConnection(TcpConnection):  # type: ignore[misc]
    """A TcpConnection with capped frames and reads, and an optional source address.

    ``authenticated`` is set by the transport once the peer has proved the
    secret (its first encrypted frame decrypted); until then a frame may be at
    most ``max_handshake_frame_bytes`` long, afterwards ``max_frame_bytes``.
    """

    def __init__(
        self,
        *args: Any,
        options: HardeningOptions,
        source_address: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.options = options
        self.source_address = source_address
        self.authenticated = False
        self.started_at = time.monotonic()
        self.peer = ""
        super().__init__(*args, **kwargs)

    def frame_cap(self) -> int:
        if self.authenticated:
            return self.options.max_frame_bytes
        return self.options.max_handshake_frame_bytes

    def connect(self, host: str, port: int) -> bool:
        """Start a non-blocking connect from ``source_address`` (if set)."""
        if host is None:
            return False
        self.disconnect_quietly()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, self._TcpConnection__sendBufferSize
            )
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVBUF, self._TcpConnection__recvBufferSize
            )
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            if self.source_address:
                sock.bind((self.source_address, 0))
            code = sock.connect_ex((host, port))
        except OSError as exc:
            log.debug("connect to %s:%s failed: %s", host, port, exc)
            sock.close()
            return False
        if code not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            sock.close()
            return False
        self._TcpConnection__socket = sock
        self.setSockoptKeepalive()
        self._TcpConnection__readBuffer = b""
        self._TcpConnection__writeBuffer = b""
        self._TcpConnection__lastReadTime = time.monotonic()
        self._TcpConnection__fileno = sock.fileno()
        self._TcpConnection__state = CONNECTION_STATE.CONNECTING
        self.started_at = time.monotonic()
        self.authenticated = False
        self.peer = f"{host}:{port}"
        self._TcpConnection__poller.subscribe(
            sock.fileno(),
            self._TcpConnection__processConnection,
            POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.WRITE | POLL_EVENT_TYPE.ERROR,
        )
        return True

    def disconnect_quietly(self) -> None:
        """Close without calling the disconnected callback (used before reconnecting)."""
        callback = getattr(self, "_TcpConnection__onDisconnected", None)
        self.setOnDisconnectedCallback(None)
        try:
            self.disconnect()
        finally:
            self.setOnDisconnectedCallback(callback)

    def disconnect(self) -> None:
        self.authenticated = False
        super().disconnect()

    def abort(self) -> None:
        """Close with a reset: what is still queued for the peer is thrown away, not sent.

        A plain close would let the kernel deliver the send buffer when the path
        comes back, minutes later perhaps: a proposal forwarded to a leader that
        went silent, whose writer was long told it failed, would then commit.
        """
        sock = self._TcpConnection__socket
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.disconnect()

    def _header_ok(self) -> bool:
        buffer = self._TcpConnection__readBuffer
        if len(buffer) < 4:
            return True
        (length,) = struct.unpack("i", buffer[:4])
        if 0 < length <= self.frame_cap():
            return True
        log.warning(
            "raft: dropping connection %s: frame of %d bytes announced (limit %d%s)",
            self.peer or "from an unknown peer",
            length,
            self.frame_cap(),
            "" if self.authenticated else ", not authenticated",
        )
        return False

    # Replaces TcpConnection.__tryReadBuffer: stop reading once a frame is too big or the
    # buffer holds more than one largest frame; the poller is level-triggered, so reading
    # resumes after the parsed frames are consumed.
    def _TcpConnection__tryReadBuffer(self) -> None:
        budget = 4 + self.frame_cap() + self._TcpConnection__recvBufferSize
        while len(self._TcpConnection__readBuffer) < budget:
            if not self._TcpConnection__processRead():
                break
            if not self._header_ok():
                self.disconnect()
                return
        self._TcpConnection__lastReadTime = time.monotonic()

    # Replaces TcpConnection.__processParseMessage: check every frame header first.
    def _TcpConnection__processParseMessage(self) -> Any:
        if not self._header_ok():
            self.disconnect()
            return None
        return TcpConnection._TcpConnection__processParseMessage(self)


class HardenedServer(TcpServer):  # type: ignore[misc]
    """A TcpServer that makes HardenedConnections, caps pending handshakes, survives EMFILE."""

    def __init__(
        self,
        poller: Any,
        host: str,
        port: int,
        on_new_connection: Callable[[HardenedConnection], None],
        *,
        may_accept: Callable[[], bool],
        options: HardeningOptions,
        send_buffer_bytes: int,
        recv_buffer_bytes: int,
        connection_timeout_s: float,
        keepalive: Any,
    ) -> None:
        super().__init__(
            poller,
            host,
            port,
            onNewConnection=on_new_connection,
            sendBufferSize=send_buffer_bytes,
            recvBufferSize=recv_buffer_bytes,
            connectionTimeout=connection_timeout_s,
            keepalive=keepalive,
        )
        self._poller_ = poller
        self._on_new = on_new_connection
        self._may_accept = may_accept
        self._options = options
        self._buffers = (send_buffer_bytes, recv_buffer_bytes)
        self._timeout_s = connection_timeout_s
        self._keepalive = keepalive

    # Replaces TcpServer.__onNewConnection.
    def _TcpServer__onNewConnection(self, descr: int, event: int) -> None:
        if event & POLL_EVENT_TYPE.READ:
            try:
                sock, addr = self._TcpServer__socket.accept()
            except OSError as exc:
                # The library unbinds the server on any error (EMFILE included): a
                # flood of connections would then close the Raft port for good.
                if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                    log.warning("raft: accept failed: %s", exc)
                return
            if not self._may_accept():
                log.warning("raft: refusing %s: too many unauthenticated connections", addr)
                sock.close()
                return
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._buffers[0])
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._buffers[1])
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setblocking(False)
            except OSError:
                sock.close()
                return
            conn = HardenedConnection(
                poller=self._poller_,
                socket=sock,
                timeout=self._timeout_s,
                sendBufferSize=self._buffers[0],
                recvBufferSize=self._buffers[1],
                keepalive=self._keepalive,
                options=self._options,
            )
            conn.peer = f"{addr[0]}:{addr[1]}"
            self._on_new(conn)
        if event & POLL_EVENT_TYPE.ERROR:
            self.unbind()


# --- transport -----------------------------------------------------------------------------


class HardenedTransport(TCPTransport):  # type: ignore[misc]
    """TCPTransport with handshake deadlines, connect timeouts, pings and no admin commands."""

    def __init__(self, syncObj: HardenedSyncObj, selfNode: Any, otherNodes: Any) -> None:
        self.options: HardeningOptions = syncObj.hardening
        self._last_ping = 0.0
        self._source_address = syncObj.source_address
        super().__init__(syncObj, selfNode, otherNodes)

    def _createServer(self) -> None:
        conf = self._syncObj.conf
        bind = conf.bindAddress or getattr(self._selfNode, "address", None)
        if not bind:
            raise RaftHardeningError("the Raft port needs an explicit bind address")
        host, port = bind.rsplit(":", 1)
        host = host.strip("[]")
        if host in ("0.0.0.0", "::", ""):  # noqa: S104 - refusing it is the point
            raise RaftHardeningError(
                f"the Raft port must be bound to the mesh address, not {host!r}:"
                " set network.bind_address"
            )
        self._server = HardenedServer(
            self._syncObj._poller,
            host,
            int(port),
            self._onNewIncomingConnection,
            may_accept=lambda: len(self._unknownConnections) < self.options.max_pending_handshakes,
            options=self.options,
            send_buffer_bytes=conf.sendBufferSize,
            recv_buffer_bytes=conf.recvBufferSize,
            connection_timeout_s=conf.connectionTimeout,
            keepalive=conf.tcp_keepalive,
        )

    def addNode(self, node: Node) -> None:
        self._nodes.add(node)
        self._nodeAddrToNode[node.address] = node
        if not self._shouldConnect(node):
            return
        conf = self._syncObj.conf
        conn = HardenedConnection(
            poller=self._syncObj._poller,
            timeout=conf.connectionTimeout,
            sendBufferSize=conf.sendBufferSize,
            recvBufferSize=conf.recvBufferSize,
            keepalive=conf.tcp_keepalive,
            options=self.options,
            source_address=self._source_address,
        )
        conn.encryptor = self._syncObj.encryptor
        conn.setOnConnectedCallback(functools.partial(self._onOutgoingConnected, conn))
        conn.setOnMessageReceivedCallback(functools.partial(self._onMessageReceived, node))
        conn.setOnDisconnectedCallback(functools.partial(self._onDisconnected, conn))
        self._connections[node] = conn

    def _onNewIncomingConnection(self, conn: HardenedConnection) -> None:
        conn.started_at = time.monotonic()
        super()._onNewIncomingConnection(conn)

    def _drop_unknown(self, conn: HardenedConnection, why: str) -> None:
        log.warning("raft: dropping connection %s: %s", conn.peer or "(unknown)", why)
        self._unknownConnections.discard(conn)
        conn.disconnect()

    def _onIncomingMessageReceived(self, conn: HardenedConnection, message: Any) -> None:
        if self._syncObj.encryptor is None:
            self._drop_unknown(conn, "unencrypted Raft traffic is refused")
            return
        # Reaching here means the frame decrypted: the peer holds the cluster secret.
        if not conn.sendRandKey:
            if not isinstance(message, bytes) or len(message) != 32:
                self._drop_unknown(conn, "malformed handshake")
                return
            conn.sendRandKey = message
            conn.recvRandKey = os.urandom(32)
            conn.send(conn.recvRandKey)
            return
        if not isinstance(message, str):
            # The library runs admin commands (lists) here: meshcloud disables them.
            self._drop_unknown(conn, "admin utility commands are disabled")
            return
        readonly = message == "readonly"
        node = self._nodeAddrToNode.get(message)
        if node is None and not readonly:
            self._drop_unknown(conn, f"{message[:60]!r} is not a member")
            return
        if readonly:
            node = Node(str(self._readonlyNodesCounter))
            self._readonlyNodesCounter += 1
            self._readonlyNodes.add(node)
        self._unknownConnections.discard(conn)
        conn.authenticated = True
        old = self._connections.get(node)
        self._connections[node] = conn
        if old is not None and old is not conn:
            old.disconnect()  # no longer mapped: its disconnect does not touch the node
        conn.setOnMessageReceivedCallback(functools.partial(self._onMessageReceived, node))
        if readonly:
            self._onReadonlyNodeConnected(node)
        else:
            self._onNodeConnected(node)

    def _onOutgoingMessageReceived(self, conn: HardenedConnection, message: Any) -> None:
        if not conn.sendRandKey and (not isinstance(message, bytes) or len(message) != 32):
            log.warning("raft: malformed handshake from %s", conn.peer)
            conn.disconnect()
            return
        super()._onOutgoingMessageReceived(conn, message)
        conn.authenticated = conn.state == CONNECTION_STATE.CONNECTED

    def _onUtilityMessage(self, conn: HardenedConnection, message: Any) -> bool:
        self._drop_unknown(conn, "admin utility commands are disabled")
        return True

    def send(self, node: Node, message: Any) -> bool:
        conn = self._connections.get(node)
        # Sending before the handshake completes corrupts it (the frame lacks the
        # session key the peer expects): the library does it; we do not.
        if conn is None or not getattr(conn, "authenticated", False):
            return False
        return bool(super().send(node, message))

    def _onTick(self) -> None:
        super()._onTick()
        now = time.monotonic()
        opts = self.options
        for conn in list(self._unknownConnections):
            if now - conn.started_at > opts.auth_deadline_s:
                self._drop_unknown(conn, f"no authentication within {opts.auth_deadline_s} s")
        for conn in list(self._connections.values()):
            if conn.state == CONNECTION_STATE.CONNECTING:
                if now - conn.started_at > opts.connect_timeout_s:
                    log.debug("raft: connect to %s timed out; retrying", conn.peer)
                    conn.disconnect()
            elif (
                conn.state == CONNECTION_STATE.CONNECTED
                and not conn.authenticated
                and now - conn.started_at > opts.auth_deadline_s
            ):
                log.warning("raft: %s did not complete the handshake; retrying", conn.peer)
                conn.disconnect()
        if now - self._last_ping >= opts.ping_period_s:
            self._last_ping = now
            for node in list(self._connections):
                self.send(node, PING)


# --- journal -------------------------------------------------------------------------------


class DurableJournal(FileJournal):  # type: ignore[misc]
    """FileJournal whose compaction cannot truncate it, synced to disk in the background.

    The library rewrites the journal in place to drop compacted entries; a
    kill during the rewrite leaves only its first part. Here the kept entries
    are written to a new file that atomically replaces the old one. Once a
    second a background thread fsyncs the journal: a process kill loses
    nothing; a power cut may lose the last second on this rack. Nothing here
    waits for the disk in the Raft thread (a slow fsync there would stop the
    heartbeats and cost an election).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._sync_wanted = threading.Event()
        self._closing = False
        super().__init__(path)
        self._syncer = threading.Thread(target=self._sync_loop, name="raft-fsync", daemon=True)
        self._syncer.start()

    def _sync_loop(self) -> None:
        while True:
            self._sync_wanted.wait()
            self._sync_wanted.clear()
            if self._closing:
                return
            try:
                fd = os.open(self.path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                log.warning("raft: could not sync the journal %s: %s", self.path, exc)

    def deleteEntriesTo(self, entryTo: int) -> None:
        keep = list(self[entryTo:])
        tmp = self.path + ".compact"
        for leftover in (tmp, tmp + ".meta"):
            if os.path.exists(leftover):
                os.unlink(leftover)
        fresh = FileJournal(tmp)
        for entry in keep:
            fresh.add(*entry)
        fresh._destroy()
        FileJournal.onOneSecondTimer(self)  # store pending meta before re-reading it
        FileJournal._destroy(self)
        os.replace(tmp, self.path)
        FileJournal.__init__(self, self.path)
        self._sync_wanted.set()

    def onOneSecondTimer(self) -> None:
        super().onOneSecondTimer()
        self._sync_wanted.set()

    def _destroy(self) -> None:
        super()._destroy()
        self._closing = True
        self._sync_wanted.set()


# --- the node -------------------------------------------------------------------------------


def _as_entry(entry: Any) -> tuple[bytes, int, int]:
    command, index, term = entry
    return command, int(index), int(term)


class HardenedSyncObj(SyncObj):  # type: ignore[misc]
    """SyncObj with the corrections of this module; runs its own tick thread.

    ``self_address`` is ``host:port`` for a voter, None for a follower that
    does not vote (a pysyncobj "readonly" node). ``journal_path`` and
    ``conf.fullDumpFile`` must be given together. Call :meth:`start` to run
    and :meth:`stop` to stop (from another thread).
    """

    # Private state of SyncObj that this class reads and writes (name-mangled there).
    _SyncObj__raftLastApplied: int
    _SyncObj__raftCommitIndex: int
    _SyncObj__raftLeader: Any

    def __init__(
        self,
        self_address: str | None,
        peers: Iterable[str],
        conf: SyncObjConf,
        consumers: list[Any],
        *,
        journal_path: str | None = None,
        hardening: HardeningOptions | None = None,
        source_address: str | None = None,
        on_tick: Callable[[HardenedSyncObj], None] | None = None,
        command_filter: Callable[[str], str] | None = None,
    ) -> None:
        check_conf(conf, journal_path)
        # Everything set before SyncObj.__init__ stays out of full dumps.
        self.hardening = hardening or HardeningOptions()
        self.source_address = source_address or (
            self_address.rsplit(":", 1)[0] if self_address else None
        )
        self.journal_path = journal_path
        self.recovering_from: tuple[int, int] | None = None
        self._gap_checked = False
        self._rx_transmission: bytearray | None = None
        self._on_tick_hook = on_tick
        self._leader_contact = 0.0
        self._prevote_term: int | None = None
        self._prevote_votes: set[str] = set()
        self._prevote_won = False
        self._stand_on_quorum = False  # see stand_when_quorum_connected
        self._sent_marker: tuple[int, int] = (0, 0)
        self._last_members_sent = 0.0
        self._command_filter = command_filter
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        super().__init__(
            self_address, list(peers), conf, consumers=consumers, transportClass=HardenedTransport
        )
        self._poller.subscribe(self._wake_r, self._drain_wake, POLL_EVENT_TYPE.READ)
        self.addOnTickCallback(self._before_poll)
        if journal_path is not None:
            self._install_journal(journal_path)

    def stand_at_once(self) -> None:
        """Stand for election at the first tick (before ``start()``): for a lone founder only."""
        if self._SyncObj__otherNodes:
            raise RuntimeError("stand_at_once is for a group of one voter")
        self._SyncObj__raftElectionDeadline = 0.0

    def stand_when_quorum_connected(self) -> None:
        """Stand at the first tick where a majority of the group is connected (a founder).

        A new group's first election otherwise waits a whole random election
        timeout after start, although its members start within a moment of each
        other. Standing early is safe (elections never depend on timers for
        safety); it is done once, on term 0, and only by the founder, so that
        the founding voters do not split their votes.
        """
        self._stand_on_quorum = True

    def _maybe_stand_early(self) -> None:
        if not self._stand_on_quorum:
            return
        if self.raftCurrentTerm > 0 or self._SyncObj__raftLeader is not None:
            self._stand_on_quorum = False
            return
        others = self._SyncObj__otherNodes
        connected = sum(1 for n in others if n in self._SyncObj__connectedNodes)
        if connected + 1 > (len(others) + 1) / 2:
            self._stand_on_quorum = False
            self._SyncObj__raftElectionDeadline = 0.0

    # -- private library state, by name ---------------------------------------------------
    @property
    def _log(self) -> Any:
        return self._SyncObj__raftLog

    @property
    def transport(self) -> HardenedTransport:
        return self._SyncObj__transport  # type: ignore[no-any-return]

    def _last_index(self) -> int:
        return int(self._log[-1][1])

    def _last_term(self) -> int:
        return int(self._log[-1][2])

    def _entries(self, start: int, count: int | None = None) -> list[Any]:
        return self._SyncObj__getEntries(start, count)  # type: ignore[no-any-return]

    def _install_journal(self, path: str) -> None:
        journal = DurableJournal(path)
        if len(journal) == 0:
            journal.add(NOOP_COMMAND, 1, 0)
        self._SyncObj__raftLog = journal
        self._SyncObj__raftCurrentTerm = max(journal.getCurrentTerm(), int(journal[-1][2]))
        self._SyncObj__votedForNodeId = journal.getVotedForNodeId()
        self._SyncObj__raftCommitIndex = journal.getRaftCommitIndex()

    # -- commands -------------------------------------------------------------------------------
    def _applyCommand(self, command: bytes, callback: Any, commandType: int | None = None) -> None:
        """Queue a command; a leader first passes replicated JSON commands through the filter."""
        if self._command_filter is not None and self._SyncObj__raftState == _RAFT_STATE.LEADER:
            try:
                command = self._filtered(command, commandType)
            except Exception:
                log.exception("raft: command filter failed; command queued unchanged")
        SyncObj._applyCommand(self, command, callback, commandType)

    def _filtered(self, command: bytes, command_type: int | None) -> bytes:
        assert self._command_filter is not None
        prefix = b""
        if command_type is None:
            if command[:1] != bytes([_COMMAND_TYPE.REGULAR]):
                return command
            prefix, command = command[:1], command[1:]
        elif command_type != _COMMAND_TYPE.REGULAR:
            return command
        decoded = pysyncobj_pickle.loads(command)
        if not (isinstance(decoded, tuple) and len(decoded) == 2 and len(decoded[1]) == 1):
            return prefix + command
        func_id, (text,) = decoded
        if not isinstance(text, str):
            return prefix + command
        encoded: bytes = pysyncobj_pickle.dumps((func_id, (self._command_filter(text),)))
        return prefix + encoded

    # -- running ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="raft-tick", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the tick thread; it closes sockets and the journal on its way out."""
        self._stop.set()
        self.wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def wake(self) -> None:
        """Make the tick thread run now (after a command was queued)."""
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _drain_wake(self, descr: int, event: int) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except OSError:
            pass

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._before_tick()
                    self.doTick(self.hardening.tick_s)
                    if self._on_tick_hook is not None:
                        self._on_tick_hook(self)
                except Exception:
                    log.exception("raft: tick failed; retrying")
                    time.sleep(self.hardening.tick_s)
        finally:
            try:
                self._doDestroy()
            finally:
                for fd in (self._wake_r, self._wake_w):
                    with contextlib.suppress(OSError):
                        os.close(fd)

    def _before_tick(self) -> None:
        # Read what is waiting first: the library checks its timers (election, leader
        # fallback) before reading, so a thread that was starved for a moment would
        # stand for election, or step down, with the answers sitting in its sockets.
        if self.transport.ready:
            self._poller.poll(0)
        if self._SyncObj__raftState == _RAFT_STATE.LEADER:
            self._send_promptly()
        if not self._gap_checked and not self._SyncObj__needLoadDumpFile:
            self._gap_checked = True
            self._check_state_gap()
        if self.recovering_from is not None:
            self._check_recovered()
            # A rack rebuilding its state must not lead: its map would be empty.
            self._SyncObj__raftElectionDeadline = time.monotonic() + 3600.0
            return
        self._maybe_stand_early()
        self._maybe_prevote()

    # -- explaining itself ------------------------------------------------------------------------
    def _SyncObj__setState(self, newState: int) -> None:
        old = self._SyncObj__raftState
        SyncObj._SyncObj__setState(self, newState)
        if old == newState:
            return
        names = {_RAFT_STATE.FOLLOWER: "follower", _RAFT_STATE.CANDIDATE: "candidate",
                 _RAFT_STATE.LEADER: "leader"}  # fmt: skip
        why = ""
        if old == _RAFT_STATE.LEADER and newState == _RAFT_STATE.FOLLOWER:
            now = time.monotonic()
            last = self._SyncObj__lastResponseTime
            quiet = sorted(f"{n.id} {now - t:.1f} s" for n, t in last.items() if now - t > 0.5)
            why = f" (silent voters: {', '.join(quiet) or 'none'})"
        log.info(
            "raft: %s -> %s at term %d%s",
            names.get(old, old), names.get(newState, newState), self.raftCurrentTerm, why,
        )  # fmt: skip

    # -- adaptive batching ------------------------------------------------------------------------
    def _send_promptly(self) -> None:
        """Send append_entries now if the log or the commit index moved since the last look.

        The library either batches (one append_entries per period: ~100 ms per
        write) or sends one per command (which collapses under load). Sending on
        the next tick whenever something is new batches exactly what arrived
        meanwhile.
        """
        marker = (self._last_index(), int(self._SyncObj__raftCommitIndex))
        if marker != self._sent_marker:
            self._sent_marker = marker
            self._SyncObj__newAppendEntriesTime = 0.0

    def _before_poll(self) -> None:
        """Runs at the end of each tick, before the library sleeps in its poll."""
        self._tell_followers_the_voters()
        if self._SyncObj__raftState != _RAFT_STATE.LEADER:
            return
        marker = (self._last_index(), int(self._SyncObj__raftCommitIndex))
        if marker != self._sent_marker:
            self.wake()  # new entries or a new commit index: do not sleep, send them

    # -- followers find every voter --------------------------------------------------------------
    def _tell_followers_the_voters(self) -> None:
        """Once a second, a voter tells its followers (readonly nodes) who votes.

        A follower receives the log only from the leader, and connects only to
        the voters it knows: one that joined knowing a single member would
        never hear from a leader elsewhere. This tells it about the others.
        """
        now = time.monotonic()
        if self.selfNode is None or now - self._last_members_sent < 1.0:
            return
        self._last_members_sent = now
        readonly = self._SyncObj__readonlyNodes
        if not readonly:
            return
        voters = sorted({n.id for n in self._SyncObj__otherNodes} | {self.selfNode.id})
        for node in list(readonly):
            self.transport.send(node, {"type": "mc_voters", "voters": voters})

    def _on_voters(self, message: dict[str, Any]) -> None:
        if self.selfNode is not None or not self.conf.dynamicMembershipChange:
            return
        known = {n.id for n in self._SyncObj__otherNodes}
        for address in message["voters"]:
            if isinstance(address, str) and address not in known and ":" in address:
                log.info("raft: learnt of voter %s; connecting to it", address)
                self._SyncObj__doChangeCluster(["add", address, TCPNode(address)])

    # -- pre-vote (Raft thesis 9.6) -------------------------------------------------------------
    def _maybe_prevote(self) -> None:
        """Hold back the library's election until a majority says it would vote.

        Without this, a rack that was cut off (or just added) starts an election
        with a higher term as soon as it reconnects, and deposes a healthy leader.
        """
        if self._SyncObj__raftState == _RAFT_STATE.LEADER:
            return
        now = time.monotonic()
        if self._SyncObj__raftElectionDeadline >= now or self._SyncObj__transferInProgress:
            return
        if self._prevote_won:
            self._prevote_won = False  # let the library run the election in this tick
            return
        self._SyncObj__raftElectionDeadline = now + self._SyncObj__generateRaftTimeout()
        if self._SyncObj__raftLeader is not None:
            # Not heard from the leader for an election timeout: forget it, so that
            # proposals fail at once instead of waiting on a leader that is gone, and
            # reset the connection to it, so that proposals forwarded to it and not yet
            # delivered are dropped instead of committed when the path heals (their
            # writers were told they failed). The transport reconnects.
            old_leader = self._SyncObj__raftLeader
            self._SyncObj__onLeaderChanged()
            self._SyncObj__raftLeader = None
            conn = self.transport._connections.get(old_leader)
            if isinstance(conn, HardenedConnection):
                conn.abort()
        if self.selfNode is None or not self._SyncObj__connectedToAnyone():
            return  # a follower that does not vote never stands; nor does a lone rack
        self._prevote_term = self.raftCurrentTerm + 1
        self._prevote_votes = {self.selfNode.id}
        if self._prevote_majority():
            self._win_prevote()
            return
        request = {
            "type": "mc_prevote",
            "term": self._prevote_term,
            "last_log_index": self._last_index(),
            "last_log_term": self._last_term(),
        }
        for node in self._SyncObj__otherNodes:
            self.transport.send(node, request)

    def _prevote_majority(self) -> bool:
        return len(self._prevote_votes) > (len(self._SyncObj__otherNodes) + 1) / 2

    def _win_prevote(self) -> None:
        self._prevote_term = None
        self._prevote_won = True
        self._SyncObj__raftElectionDeadline = 0

    def _on_prevote(self, node: Node, message: dict[str, Any]) -> None:
        term = int(message["term"])
        candidate = (int(message["last_log_term"]), int(message["last_log_index"]))
        window = self.conf.raftMinTimeout * 0.75
        leader_alive = self._SyncObj__raftLeader is not None and (
            time.monotonic() - self._leader_contact < window
        )
        granted = (
            self.selfNode is not None
            and term > self.raftCurrentTerm
            and self._SyncObj__raftState != _RAFT_STATE.LEADER
            and not leader_alive
            and candidate >= (self._last_term(), self._last_index())
            and self._may_vote(message)
        )
        self.transport.send(node, {"type": "mc_prevote_reply", "term": term, "granted": granted})

    def _on_prevote_reply(self, node: Node, message: dict[str, Any]) -> None:
        if not message.get("granted") or message.get("term") != self._prevote_term:
            return
        if self._SyncObj__raftState == _RAFT_STATE.LEADER or node not in self._SyncObj__otherNodes:
            return
        self._prevote_votes.add(node.id)
        if self._prevote_majority():
            self._win_prevote()

    # -- (d) a journal that starts after the applied state ------------------------------------
    def _check_state_gap(self) -> None:
        first = int(self._log[0][1])
        applied = int(self._SyncObj__raftLastApplied)
        if first <= applied + 1:
            return
        position = (self._last_term(), self._last_index())
        log.error(
            "raft: the journal starts at entry %d but the state is only rebuilt up to %d (the"
            " full dump is missing or older): rebuilding the state from the leader; this rack"
            " will not stand for election until it has caught up",
            first,
            applied,
        )
        if self.journal_path and os.path.exists(self.journal_path):
            shutil.copyfile(self.journal_path, self.journal_path + ".incomplete")
        self._log.clear()
        self._log.add(NOOP_COMMAND, 1, 0)
        self._SyncObj__raftCommitIndex = 1
        self._SyncObj__raftLastApplied = 1
        self._log.setRaftCommitIndex(1)
        for consumer in self._SyncObj__consumers:
            reset = getattr(consumer, "reset", None)
            if reset is not None:
                reset()
        self.recovering_from = position

    def _check_recovered(self) -> None:
        assert self.recovering_from is not None
        caught_up = (self._last_term(), self._last_index()) >= self.recovering_from
        complete = int(self._log[0][1]) <= int(self._SyncObj__raftLastApplied) + 1
        applied = int(self._SyncObj__raftLastApplied) >= int(self._SyncObj__raftCommitIndex)
        if caught_up and complete and applied and self._SyncObj__raftCommitIndex > 1:
            log.warning("raft: state rebuilt from the leader; this rack may vote and lead again")
            self.recovering_from = None

    def _may_vote(self, message: dict[str, Any]) -> bool:
        if self.recovering_from is None:
            return True
        # Vote as the forgotten log would have: never for a candidate behind it.
        candidate = (int(message["last_log_term"]), int(message["last_log_index"]))
        return candidate >= self.recovering_from

    # -- message dispatch ---------------------------------------------------------------------
    def _SyncObj__onMessageReceived(self, node: Node, message: Any) -> None:
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            return
        kind = message["type"]
        try:
            if kind == "mc_ping":
                return
            if kind == "mc_stale_term":
                self._on_stale_term(int(message["term"]))
            elif kind == "mc_prevote":
                self._on_prevote(node, message)
            elif kind == "mc_prevote_reply":
                self._on_prevote_reply(node, message)
            elif kind == "mc_voters":
                self._on_voters(message)
            elif kind == "append_entries":
                self._on_append_entries(node, message)
            elif kind == "next_node_idx" and message.get("term") != self.raftCurrentTerm:
                return  # an answer to an older leadership: its indexes mean nothing now
            elif kind == "request_vote" and not self._may_vote(message):
                return
            else:
                SyncObj._SyncObj__onMessageReceived(self, node, message)
        except Exception:
            log.exception("raft: dropping malformed %r message from %s", kind[:40], node)

    def _on_stale_term(self, term: int) -> None:
        if term > self.raftCurrentTerm:
            log.info(
                "raft: a peer is at term %d (this rack: %d); stepping down",
                term,
                self.raftCurrentTerm,
            )
            self._SyncObj__setCurrentTerm(term, None)
            self._SyncObj__setState(_RAFT_STATE.FOLLOWER)
            self._SyncObj__raftLeader = None

    def _reply(self, node: Node, next_index: int, *, success: bool, reset: bool) -> None:
        self.transport.send(
            node,
            {
                "type": "next_node_idx",
                "next_node_idx": next_index,
                "reset": reset,
                "success": success,
                "term": self.raftCurrentTerm,
            },
        )

    # -- (a) append entries, written for meshcloud --------------------------------------------
    def _on_append_entries(self, node: Node, message: dict[str, Any]) -> None:
        term = int(message["term"])
        if term < self.raftCurrentTerm:
            # Tell the old leader; the library ignores it and lets it lead on.
            self.transport.send(node, {"type": "mc_stale_term", "term": self.raftCurrentTerm})
            return
        if term > self.raftCurrentTerm:
            self._SyncObj__transferInProgress = False
        if not self._SyncObj__transferInProgress:
            self._SyncObj__raftElectionDeadline = (
                time.monotonic() + self._SyncObj__generateRaftTimeout()
            )
        if self._SyncObj__raftLeader != node:
            self._SyncObj__onLeaderChanged()
        self._SyncObj__raftLeader = node
        self._leader_contact = time.monotonic()
        self._prevote_term = None
        if term > self.raftCurrentTerm:
            self._SyncObj__setCurrentTerm(term, None)
        self._SyncObj__setState(_RAFT_STATE.FOLLOWER)
        leader_commit = int(message["commit_index"])
        self._SyncObj__leaderCommitIndex = leader_commit

        verified: int | None = None  # last index known to match the leader's log
        if "prevLogIdx" in message:
            entries = self._receive_entries(node, message)
            if entries is None:
                return
            verified = self._match_and_append(
                node, int(message["prevLogIdx"]), int(message["prevLogTerm"]), entries
            )
        elif message.get(
            "serialized"
        ) is not None and self._SyncObj__serializer.setTransmissionData(message["serialized"]):
            self._SyncObj__loadDumpFile(clearJournal=True)
            verified = self._last_index()
            self._reply(node, verified + 1, success=True, reset=False)
        # Otherwise: a chunk of a snapshot, or a heartbeat while the leader prepares one.
        # Until the snapshot is installed this rack's log is NOT known to match the
        # leader's, so the commit index must not move (the library moved it: defect a).

        commit = int(self._SyncObj__raftCommitIndex)
        commit = min(commit, self._last_index())
        if verified is not None:
            commit = max(commit, min(leader_commit, verified))
        self._SyncObj__raftCommitIndex = commit
        self._log.setRaftCommitIndex(commit)

    def _receive_entries(self, node: Node, message: dict[str, Any]) -> list[Any] | None:
        transmission = message.get("transmission")
        if transmission is None:
            return [_as_entry(e) for e in message.get("entries", [])]
        data = message.get("data", b"")
        if transmission == "start":
            self._rx_transmission = bytearray(data)
        elif transmission in ("process", "finish") and self._rx_transmission is not None:
            self._rx_transmission += data
        else:
            self._rx_transmission = None
            return None
        if len(self._rx_transmission) > self.hardening.max_transmission_bytes:
            log.warning("raft: dropping an entry larger than %d bytes", len(self._rx_transmission))
            self._rx_transmission = None
            return None
        if transmission != "finish":
            self._reply(node, self._last_index() + 1, success=False, reset=False)
            return None
        raw, self._rx_transmission = bytes(self._rx_transmission), None
        try:
            return [_as_entry(pysyncobj_pickle.loads(raw))]
        except Exception:
            log.warning("raft: a chunked entry did not decode; asking the leader again")
            self._reply(node, self._last_index() + 1, success=False, reset=True)
            return None

    def _match_and_append(
        self, node: Node, prev_index: int, prev_term: int, entries: list[Any]
    ) -> int | None:
        prev = self._entries(prev_index, 1)
        if not prev:
            self._reply(node, self._last_index() + 1, success=False, reset=True)
            return None
        if int(prev[0][2]) != prev_term:
            self._reply(node, prev_index, success=False, reset=True)
            return None
        first = int(self._log[0][1])
        new: list[Any] = []
        for position, entry in enumerate(entries):
            index, term = entry[1], entry[2]
            if index < first:
                continue  # compacted here: applied, hence committed
            mine = self._entries(index, 1)
            if mine and int(mine[0][2]) == term:
                continue  # already held: never truncate matching entries
            if mine:
                self._truncate_from(index)
            new = entries[position:]
            break
        dynamic = self.conf.dynamicMembershipChange
        for entry in new:
            self._log.add(*entry)
            if dynamic:
                request = self._SyncObj__parseChangeClusterRequest(entry[0])
                if request is not None:
                    self._SyncObj__doChangeCluster(request)
        verified = prev_index + len(entries)
        self._reply(node, verified + 1, success=True, reset=False)
        return verified

    def _truncate_from(self, index: int) -> None:
        removed = self._entries(index)
        if self.conf.dynamicMembershipChange:
            for entry in reversed(removed):
                request = self._SyncObj__parseChangeClusterRequest(entry[0])
                if request is not None:
                    self._SyncObj__doChangeCluster(request, reverse=True)
        # Writers waiting on an entry removed here learn now that it will never commit:
        # a log holding it could not differ from the new leader's at ``index``.
        gone = {(int(e[1]), int(e[2])) for e in removed}
        waiting = self._SyncObj__commandsWaitingCommit
        for position in [i for i in waiting if i >= index]:
            keep = []
            for term, callback in waiting.pop(position):
                if (position, term) in gone:
                    callback(None, FAIL_REASON.DISCARDED)
                else:
                    keep.append((term, callback))
            if keep:
                waiting[position] = keep
        if index <= self._SyncObj__raftLastApplied:
            log.critical(
                "raft: the leader replaces applied entries from %d (applied up to %d): this"
                " rack's map may differ from the cluster's; remove its state to rejoin",
                index,
                self._SyncObj__raftLastApplied,
            )
        self._SyncObj__deleteEntriesFrom(index)

    # -- applying the log ---------------------------------------------------------------------
    def _SyncObj__applyLogEntries(self) -> bool:
        """Apply committed entries, at most ``apply_budget_s`` per tick.

        The library applies every committed entry at once: after a burst of
        thousands of writes, the Raft thread stops heartbeating for long enough
        that the followers elect another leader. The rest waits for the next tick.
        """
        deadline = time.monotonic() + self.hardening.apply_budget_s
        waiting = self._SyncObj__commandsWaitingCommit
        while self._SyncObj__raftLastApplied < self._SyncObj__raftCommitIndex:
            index = int(self._SyncObj__raftLastApplied) + 1
            entries = self._entries(index, 1)
            if not entries:
                break  # a gap: handled by _check_state_gap
            command, _index, term = entries[0]
            subscribers = waiting.pop(index, [])
            try:
                result = self._SyncObj__doApplyCommand(command)
            except SyncObjExceptionWrongVer as exc:
                log.error("raft: entry %d needs code version %s; not applying", index, exc.ver)
                if subscribers:
                    waiting[index] = subscribers
                break
            for subscribed_term, callback in subscribers:
                if subscribed_term == term:
                    callback(result, FAIL_REASON.SUCCESS)
                else:
                    callback(None, FAIL_REASON.DISCARDED)
            self._SyncObj__raftLastApplied = index
            if time.monotonic() > deadline:
                self.wake()  # more to apply: come back at once, after the heartbeats
                break
        return not self.conf.appendEntriesUseBatch

    # -- loading full dumps -----------------------------------------------------------------
    def _SyncObj__loadDumpFile(self, clearJournal: bool) -> None:
        try:
            data = self._SyncObj__serializer.deserialize()
            payload, last, prev, cluster = data
            last, prev = _as_entry(last), _as_entry(prev)
            consumers = self._SyncObj__consumers
            if payload is not None:
                own, parts = (payload[0], payload[1:]) if consumers else (payload, [])
                version = own.get("_SyncObj__enabledCodeVersion") if isinstance(own, dict) else None
                if isinstance(version, int):
                    self._SyncObj__enabledCodeVersion = version
                for consumer, part in zip(consumers, parts, strict=False):
                    consumer._deserialize(part)
            if clearJournal or not self._journal_holds(last):
                self._log.clear()
                self._log.add(*prev)
                self._log.add(*last)
            # else: a restart after a dump: keep the journal entries newer than the dump
            # (the library throws them away, and with them entries it acknowledged).
            self._SyncObj__raftLastApplied = last[1]
            commit = max(min(int(self._SyncObj__raftCommitIndex), self._last_index()), last[1])
            self._SyncObj__raftCommitIndex = commit
            self._log.setRaftCommitIndex(commit)
            if self.conf.dynamicMembershipChange:
                members = [n for n in cluster if n is not None and n != self.selfNode]
                self._SyncObj__updateClusterConfiguration(members)
            self._SyncObj__onSetCodeVersion(0)
            waiting = self._SyncObj__commandsWaitingCommit
            for index in [i for i in waiting if i <= last[1]]:
                for _term, callback in waiting.pop(index):
                    callback(None, FAIL_REASON.UNKNOWN_OUTCOME)
        except Exception:
            log.exception("raft: failed to load the full dump")

    def _journal_holds(self, entry: tuple[bytes, int, int]) -> bool:
        position = entry[1] - int(self._log[0][1])
        if not 0 <= position < len(self._log):
            return False
        mine = self._log[position]
        return int(mine[1]) == entry[1] and int(mine[2]) == entry[2]

    # -- read-only views for the store ------------------------------------------------------
    def raft_view(self) -> dict[str, Any]:
        """A consistent summary, built in the tick thread (see the store's status)."""
        leader = self._SyncObj__raftLeader
        return {
            "self": self.selfNode.id if self.selfNode is not None else None,
            "leader": leader.id if isinstance(leader, TCPNode) else None,
            "is_leader": self._SyncObj__raftState == _RAFT_STATE.LEADER,
            "term": int(self.raftCurrentTerm),
            "commit_index": int(self._SyncObj__raftCommitIndex),
            "last_applied": int(self._SyncObj__raftLastApplied),
            "log_first": int(self._log[0][1]),
            "log_last": self._last_index(),
            "voters": sorted(n.id for n in self._SyncObj__otherNodes)
            + ([self.selfNode.id] if self.selfNode is not None else []),
            "connected": sorted(
                n.id for n in self._SyncObj__connectedNodes if isinstance(n, TCPNode)
            ),
            "followers_connected": len(self._SyncObj__readonlyNodes),
            "recovering": self.recovering_from is not None,
        }


def check_conf(conf: SyncObjConf, journal_path: str | None) -> None:
    """Refuse a SyncObjConf that would bring back a defect this module fixes."""
    problems = []
    if not conf.password:
        problems.append("password is not set (pysyncobj would unpickle unauthenticated frames)")
    if conf.commandsWaitLeader:
        problems.append("commandsWaitLeader must be False (queued writes commit much later)")
    if conf.leaderFallbackTimeout > 5.0:
        problems.append(
            f"leaderFallbackTimeout ({conf.leaderFallbackTimeout} s) is too long:"
            " a cut-off leader would keep leading"
        )
    if conf.autoTick:
        problems.append("autoTick must be False (HardenedSyncObj runs its own tick thread)")
    if conf.journalFile is not None:
        problems.append("pass journal_path, not conf.journalFile (the durable journal is used)")
    if (journal_path is None) != (conf.fullDumpFile is None):
        problems.append("a journal needs a full-dump file and a full-dump file needs a journal")
    if conf.useFork:
        problems.append("useFork must be False (forking a threaded daemon is unsafe)")
    if problems:
        raise RaftHardeningError("unsafe Raft configuration: " + "; ".join(problems))

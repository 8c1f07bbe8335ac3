"""rsync-over-SSH command lines and parsers for replication (pure: no I/O).

Why a thin builder of our own rather than a wrapper library: sysrsync
(the most used one on PyPI) builds ``--rsh`` from a fixed set of ssh options
(key, port, StrictHostKeyChecking), checks local paths on disk while
building, runs rsync without capturing output or a timeout, and parses
nothing; rsyncwrap hard-codes ``-a --progress`` and has no ssh at all. We
need pinned known_hosts, BatchMode, no agent or forwarding, a connection
master, ``--partial-dir``, the transferred file's checksum (``%C``), the
``--stats`` byte counts, progress for seeding and killable processes. See
docs/replication.md.

The receiving side is restricted by a forced command in authorized_keys
(:func:`authorized_keys_line`): an rsync request starts rsync's own daemon
mode over SSH, whose only module is the incoming directory, write-only
(:func:`rsyncd_conf_text`; rrsync's confinement without a Python start per
transfer); anything else goes to :mod:`meshcloud.replication.serve`, which
runs the few replication verbs (status, commit, fence, ...) and refuses the
rest.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from meshcloud.core.errors import InvalidInput
from meshcloud.core.names import validate_name

SSH = "ssh"
RSYNC = "rsync"
OUT_FORMAT = "mcfile|%n|%l|%C"
RSYNC_MODULE = "incoming"  # the one module of the receiver's rsyncd.conf
RSYNC_DAEMON_REQUEST = "rsync --server --daemon ."  # what an rsync client runs for host::module
CHECKSUM_CHOICE = "xxh128"  # volume.file_checksum computes it too (the receiver's check)
_SAFE_PATH_RE = re.compile(r"^[A-Za-z0-9_./@+-]+$")
_HOST_RE = re.compile(r"^[A-Za-z0-9.:-]+$")


def _safe_path(kind: str, path: Path | str) -> str:
    """A local path we hand to ssh or rsync: absolute, plain characters only.

    rsync splits its ``-e`` string on whitespace itself, so a path with a
    space or a quote would be mangled; we refuse it instead.
    """
    text = os.fspath(path)
    if not text.startswith("/") or not _SAFE_PATH_RE.match(text) or "/../" in f"{text}/":
        raise InvalidInput(
            f"{kind} path {text!r} must be absolute and use only letters, digits and ._/@+-"
        )
    return text


def _remote_rel(path: str) -> str:
    """A path relative to the receiver's restricted directory."""
    p = PurePosixPath(path)
    if p.is_absolute() or ".." in p.parts or not _SAFE_PATH_RE.match(path) or path.startswith("-"):
        raise InvalidInput(f"remote path {path!r} must be relative, plain and without '..'")
    return path


@dataclass(frozen=True)
class SshTarget:
    """How to reach one rack's replication endpoint over SSH.

    ``identity_file`` is the cluster's replication key (from the kit);
    ``known_hosts_file`` pins the racks' host keys (no trust on first use);
    ``control_dir`` holds connection-master sockets so that a cycle does
    not pay a new handshake per command.
    """

    host: str
    identity_file: Path
    known_hosts_file: Path
    port: int = 22
    netns: str | None = None  # run ssh inside this network namespace (the lab's racks)
    user: str = "root"
    control_dir: Path | None = None
    connect_timeout_s: int = 10
    alive_interval_s: int = 5
    alive_count: int = 3
    # the connection master outlives a quiet spell (an appliance that writes nothing, a
    # long seed of another disk): a cycle after it needs no new SSH handshake. A dead
    # peer still ends it after alive_interval_s x alive_count.
    control_persist_s: int = 600

    def __post_init__(self) -> None:
        if self.netns is not None and not re.match(
            r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$", self.netns
        ):
            raise InvalidInput(f"network namespace {self.netns!r} is not a valid name")
        if not _HOST_RE.match(self.host) or self.host.startswith("-"):
            raise InvalidInput(f"ssh host {self.host!r} must be an address or a plain name")
        if not 0 < self.port < 65536:
            raise InvalidInput(f"ssh port {self.port} must be 1-65535")
        if not re.match(r"^[a-z_][a-z0-9_-]{0,31}$", self.user):
            raise InvalidInput(f"ssh user {self.user!r} is not a valid user name")
        _safe_path("identity file", self.identity_file)
        _safe_path("known_hosts file", self.known_hosts_file)
        if self.control_dir is not None:
            _safe_path("control directory", self.control_dir)
            if len(str(self.control_dir)) > 60:
                raise InvalidInput(
                    f"ssh control directory {self.control_dir} is too long for a socket path"
                    " (at most 60 characters): use a short one such as /run/meshcloud/ssh"
                )
        for key in ("connect_timeout_s", "alive_interval_s", "alive_count", "control_persist_s"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 0:
                raise InvalidInput(f"ssh {key} must be a non-negative integer")

    @property
    def destination(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}"


def ssh_options(target: SshTarget) -> list[str]:
    """ssh's options: the cluster key only, pinned host keys, nothing forwarded, no prompts.

    rsync and the replication verbs share one connection master per target.
    """
    opts = [
        "-i", _safe_path("identity file", target.identity_file),
        "-p", str(target.port),
        "-o", "BatchMode=yes",
        "-o", "IdentitiesOnly=yes",
        "-o", "IdentityAgent=none",
        "-o", "ForwardAgent=no",
        "-o", "ForwardX11=no",
        "-o", "ClearAllForwardings=yes",
        "-o", "PasswordAuthentication=no",
        "-o", "KbdInteractiveAuthentication=no",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={_safe_path('known_hosts file', target.known_hosts_file)}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "UpdateHostKeys=no",
        "-o", "LogLevel=ERROR",
        # AES-GCM first: with AES-NI it is several times faster than ChaCha20
        "-o", "Ciphers=aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com",
        "-o", f"ConnectTimeout={target.connect_timeout_s}",
        "-o", f"ServerAliveInterval={target.alive_interval_s}",
        "-o", f"ServerAliveCountMax={target.alive_count}",
        "-F", "/dev/null",
    ]  # fmt: skip
    if target.control_dir is not None:
        sock = f"{_safe_path('control directory', target.control_dir)}/v-%C"
        opts += [
            "-o", "ControlMaster=auto",
            "-o", f"ControlPath={sock}",
            "-o", f"ControlPersist={target.control_persist_s}",
        ]  # fmt: skip
    return opts


def ssh_argv(target: SshTarget, remote_command: Sequence[str]) -> list[str]:
    """argv running a replication verb on the receiver (its forced command reads it)."""
    words = list(remote_command)
    for word in words:
        if not re.match(r"^[A-Za-z0-9_.:=,-]+$", word):
            raise InvalidInput(f"remote command word {word!r} has unsafe characters")
    return [*_ssh_prefix(target), SSH, *ssh_options(target), target.destination, "--", *words]


def _ssh_prefix(target: SshTarget) -> list[str]:
    return ["ip", "netns", "exec", target.netns] if target.netns else []


def master_exit_argv(target: SshTarget) -> list[str] | None:
    """argv asking the target's connection master (if any) to exit; None without one."""
    if target.control_dir is None:
        return None
    return [
        *_ssh_prefix(target),
        SSH,
        *ssh_options(target),
        "-O",
        "exit",
        target.destination,
    ]


def master_check_argv(target: SshTarget) -> list[str] | None:
    """argv asking the target's connection master whether it runs (stderr names its pid)."""
    exit_argv = master_exit_argv(target)
    if exit_argv is None:
        return None
    i = exit_argv.index("-O")
    return [*exit_argv[: i + 1], "check", *exit_argv[i + 2 :]]


def parse_master_pid(stderr: str) -> int | None:
    """The pid in ssh's ``Master running (pid=1234)``, or None."""
    m = re.search(r"Master running \(pid=(\d+)\)", stderr)
    return int(m.group(1)) if m else None


def rsync_rsh(target: SshTarget) -> str:
    """The ``-e`` string for rsync (rsync splits it on spaces; every part is checked)."""
    return " ".join([*_ssh_prefix(target), SSH, *ssh_options(target)])


@dataclass(frozen=True)
class RsyncSettings:
    """Per-link transfer settings: rate limit (KiB/s, 0 = none), compression, timeout."""

    bwlimit_kbps: int = 0
    compress: bool = True
    compress_choice: str = "zstd"
    compress_level: int = 1
    io_timeout_s: int = 60
    fsync: bool = False  # the receiver fsyncs each delta itself before it enters a chain

    def __post_init__(self) -> None:
        if self.bwlimit_kbps < 0:
            raise InvalidInput("bwlimit_kbps must not be negative")
        if self.compress_choice not in ("zstd", "lz4", "zlib", "zlibx"):
            raise InvalidInput(f"compress_choice {self.compress_choice!r} is not supported")
        if not -1 <= self.compress_level <= 22:
            raise InvalidInput("compress_level must be between -1 and 22")
        if self.io_timeout_s < 0:
            raise InvalidInput("io_timeout_s must not be negative")


def _common_rsync_options(settings: RsyncSettings) -> list[str]:
    opts = [
        # Resumable: an interrupted file stays in the receiver's incoming
        # directory (a staging area no chain reads) and is the basis of the
        # next attempt. Not --partial-dir: a partial file already sits in
        # that staging area, and one directory is all the module exposes.
        "--partial",
        f"--checksum-choice={CHECKSUM_CHOICE}",
        f"--out-format={OUT_FORMAT}",
        "--stats",
        "--mkpath",
        "--perms",
        "--chmod=F600",
        "--times",
        f"--timeout={settings.io_timeout_s}",
    ]
    if settings.fsync:
        opts.append("--fsync")
    if settings.bwlimit_kbps:
        opts.append(f"--bwlimit={settings.bwlimit_kbps}")
    if settings.compress:
        opts += [
            "--compress",
            f"--compress-choice={settings.compress_choice}",
            f"--compress-level={settings.compress_level}",
        ]
    return opts


def rsync_push_argv(
    target: SshTarget,
    local_file: Path | Sequence[Path],
    remote_dir: str,
    settings: RsyncSettings,
    *,
    sparse: bool = False,
    progress: bool = False,
) -> list[str]:
    """argv pushing one file, or several in one run, into ``remote_dir/``.

    ``remote_dir`` is relative to the receiver's incoming directory (the
    rsync daemon module :data:`RSYNC_MODULE`, reached over SSH: ``host::``).

    Never ``--inplace``: rsync writes a temporary name and renames it only
    after the whole-file checksum matched (an interrupted transfer leaves a
    partial file in incoming, resumed next time); the receiver checks that
    checksum again before the file enters a chain.
    """
    argv = [RSYNC, *_common_rsync_options(settings)]
    if sparse:
        argv.append("--sparse")
    if progress:
        argv += ["--info=progress2", "--no-inc-recursive"]
    files = [local_file] if isinstance(local_file, Path) else list(local_file)
    if not files:
        raise InvalidInput("rsync needs at least one file to push")
    argv += [
        "-e",
        rsync_rsh(target),
        *(_safe_path("local file", f) for f in files),
        f"{target.destination}::{RSYNC_MODULE}/{_remote_rel(remote_dir.rstrip('/'))}/",
    ]
    return argv


def authorized_keys_line(
    public_key: str,
    python: Path,
    volumes_dir: Path,
    rsyncd_conf: Path,
    *,
    rsync: str = "/usr/bin/rsync",
    from_addresses: Sequence[str] = (),
    nice: int = 0,
) -> str:
    """The authorized_keys line restricting the cluster's replication key.

    ``restrict`` turns off forwarding, pty and X11. The forced command is a
    shell ``case`` on what the client asked for: exactly rsync's request for
    a daemon over SSH (:data:`RSYNC_DAEMON_REQUEST`) starts rsync's daemon
    mode with ``rsyncd_conf`` (one write-only module, the incoming directory:
    :func:`rsyncd_conf_text`); anything else starts
    :mod:`meshcloud.replication.serve`, which runs only its own verbs.
    ``case`` compares the client's words as one literal string (no
    splitting, no globbing of what it expands to), so nothing the client
    sends is ever run. With ``nice``, the rsync daemon runs at that CPU
    priority, its SSH session's autogroup too (background work: the
    receiving rack's control plane comes first).
    """
    if not 0 <= nice <= 19:
        raise InvalidInput(f"nice must be 0-19, not {nice}")
    rsync_cmd = shlex.join(
        [
            _safe_path("rsync", rsync),
            "--server",
            "--daemon",
            f"--config={_safe_path('rsyncd.conf', rsyncd_conf)}",
            ".",
        ]
    )
    serve_cmd = shlex.join(
        [
            _safe_path("python", python),
            "-m",
            "meshcloud.replication.serve",
            _safe_path("volumes", volumes_dir),
        ]
    )
    if nice:
        # the session's autogroup and the connection's sshd (its parent) too
        lower = f"echo {nice} > /proc/self/autogroup; echo {nice} > /proc/$PPID/autogroup"
        rsync_cmd = f"{{ {lower}; }} 2>/dev/null; exec nice -n {nice} {rsync_cmd}"
    else:
        rsync_cmd = f"exec {rsync_cmd}"
    command = (
        f"case $SSH_ORIGINAL_COMMAND in '{RSYNC_DAEMON_REQUEST}') {rsync_cmd} ;;"
        f" *) exec {serve_cmd} ;; esac"
    )
    return _key_line(public_key, command, from_addresses)


def rsyncd_conf_text(incoming_dir: Path) -> str:
    """rsyncd.conf of the single-use daemon the forced command starts over SSH.

    What rrsync ``-wo -no-del -no-lock`` enforced, done by rsync itself: one
    module, the incoming directory (paths are sanitised to stay inside it:
    ``use chroot = no``), write-only, unlisted, no deletions, no devices or
    special files, symlinks munged, files readable by their owner only. No
    lock file (several primaries push at once, each to its own names). rsync
    changes users only when it runs as root; ``uid = 0`` keeps it the login
    user's (replication.ssh_user) instead of ``nobody``. Errors reach the
    client over the protocol, so the daemon's own log goes nowhere (one run
    per cycle would flood syslog).
    """
    incoming = _safe_path("incoming", incoming_dir)
    return "\n".join(
        [
            "# written by meshcloud (meshcloud.replication.transport.rsyncd_conf_text):",
            "# rsync over SSH for the replication key may only drop files here",
            "log file = /dev/null",
            "transfer logging = no",
            "max connections = 0",
            "",
            f"[{RSYNC_MODULE}]",
            f"    path = {incoming}",
            "    comment = meshcloud replication deltas and seeds",
            "    use chroot = no",
            "    munge symlinks = yes",
            "    read only = no",
            "    write only = yes",
            "    list = no",
            "    uid = 0",
            "    gid = 0",
            "    numeric ids = yes",
            "    incoming chmod = Du=rwx,Dgo=,Fu=rw,Fgo=",
            "    refuse options = delete* remove-source-files devices specials"
            " write-devices copy-devices",
            "",
        ]
    )


def _key_line(public_key: str, command: str, from_addresses: Sequence[str]) -> str:
    key = public_key.strip()
    if not re.match(r"^(ssh-ed25519|ecdsa-sha2-nistp256|ssh-rsa) [A-Za-z0-9+/=]+( \S+)?$", key):
        raise InvalidInput("public key must be one OpenSSH public key line")
    options = [f'command="{command}"', "restrict"]
    if from_addresses:
        for addr in from_addresses:
            if not re.match(r"^[0-9A-Fa-f.:/*]+$", addr):
                raise InvalidInput(f"from address {addr!r} is not an address pattern")
        options.append(f'from="{",".join(from_addresses)}"')
    return f"{','.join(options)} {key}"


def keygen_argv(private_key: Path, comment: str = "meshcloud-replication") -> list[str]:
    """argv creating an ed25519 key pair without a passphrase (the kit's replication key)."""
    if not re.match(r"^[A-Za-z0-9@._-]+$", comment):
        raise InvalidInput(f"key comment {comment!r} has unsafe characters")
    return [
        "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment,
        "-f", _safe_path("private key", private_key),
    ]  # fmt: skip


def remote_disk_dir(appliance: str, disk: str) -> str:
    """Where deltas of ``appliance``/``disk`` land, relative to the incoming directory."""
    validate_name("appliance", appliance)
    validate_name("disk", disk)
    return _remote_rel(f"{appliance}/{disk}")


# -- output parsers ----------------------------------------------------------


@dataclass(frozen=True)
class RsyncResult:
    """What one rsync run reported: files transferred with their checksums, byte counts."""

    files: dict[str, tuple[int, str]]  # name -> (size, "xxh128:<hex>" or "")
    bytes_sent: int
    bytes_received: int
    literal_bytes: int
    matched_bytes: int
    total_file_bytes: int


_STAT_PATTERNS = {
    "bytes_sent": re.compile(r"^Total bytes sent: ([\d,.]+)", re.M),
    "bytes_received": re.compile(r"^Total bytes received: ([\d,.]+)", re.M),
    "literal_bytes": re.compile(r"^Literal data: ([\d,.]+)", re.M),
    "matched_bytes": re.compile(r"^Matched data: ([\d,.]+)", re.M),
    "total_file_bytes": re.compile(r"^Total file size: ([\d,.]+)", re.M),
}


def _stat_number(text: str) -> int:
    return int(text.replace(",", "").replace(".", ""))


def _tagged_checksum(text: str) -> str:
    """rsync's ``%C`` as ``<algorithm>:<hex>`` (by its length), or "" if it printed none."""
    digest = text.strip().lower()
    if re.fullmatch(r"[0-9a-f]{32}", digest):
        return f"xxh128:{digest}"
    if re.fullmatch(r"[0-9a-f]{40}", digest):
        return f"sha1:{digest}"
    return ""


def parse_rsync_output(stdout: str) -> RsyncResult:
    """Parse the ``--out-format`` lines and ``--stats`` block of one rsync run."""
    files: dict[str, tuple[int, str]] = {}
    for line in stdout.splitlines():
        line = line.strip().replace("\r", "")
        if not line.startswith("mcfile|"):
            continue
        parts = line.split("|")
        if len(parts) != 4:
            continue
        _, name, size, checksum = parts
        files[name] = (_stat_number(size), _tagged_checksum(checksum))
    stats = {}
    for key, pattern in _STAT_PATTERNS.items():
        match = pattern.search(stdout)
        stats[key] = _stat_number(match.group(1)) if match else 0
    return RsyncResult(files=files, **stats)


_PROGRESS_RE = re.compile(r"^\s*([\d,]+)\s+(\d+)%")


def parse_progress2(chunk: str) -> tuple[int, int] | None:
    """``(bytes done, percent)`` from the last ``--info=progress2`` update in ``chunk``."""
    last = None
    for piece in re.split(r"[\r\n]", chunk):
        match = _PROGRESS_RE.match(piece)
        if match:
            last = (_stat_number(match.group(1)), int(match.group(2)))
    return last

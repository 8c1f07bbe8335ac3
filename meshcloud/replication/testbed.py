"""A throwaway sshd serving the replication forced command, for tests and benchmarks.

It listens on a loopback address (or inside a network namespace the caller
made), trusts one generated replication key with exactly the
authorized_keys line racks use, and pins its host key in a known_hosts
file, so that tests exercise the real transport: ssh, the forced command, rsync's daemon mode, serve.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from meshcloud.core.errors import ReplicationError
from meshcloud.lab.netns import in_netns
from meshcloud.replication.transport import (
    SshTarget,
    authorized_keys_line,
    keygen_argv,
    rsyncd_conf_text,
)

SSHD = "/usr/sbin/sshd"
LOGIN_USER = "mcrepl"


def ensure_login_user(name: str = LOGIN_USER) -> str:
    """A root-equivalent login whose shell is /bin/sh, for the replication key.

    sshd runs forced commands through the account's login shell; root's is
    bash, which reads ~/.bashrc for ssh sessions (hundreds of ms on a
    developer machine with pyenv). Racks should use an account like this
    one (see docs/replication.md).
    """
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "-o", "-u", "0", "-g", "0", "-M", "-d", "/", "-s", "/bin/sh",
             "-p", "*", name],
            check=True,
            capture_output=True,
        )  # fmt: skip
        # "-p *": no password, but not a locked account (sshd refuses locked ones outright)
    return name


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def make_keypair(private_key: Path, comment: str = "meshcloud-replication") -> str:
    """Create an ed25519 key pair at ``private_key`` (if absent); return the public key line."""
    if not private_key.exists():
        subprocess.run(keygen_argv(private_key, comment), check=True, capture_output=True)
    return private_key.with_suffix(".pub").read_text().strip()


class LoopbackSshd:
    """``with LoopbackSshd(workdir, volumes) as sshd: sshd.target()``."""

    def __init__(
        self,
        workdir: Path,
        volumes: Path,
        *,
        address: str = "127.0.0.1",
        port: int | None = None,
        netns: str | None = None,
        client_key: Path | None = None,
        python: Path | None = None,
        nice: int = 0,
    ) -> None:
        self.workdir = workdir
        self.volumes = volumes
        self.address = address
        self.port = port or free_port(address if netns is None else "127.0.0.1")
        self.netns = netns
        self.client_key = client_key or workdir / "client_ed25519"
        self.python = python or Path(sys.executable)
        self.nice = nice  # the receiving rsync's CPU priority (the daemon's: replication.nice)
        self.proc: subprocess.Popen[bytes] | None = None
        self.user = LOGIN_USER

    @property
    def known_hosts(self) -> Path:
        return self.workdir / "known_hosts"

    @property
    def rsyncd_conf(self) -> Path:
        return self.workdir / "rsyncd.conf"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o700)
        self.user = ensure_login_user()
        self.volumes.mkdir(parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(exist_ok=True)
        host_key = self.workdir / "host_ed25519"
        host_pub = make_keypair(host_key, "meshcloud-test-host")
        client_pub = make_keypair(self.client_key)
        (self.volumes / ".incoming").mkdir(parents=True, exist_ok=True)
        self.rsyncd_conf.write_text(rsyncd_conf_text(self.volumes / ".incoming"))
        (self.workdir / "authorized_keys").write_text(
            authorized_keys_line(
                client_pub, self.python, self.volumes, self.rsyncd_conf, nice=self.nice
            )
            + "\n"
        )
        host = f"[{self.address}]:{self.port}" if self.port != 22 else self.address
        self.known_hosts.write_text(f"{host} {' '.join(host_pub.split()[:2])}\n")
        config = self.workdir / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    f"ListenAddress {self.address}",
                    f"HostKey {host_key}",
                    f"PidFile {self.workdir / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.workdir / 'authorized_keys'}",
                    "StrictModes no",
                    "UsePAM no",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PermitRootLogin forced-commands-only",
                    "MaxStartups 200",
                    "MaxSessions 200",
                    "LogLevel ERROR",
                    f"SetEnv PATH={os.environ.get('PATH', '/usr/bin:/bin')}",
                    "",
                ]
            )
        )
        argv = in_netns(self.netns, [SSHD, "-D", "-e", "-f", str(config)])
        log = (self.workdir / "sshd.log").open("ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ReplicationError(
                    f"sshd exited at once: {(self.workdir / 'sshd.log').read_text()[-500:]}"
                )
            if self._listening():
                return
            time.sleep(0.02)
        raise ReplicationError(f"sshd did not listen on {self.address}:{self.port} in 15 s")

    def _listening(self) -> bool:
        if self.netns is not None:
            out = subprocess.run(
                in_netns(self.netns, ["ss", "-ltnH", f"sport = :{self.port}"]),
                capture_output=True,
                text=True,
                check=False,
            )
            return str(self.port) in out.stdout
        try:
            with socket.create_connection((self.address, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def target(self, control_dir: Path | None = None) -> SshTarget:
        return SshTarget(
            host=self.address,
            port=self.port,
            identity_file=self.client_key,
            user=self.user,
            known_hosts_file=self.known_hosts,
            control_dir=control_dir,
        )

    def stop(self) -> None:
        """Stop sshd and its connections (a client's connection master ends with them)."""
        if self.proc is not None and self.proc.poll() is None:
            for pid in descendants(self.proc.pid):  # orphaned, they would outlive sshd
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def kill(self) -> None:
        """Kill sshd and everything it started at once (a rack dying mid-request).

        Each connection's sshd child starts its own session, so the process
        tree is walked rather than a process group killed.
        """
        if self.proc is None:
            return
        for pid in [self.proc.pid, *descendants(self.proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> LoopbackSshd:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def have_sshd() -> bool:
    return Path(SSHD).exists() and shutil.which("rsync") is not None and os.geteuid() == 0

"""The one executor of replication's rsync and ssh command lines.

Each process runs in its own session (so a cancel kills rsync and the ssh
it started), with a timeout, never through a shell of ours. ``on_output``
receives stdout as it arrives (rsync's progress for seeding).

Replication is background work: with ``nice`` set, every process runs below
the control plane's priority (:func:`lowered_argv`), so the rack's API,
Raft and agent keep their latency when a rack is busy shipping.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from meshcloud.core.errors import ReplicationError

# A new session is a new autogroup: the kernel shares the CPU between autogroups
# first and only then by nice, so the session's own group must be lowered too
# (where autogroups are off, the write fails and nice alone does the work). The
# whole pipeline is lowered (ssh's master, the receiver's sshd too): a stage left
# at the daemon's priority would make the lowered ones wait for it even on an
# idle rack.
_LOWER = '{ echo "$0" > /proc/self/autogroup; } 2>/dev/null; exec nice -n "$0" "$@"'


def lowered_argv(argv: Sequence[str], nice: int, *, own_session: bool = True) -> list[str]:
    """``argv`` run at CPU priority ``nice`` (0: unchanged); its autogroup too in its own session.

    The words of ``argv`` reach ``nice`` as arguments ("$@"), never as shell text.
    """
    if not 0 <= nice <= 19:
        raise ValueError(f"nice must be 0-19, not {nice}")
    if nice == 0:
        return list(argv)
    if not own_session:
        return ["nice", "-n", str(nice), *argv]
    return ["sh", "-c", _LOWER, str(nice), *argv]


@dataclass(frozen=True)
class ProcessResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    elapsed_s: float


class ProcessRunner:
    """Runs argv lists; :meth:`cancel_all` kills whatever is running (fencing)."""

    def __init__(self, nice: int = 0) -> None:
        lowered_argv([], nice)  # checks the range
        self.nice = nice
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen[bytes]] = set()

    def run(
        self,
        argv: Sequence[str],
        *,
        input_bytes: bytes | None = None,
        timeout_s: float = 3600.0,
        on_output: Callable[[str], None] | None = None,
    ) -> ProcessResult:
        start = time.monotonic()
        try:
            proc = subprocess.Popen(
                lowered_argv(argv, self.nice),
                stdin=subprocess.PIPE if input_bytes is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise ReplicationError(f"{argv[0]} is not installed: run `make bootstrap`") from exc
        with self._lock:
            self._running.add(proc)
        out_chunks: list[bytes] = []
        err_chunks: list[bytes] = []

        def pump_err() -> None:
            assert proc.stderr is not None
            while chunk := proc.stderr.read(65536):
                err_chunks.append(chunk)

        def pump_out() -> None:
            assert proc.stdout is not None
            while chunk := os.read(proc.stdout.fileno(), 65536):
                out_chunks.append(chunk)
                if on_output is not None:
                    on_output(chunk.decode("utf-8", "replace"))

        threads = [threading.Thread(target=pump_err, daemon=True)]
        threads.append(threading.Thread(target=pump_out, daemon=True))
        for t in threads:
            t.start()
        try:
            if input_bytes is not None:
                assert proc.stdin is not None
                try:
                    proc.stdin.write(input_bytes)
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
            # A blocking wait returns the moment the process ends; Popen.wait(timeout=)
            # polls with sleeps of up to 50 ms, which every transfer would pay.
            timed_out = threading.Event()

            def expire() -> None:
                timed_out.set()
                self._kill(proc)

            timer = threading.Timer(timeout_s, expire)
            timer.daemon = True
            timer.start()
            try:
                proc.wait()
            finally:
                timer.cancel()
            if timed_out.is_set():
                raise ReplicationError(
                    f"{argv[0]} took longer than {timeout_s} s and was stopped; it will be retried"
                )
        finally:
            for t in threads:
                t.join(timeout=10)
            with self._lock:
                self._running.discard(proc)
            if proc.poll() is None:
                self._kill(proc)
                proc.wait()
        return ProcessResult(
            tuple(argv),
            proc.returncode,
            b"".join(out_chunks).decode("utf-8", "replace"),
            b"".join(err_chunks).decode("utf-8", "replace"),
            time.monotonic() - start,
        )

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def cancel_all(self) -> int:
        """Kill every running process (and its session); return how many."""
        with self._lock:
            procs = list(self._running)
        for proc in procs:
            self._kill(proc)
        return len(procs)

    def running_pids(self) -> list[int]:
        with self._lock:
            return [p.pid for p in self._running]

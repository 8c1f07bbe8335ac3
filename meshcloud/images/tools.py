"""Errors of the images package and the one runner for the tools it calls.

Command lines are built by pure functions elsewhere (lists of arguments,
never a shell string); :func:`run_tool` is the only place that runs them.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence

from meshcloud.core.errors import MeshcloudError

CLEAN_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
}


class ImageError(MeshcloudError):
    """Building or reading a rack image failed."""


class KitError(MeshcloudError):
    """A deployment kit cannot be made or read."""


class FlashRefused(MeshcloudError):
    """A target device is not safe to flash; nothing was written to it."""


class FlashError(MeshcloudError):
    """Writing or verifying a device failed."""


def run_tool(
    argv: Sequence[str],
    *,
    on_line: Callable[[str], None] | None = None,
    input_text: str | None = None,
    env: Mapping[str, str] | None = None,
    clean_env: bool = False,
    error: type[MeshcloudError] = ImageError,
    what: str = "",
) -> str:
    """Run ``argv``; stream its output lines to ``on_line``; return the output.

    ``clean_env`` starts from a minimal environment (for commands run inside
    an image, which must not see the build machine's settings). Raises ``error`` naming the command and the last lines of its output when
    it exits non-zero or cannot be started.
    """
    full_env = dict(CLEAN_ENV) if clean_env else dict(os.environ)
    if env:
        full_env.update(env)
    label = what or argv[0]
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE if input_text is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=full_env,
        )
    except OSError as exc:
        raise error(f"{label}: cannot run {argv[0]}: {exc} (is it installed?)") from exc
    if input_text is not None:
        # Fed from a thread: a tool that echoes its input (debugfs) would otherwise fill
        # its output pipe while we still write, and both would wait for ever.
        stdin = proc.stdin
        assert stdin is not None

        def feed() -> None:
            with contextlib.suppress(BrokenPipeError):
                stdin.write(input_text)
            with contextlib.suppress(BrokenPipeError):
                stdin.close()

        feeder = threading.Thread(target=feed, name=f"stdin-{argv[0]}", daemon=True)
        feeder.start()
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip("\n")
        lines.append(line)
        if on_line is not None:
            on_line(line)
    code = proc.wait()
    if code != 0:
        tail = "\n".join(lines[-15:])
        raise error(f"{label} failed (exit {code}): {' '.join(argv)}\n{tail}")
    return "\n".join(lines)

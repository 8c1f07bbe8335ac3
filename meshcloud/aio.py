"""Waiting with a deadline without losing a cancellation.

``asyncio.wait_for`` in Python 3.11 returns the awaited result when the result
arrives in the same loop iteration as a cancellation of the waiting task, and
the cancellation is lost (CPython bpo-42130; 3.12 rebuilt ``wait_for`` on
``asyncio.timeout``). A daemon task that loses its cancellation keeps running
while the daemon stops, and the daemon then waits for it forever: a rack told
to stop just as its formation loop woke up did exactly that. Everything here is
built on ``asyncio.timeout``, which does not have that race; the daemon does not
use ``asyncio.wait_for``.
"""

from __future__ import annotations

import asyncio
import io
import sys
import threading
import traceback
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


async def wait_event(event: asyncio.Event, timeout_s: float | None) -> bool:
    """Wait until ``event`` is set or ``timeout_s`` passed; True when it is set."""
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True


async def within(aw: Awaitable[T], timeout_s: float | None) -> T:
    """``await aw``, raising TimeoutError after ``timeout_s`` (None: no limit)."""
    async with asyncio.timeout(timeout_s):
        return await aw


def dump_tasks() -> str:
    """Every asyncio task's and every thread's stack, for a daemon that will not stop.

    The daemon logs it on SIGUSR1 (``kill -USR1 PID``): what each task awaits is
    what a stuck stop waits for.
    """
    out = io.StringIO()
    for task in sorted(asyncio.all_tasks(), key=lambda t: t.get_name()):
        out.write(f"task {task.get_name()}:\n")
        awaiting: Any = task.get_coro()
        while awaiting is not None:  # down the chain of awaits to what it waits for
            frame = getattr(awaiting, "cr_frame", None) or getattr(awaiting, "ag_frame", None)
            if frame is not None:
                out.write(
                    f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}\n"
                )
            inner = getattr(awaiting, "cr_await", None) or getattr(awaiting, "ag_await", None)
            if inner is None:
                break
            if not hasattr(inner, "cr_frame") and not hasattr(inner, "ag_frame"):
                out.write(f"  waits for {inner!r}\n")
                break
            awaiting = inner
    names = {t.ident: t.name for t in threading.enumerate()}
    for ident, frame in sys._current_frames().items():
        out.write(f"thread {names.get(ident, ident)}:\n")
        out.write("".join(traceback.format_stack(frame, limit=8)))
    return out.getvalue()

"""Drive Debian's Chromium against a lab rack's console (tests, bench/console.py, the demo).

Chromium runs in the root namespace; a :class:`Forwarder` relays a loopback
port to a rack's API from the lab's observer namespace. Playwright only
drives the browser: it never downloads one (``playwright install`` is never
run), and :func:`chromium` starts ``/usr/bin/chromium`` with a fresh profile.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from meshcloud.core.errors import MeshcloudError
from meshcloud.hypervisor.reach import async_serve_forward
from meshcloud.lab.lab import Lab
from meshcloud.lab.plan import API_PORT

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LOCALHOST = "127.0.0.1"
T = TypeVar("T")


def browser_unavailable() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} is missing: apt-get install chromium (scripts/debian-packages.txt)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing: pip install -e '.[dev]'"
    return None


class Forwarder:
    """Relays ``127.0.0.1:<port>`` to ``rack``'s API, from the observer namespace.

    Runs its own event loop in a thread. Use as a context manager; ``url`` is
    the console's address.
    """

    def __init__(self, lab: Lab, rack: str) -> None:
        self.lab = lab
        self.rack = rack
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="forwarder", daemon=True
        )
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        """The console's address: https:// when the lab runs with TLS."""
        return f"{'https' if self.lab.tls else 'http'}://{LOCALHOST}:{self.port}/"

    def _start_server(self, port: int) -> None:
        ip = self.lab.rack(self.rack).ip
        future = asyncio.run_coroutine_threadsafe(
            async_serve_forward(LOCALHOST, port, self.lab.bridge_netns, ip, API_PORT), self._loop
        )
        self._server = future.result(timeout=10)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop_server(self) -> None:
        if self._server is not None:
            server = self._server
            self._server = None

            async def close() -> None:
                server.close()
                current = asyncio.current_task()
                relays = [t for t in asyncio.all_tasks() if t is not current]
                for task in relays:
                    task.cancel()
                await asyncio.gather(*relays, return_exceptions=True)

            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)

    def __enter__(self) -> Forwarder:
        self._thread.start()
        self._start_server(0)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_server()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


def run_in_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` (which drives Playwright's sync API) in a thread of its own; re-raise.

    Playwright's sync API switches greenlets, which on CPython 3.11 can upset
    the thread's recursion bookkeeping ("AST constructor recursion depth
    mismatch" on a later import); a separate thread keeps the caller's clean.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def work() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # handed to the caller below
            error.append(exc)

    worker = threading.Thread(target=work, name="browser")
    worker.start()
    worker.join()
    if error:
        raise error[0]
    return result[0]


@contextmanager
def chromium(extra_args: Sequence[str] = (), **launch_options: Any) -> Iterator[Any]:
    """A Playwright browser (sync API) on Debian's Chromium with a fresh profile.

    Yields the Browser; make contexts with ``browser.new_context(...)``.
    ``extra_args`` are added to Chromium's command line (e.g. a pinned key).
    """
    reason = browser_unavailable()
    if reason is not None:
        raise MeshcloudError(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        # launch() gives every run a fresh temporary profile (user-data dir) of its own
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[*CHROMIUM_ARGS, *extra_args],
            headless=True,
            **launch_options,
        )
        try:
            yield browser
        finally:
            browser.close()

"""The rack daemon: one asyncio program that runs every part of a rack."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from contextlib import AsyncExitStack
from typing import Any

from aiohttp import web

from meshcloud.config import DaemonConfig
from meshcloud.web.app import WebContext, create_app
from meshcloud.web.auth import api_token

log = logging.getLogger("meshcloud.daemon")


class Daemon:
    """Starts the rack's parts in order and stops them in reverse."""

    def __init__(self, cfg: DaemonConfig, secret: str) -> None:
        self.cfg = cfg
        self.secret = secret
        self.stopping = asyncio.Event()
        self.web_context = WebContext(
            rack=cfg.rack.name, site=cfg.rack.site, api_token=api_token(secret), status=self.status
        )

    def status(self) -> dict[str, Any]:
        return {"state": "running"}

    async def _start_web(self, stack: AsyncExitStack) -> None:
        app = create_app(self.web_context)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        net = self.cfg.network
        site = web.TCPSite(runner, net.bind_address, net.api_port, reuse_address=True)
        await site.start()
        log.info("API listening on %s:%d", net.bind_address, net.api_port)

    async def run(self) -> None:
        """Run until ``stopping`` is set (SIGTERM/SIGINT)."""
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        async with AsyncExitStack() as stack:
            await self._start_web(stack)
            log.info("rack %s (site %s) started", self.cfg.rack.name, self.cfg.rack.site)
            await self.stopping.wait()
            log.info("rack %s stopping", self.cfg.rack.name)


def run_daemon(cfg: DaemonConfig) -> None:
    """Entry point of `meshcloud daemon`: refuses to start without a good secret."""
    secret = cfg.read_secret()
    os.umask(0o077)

    async def main() -> None:
        daemon = Daemon(cfg, secret)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, daemon.stopping.set)
        await daemon.run()

    asyncio.run(main())

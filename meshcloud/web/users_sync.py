"""Console users kept alike on every rack: pushed on change, pulled now and then.

Each rack keeps its own users file (users.py). When it changes here (a new
user, a password, a spent emergency code), the whole document (argon2 hashes
only) is sent to every other member rack's ``PUT /api/v1/console/users-doc``;
every ``interval_s`` each rack also fetches the others' documents, so that a
rack that was away catches up. Merging (:meth:`UserStore.adopt`) keeps the
higher revision and every spent code. Requests carry the cluster's bearer
token; only that token may read or write the document.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from meshcloud.aio import wait_event
from meshcloud.core.errors import InvalidInput, MeshcloudError
from meshcloud.web.control import ClusterControl
from meshcloud.web.tls import PLAIN, PeerTLS, certificate_problem
from meshcloud.web.users import UsersDoc, UserStore, parse_users

log = logging.getLogger(__name__)

DOC_PATH = "/api/v1/console/users-doc"
PULL_INTERVAL_S = 30.0
REQUEST_TIMEOUT_S = 5.0


class UsersSync:
    """Pushes local changes to the other racks and pulls theirs."""

    def __init__(
        self,
        users: UserStore,
        control: ClusterControl,
        rack: str,
        token: str,
        interval_s: float = PULL_INTERVAL_S,
        tls: PeerTLS = PLAIN,
    ) -> None:
        self.users = users
        self.tls = tls
        self.control = control
        self.rack = rack
        self.token = token
        self.interval_s = interval_s
        self._wake = asyncio.Event()
        self._pending: UsersDoc | None = None
        users.on_change.append(self._changed)

    def _changed(self, doc: UsersDoc) -> None:
        self._pending = doc
        self._wake.set()

    def peers(self) -> list[str]:
        """Base URLs of the other member racks (from the placement map)."""
        try:
            racks = self.control.snapshot().racks
        except MeshcloudError:
            return []
        return [
            self.tls.base_url(r.address, r.api_port)
            for name, r in sorted(racks.items())
            if name != self.rack and r.address and r.api_port
        ]

    async def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with aiohttp.ClientSession(
            headers=headers, timeout=timeout, connector=self.tls.connector()
        ) as session:
            while True:
                await wait_event(self._wake, self.interval_s)
                self._wake.clear()
                pending, self._pending = self._pending, None
                if pending is not None:
                    await asyncio.gather(*(self._push(session, p, pending) for p in self.peers()))
                else:
                    await asyncio.gather(*(self._pull(session, p) for p in self.peers()))

    async def _push(self, session: aiohttp.ClientSession, peer: str, doc: UsersDoc) -> None:
        try:
            async with session.put(peer + DOC_PATH, json=doc.to_dict()) as resp:
                if resp.status != 200:
                    log.info("users to %s: HTTP %d", peer, resp.status)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            _log_failure(f"users to {peer}", exc, "it catches up later")

    async def _pull(self, session: aiohttp.ClientSession, peer: str) -> None:
        try:
            async with session.get(peer + DOC_PATH) as resp:
                if resp.status != 200:
                    return
                data = await resp.json()
            await self.users.adopt(parse_users(data, f"users from {peer}"))
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError, InvalidInput) as exc:
            _log_failure(f"users from {peer}", exc)


def _log_failure(what: str, exc: BaseException, then: str = "") -> None:
    """A refused certificate is a warning (someone else's rack?); the rest is routine."""
    problem = certificate_problem(exc)
    suffix = f" ({then})" if then else ""
    if problem is not None:
        log.warning("%s: %s%s", what, problem, suffix)
    else:
        log.info("%s: %s%s", what, exc, suffix)


SYNC = web.AppKey("users_sync", UsersSync)


async def sync_context(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: run the sync while the app runs."""
    task = asyncio.create_task(app[SYNC].run(), name="users-sync")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _only_the_token(request: web.Request) -> None:
    from meshcloud.web.auth import request_principal

    principal = request_principal(request)
    if principal is None or principal.via != "token":
        raise web.HTTPForbidden(reason="only racks (the cluster's bearer token) may do this")


async def get_users_doc(request: web.Request) -> web.Response:
    _only_the_token(request)
    doc = await request.app[SYNC].users.doc()
    return web.json_response(doc.to_dict())


async def put_users_doc(request: web.Request) -> web.Response:
    _only_the_token(request)
    try:
        data: Any = await request.json()
    except ValueError:
        raise InvalidInput("send the users document as JSON") from None
    changed = await request.app[SYNC].users.adopt(parse_users(data, "users document"))
    return web.json_response({"changed": changed})

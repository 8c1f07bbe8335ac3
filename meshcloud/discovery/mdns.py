"""mDNS announce and browse with python-zeroconf's asyncio classes.

One :class:`MdnsAgent` per rack, bound to the rack's mesh address only
(``interfaces=[bind_address]``). It announces ``_meshcloud._tcp.local.``
with the rack's TXT record and reports every *valid* announcement of the
same cluster to a callback. Garbage records are logged (once per name and
problem) and ignored. An announcement is only a hint of where to knock:
admission decides who is a peer, and nothing here says whether a rack is
alive (zeroconf keeps a dead rack's records for about 1,125 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Callable
from typing import Any

from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from meshcloud.core.errors import InvalidInput, MeshcloudError
from meshcloud.discovery.records import SERVICE_TYPE, Announcement, parse_txt, txt_properties

log = logging.getLogger(__name__)

RESOLVE_TIMEOUT_MS = 3000
MAX_CONCURRENT_RESOLVES = 8
MAX_TRACKED_NAMES = 1024

OnAnnouncement = Callable[[Announcement, tuple[str, ...]], None]
OnRemoved = Callable[[str], None]


class MdnsUnavailable(MeshcloudError):
    """mDNS cannot run on the configured address."""


def _ip_version(address: str) -> IPVersion:
    return IPVersion.V6Only if ipaddress.ip_address(address).version == 6 else IPVersion.V4Only


class MdnsAgent:
    """Announces this rack and browses for racks of the same cluster.

    ``on_announcement(announcement, addresses)`` is called on the event loop
    for each valid record of our cluster (not our own), whenever it is added
    or updated; ``on_removed(rack)`` when a record is withdrawn (a goodbye: a
    hint only).
    """

    def __init__(
        self,
        bind_address: str,
        cluster_id: str,
        own_name: str,
        on_announcement: OnAnnouncement,
        on_removed: OnRemoved | None = None,
    ) -> None:
        self.bind_address = bind_address
        self.cluster_id = cluster_id
        self.own_name = own_name
        self.on_announcement = on_announcement
        self.on_removed = on_removed
        self._version = _ip_version(bind_address)
        self._aiozc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._resolving: set[str] = set()
        self._again: set[str] = set()
        self._problems: dict[str, str] = {}
        self._racks_by_name: dict[str, str] = {}
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_RESOLVES)

    def _service_info(self, ann: Announcement, name: str | None = None) -> AsyncServiceInfo:
        return AsyncServiceInfo(
            SERVICE_TYPE,
            name or ann.instance_name(),
            port=ann.api_port,
            properties=txt_properties(ann),
            server=ann.host_name(),
            parsed_addresses=[self.bind_address],
        )

    async def start(self, ann: Announcement) -> None:
        """Bind to the mesh address, announce ``ann`` and start browsing."""
        try:
            self._aiozc = AsyncZeroconf(interfaces=[self.bind_address], ip_version=self._version)
        except OSError as exc:
            raise MdnsUnavailable(
                f"cannot run mDNS on {self.bind_address}: {exc}. Check that network.bind_address"
                " is an address of this rack's mesh interface, or set cluster.mdns: false and"
                " list cluster.peers"
            ) from exc
        info = self._service_info(ann)
        # Browse first, so that peers can be found and admitted meanwhile.
        self._browser = AsyncServiceBrowser(
            self._aiozc.zeroconf, [SERVICE_TYPE], handlers=[self._on_service_state_change]
        )
        # No uniqueness probing (RFC 6762 section 8.1: about a second before a rack can
        # be seen): the instance name is the rack's name and cluster id, and a name is
        # never trusted anyway (admission proves who answers). Two racks configured with
        # one name both announce; admission reports the clash (409, same name).
        await self._aiozc.async_register_service(
            info, allow_name_change=True, cooperating_responders=True
        )
        self._info = info
        if info.name != ann.instance_name():
            log.warning(
                "mDNS name %s was taken on the network; announcing as %s",
                ann.instance_name(),
                info.name,
            )
        log.info("mDNS: announcing %s on %s", info.name, self.bind_address)

    async def update(self, ann: Announcement) -> None:
        """Replace the announced TXT record (for instance when the rack joins a cluster)."""
        if self._aiozc is None or self._info is None:
            return
        info = self._service_info(ann, self._info.name)
        await self._aiozc.async_update_service(info)
        self._info = info

    async def stop(self) -> None:
        """Stop browsing, send goodbyes and close the sockets."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        if self._aiozc is not None:
            await self._aiozc.async_close()
            self._aiozc = None

    def _on_service_state_change(
        self, zeroconf: Any, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            rack = self._racks_by_name.pop(name, None)
            if rack is not None and self.on_removed is not None:
                self.on_removed(rack)
            return
        if name in self._resolving:
            self._again.add(name)
            return
        if len(self._resolving) >= MAX_TRACKED_NAMES:
            return
        self._resolving.add(name)
        task = asyncio.get_running_loop().create_task(self._resolve(name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, name: str) -> None:
        try:
            while True:
                self._again.discard(name)
                async with self._slots:
                    await self._resolve_once(name)
                if name not in self._again:
                    return
        finally:
            self._resolving.discard(name)

    def _problem(self, name: str, problem: str) -> None:
        if self._problems.get(name) != problem:
            if len(self._problems) >= MAX_TRACKED_NAMES:
                self._problems.clear()
            self._problems[name] = problem
            log.warning("mDNS record %r ignored: %s", name[:120], problem)

    async def _resolve_once(self, name: str) -> None:
        if self._aiozc is None:
            return
        try:
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            if not await info.async_request(self._aiozc.zeroconf, RESOLVE_TIMEOUT_MS):
                log.debug("mDNS record %r did not resolve in time", name)
                return
            ann = parse_txt(info.properties)
        except InvalidInput as exc:
            self._problem(name, str(exc))
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a hostile record must never take the daemon down
            self._problem(name, f"{type(exc).__name__}: {exc}")
            return
        if ann.cluster_id != self.cluster_id:
            log.debug("mDNS record %r belongs to another cluster", name)
            return
        if ann.rack == self.own_name:
            return
        addresses = []
        for text in info.parsed_addresses(self._version):
            try:
                address = ipaddress.ip_address(text)
            except ValueError:
                continue
            if address.is_multicast or address.is_unspecified:
                continue
            addresses.append(str(address))
        if not addresses:
            self._problem(name, "no usable address")
            return
        self._problems.pop(name, None)
        self._racks_by_name[name] = ann.rack
        self.on_announcement(ann, tuple(addresses))

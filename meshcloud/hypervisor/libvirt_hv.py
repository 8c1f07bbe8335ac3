"""The libvirt implementation of the hypervisor contract.

- ``qemu:///embed?root=DIR`` (lab, demo, tests): libvirt's QEMU driver runs
  inside this process, with its state under DIR; no daemon. Only one process
  at a time may open a given root, and a process can open only one root
  (several connections to it are fine); QEMU keeps running if this process
  dies, and the next opener of the root adopts it.
- ``qemu:///system`` (real racks): the system libvirtd.

Every blocking libvirt call runs on ONE executor thread per hypervisor, so
calls are serialised and never touch the event loop. That thread may be
placed in a network namespace (``netns=``): QEMU is forked from it and the
taps libvirt creates from it live there, next to the rack's bridge.

libvirt delivers events on a process-wide thread running its default event
loop; lifecycle callbacks hop onto the asyncio loop with
``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import libvirt

from meshcloud.core.errors import Conflict, HypervisorError, InvalidInput, NotFound
from meshcloud.core.models import ApplianceSpec
from meshcloud.core.names import validate_name
from meshcloud.hypervisor.base import (
    DomainInfo,
    DomainState,
    EventKind,
    Hypervisor,
    LifecycleEvent,
)
from meshcloud.hypervisor.domain_xml import (
    METADATA_NS,
    HostDetails,
    appliance_of,
    build_domain_xml,
    domain_name,
)
from meshcloud.hypervisor.priority import check_nice, deprioritise, qemu_pid_file, read_pid
from meshcloud.lab.netns import NETNS_DIR, check_netns, enter_netns_for_thread

log = logging.getLogger(__name__)
T = TypeVar("T")

SYSTEM_URI = "qemu:///system"
SYSTEM_RUN_DIR = Path("/run/libvirt")  # the system daemon's QEMU pid files: /run/libvirt/qemu/
MAX_EMBED_ROOT_LEN = 48
_EMBED_ROOT_RE = re.compile(r"^/[A-Za-z0-9_./-]*$")
EMBED_QEMU_CONF = """\
# Written by meshcloud for libvirt's embedded QEMU driver (see docs/hypervisor.md).
user = "root"
group = "root"
security_driver = "none"
stdio_handler = "file"
dynamic_ownership = 0
remember_owner = 0
"""

# libvirt's virDomainState and virDomainEventType / detail enums, as plain ints
# so that the mapping is a pure, testable table.
_STATES = {
    0: DomainState.OTHER,  # NOSTATE
    1: DomainState.RUNNING,
    2: DomainState.RUNNING,  # BLOCKED (on I/O): still running
    3: DomainState.PAUSED,
    4: DomainState.SHUTTING_DOWN,
    5: DomainState.SHUTOFF,
    6: DomainState.CRASHED,
    7: DomainState.OTHER,  # PMSUSPENDED
}
_SUSPENDED_DETAILS = (
    "paused", "migrated", "io-error", "watchdog", "restored", "from-snapshot", "api-error",
    "postcopy", "postcopy-failed",
)  # fmt: skip
_EVENTS: dict[int, tuple[EventKind, tuple[str, ...]]] = {
    0: (EventKind.DEFINED, ("added", "updated", "renamed", "from-snapshot")),
    1: (EventKind.UNDEFINED, ("removed", "renamed")),
    2: (EventKind.STARTED, ("booted", "migrated", "restored", "from-snapshot", "wakeup")),
    3: (EventKind.SUSPENDED, _SUSPENDED_DETAILS),
    4: (
        EventKind.RESUMED,
        ("unpaused", "migrated", "from-snapshot", "postcopy", "postcopy-failed"),
    ),
    5: (
        EventKind.STOPPED,
        ("shutdown", "destroyed", "crashed", "migrated", "saved", "failed", "from-snapshot"),
    ),
    6: (EventKind.SHUTDOWN, ("finished", "guest", "host")),
    7: (EventKind.OTHER, ("pm-suspended-memory", "pm-suspended-disk")),
    8: (EventKind.CRASHED, ("panicked", "crashloaded")),
}


def map_state(code: int) -> DomainState:
    """libvirt's domain state code -> DomainState."""
    return _STATES.get(code, DomainState.OTHER)


def map_event(event: int, detail: int) -> tuple[EventKind, str]:
    """libvirt's lifecycle (event, detail) codes -> (EventKind, detail word)."""
    kind, details = _EVENTS.get(event, (EventKind.OTHER, ()))
    word = details[detail] if 0 <= detail < len(details) else f"detail-{detail}"
    return kind, word


def embed_uri(root: Path) -> str:
    """The URI of an embedded QEMU driver rooted at ``root`` (absolute, plain characters, short)."""
    text = str(root)
    if not _EMBED_ROOT_RE.fullmatch(text) or "/../" in text + "/":
        raise InvalidInput(
            f"embedded libvirt root {text!r} must be an absolute path of letters, digits, '_./-'"
        )
    if len(text) > MAX_EMBED_ROOT_LEN:
        # QEMU's monitor socket lives at ROOT/lib/qemu/domain-<id>-<name>/monitor.sock,
        # and a UNIX socket path has at most 107 characters.
        raise InvalidInput(
            f"embedded libvirt root {text!r} is {len(text)} characters long; at most"
            f" {MAX_EMBED_ROOT_LEN} fit in QEMU's socket paths: use a shorter directory"
        )
    return f"qemu:///embed?root={text}"


def embed_root(uri: str) -> Path | None:
    """The root directory of an embedded-driver URI, None for other URIs."""
    parts = urlsplit(uri)
    if parts.scheme != "qemu" or parts.path != "/embed":
        return None
    roots = parse_qs(parts.query).get("root", [])
    if len(roots) != 1:
        raise InvalidInput(f"libvirt URI {uri!r} needs exactly one root=/ABSOLUTE/DIR")
    root = Path(roots[0])
    embed_uri(root)  # validates
    return root


def prepare_embed_root(root: Path) -> None:
    """Create ``root`` and its etc/qemu.conf (QEMU as root, no security driver, no virtlogd).

    The embedded driver reads ROOT/etc/qemu.conf (ROOT/etc/qemu/ holds the
    domain definitions).
    """
    conf = root / "etc" / "qemu.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    if not conf.exists() or conf.read_text() != EMBED_QEMU_CONF:
        conf.write_text(EMBED_QEMU_CONF)


_event_loop_lock = threading.Lock()
_event_loop_started = False


def _ignore_libvirt_error(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; we raise them instead."""


def ensure_libvirt_event_loop() -> None:
    """Register libvirt's default event implementation and run it on a daemon thread (once)."""
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.registerErrorHandler(_ignore_libvirt_error, None)
        if libvirt.virEventRegisterDefaultImpl() != 0:
            raise HypervisorError("cannot register libvirt's event loop implementation")

        def run() -> None:
            while True:
                try:
                    libvirt.virEventRunDefaultImpl()
                except libvirt.libvirtError:
                    log.exception("libvirt event loop iteration failed")

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


def _error_code(exc: libvirt.libvirtError) -> int:
    code = exc.get_error_code()
    return int(code) if code is not None else -1


class LibvirtHypervisor(Hypervisor):
    """Appliances as libvirt domains named ``mc-<appliance>``.

    ``netns``: run the libvirt thread (and so QEMU and its taps) inside this
    network namespace. ``label`` names the thread in logs and stack dumps.
    """

    def __init__(
        self, uri: str, *, netns: str | None = None, label: str = "hv", guest_nice: int = 0
    ) -> None:
        super().__init__()
        if uri != SYSTEM_URI and embed_root(uri) is None:
            raise InvalidInput(f"libvirt URI {uri!r}: use {SYSTEM_URI} or qemu:///embed?root=DIR")
        self.uri = uri
        self.guest_nice = check_nice(guest_nice)
        self.netns = check_netns(netns) if netns is not None else None
        self.label = label
        self._conn: libvirt.virConnect | None = None
        self._callback_id: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None

    # --- plumbing ----------------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None or self._loop is None:
            raise HypervisorError("the hypervisor is not open: call async_open() first")
        return await self._loop.run_in_executor(self._executor, partial(fn, *args))

    async def async_run(self, fn: Callable[[libvirt.virConnect], T]) -> T:
        """Run ``fn(connection)`` on the libvirt thread (for operations not wrapped here)."""
        return await self._call(lambda: fn(self._connection()))

    def run_blocking(self, fn: Callable[[libvirt.virConnect], T]) -> T:
        """Run ``fn(connection)`` on the calling thread (libvirt connections are thread-safe).

        For long operations that must not hold up the adapter's own thread,
        such as the replication engine's snapshots and block commits: a pause
        that fences the rack must never wait behind a merge.
        """
        return fn(self._connection())

    def _connection(self) -> libvirt.virConnect:
        if self._conn is None:
            raise HypervisorError("the hypervisor is not open: call async_open() first")
        return self._conn

    def _lookup(self, appliance: str) -> libvirt.virDomain:
        name = domain_name(appliance)
        try:
            return self._connection().lookupByName(name)
        except libvirt.libvirtError as exc:
            if _error_code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                raise NotFound(f"appliance {appliance} is not defined on this rack") from None
            raise HypervisorError(f"libvirt: looking up {appliance} failed: {exc}") from exc

    def _guarded(self, what: str, appliance: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except libvirt.libvirtError as exc:
            if _error_code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                raise NotFound(f"appliance {appliance} is not defined on this rack") from None
            raise HypervisorError(
                f"libvirt: {what} {appliance} failed: {exc} (see the console log and"
                f" libvirt's log under the embedded root)"
            ) from exc

    def _state_of(self, dom: libvirt.virDomain) -> DomainState:
        code = dom.state()[0]
        return map_state(int(code))

    def _on_lifecycle(
        self, _conn: libvirt.virConnect, dom: libvirt.virDomain, event: int, detail: int, _o: object
    ) -> None:
        """On libvirt's event thread: hand the event to the asyncio loop."""
        appliance = appliance_of(dom.name())
        loop = self._loop
        if appliance is None or loop is None:
            return
        kind, word = map_event(event, detail)
        with contextlib.suppress(RuntimeError):  # RuntimeError: the loop is closed
            loop.call_soon_threadsafe(self._publish, LifecycleEvent(appliance, kind, word))

    # --- open / close ------------------------------------------------------

    def _open_sync(self) -> None:
        root = embed_root(self.uri)
        if root is not None:
            prepare_embed_root(root)
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            if root is None:
                hint = "is libvirtd running?"
            elif "already open with path" in str(exc):
                hint = "a process can open only one embedded root: run each rack in its own process"
            else:
                hint = "is another process using this embedded root? only one may open it"
            raise HypervisorError(f"cannot open {self.uri}: {exc} ({hint})") from exc
        self._conn = conn
        self._callback_id = conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
        )

    async def async_open(self) -> None:
        if self._conn is not None:
            return
        if self.netns is not None and not (NETNS_DIR / self.netns).exists():
            raise HypervisorError(
                f"network namespace {self.netns} does not exist: create the rack's namespace first"
            )
        ensure_libvirt_event_loop()
        self._loop = asyncio.get_running_loop()
        if self.netns is not None:
            self._executor = ThreadPoolExecutor(
                1, f"libvirt-{self.label}", enter_netns_for_thread, (self.netns,)
            )
        else:
            self._executor = ThreadPoolExecutor(1, f"libvirt-{self.label}")
        try:
            await self._call(self._open_sync)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise

    def _close_sync(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with contextlib.suppress(libvirt.libvirtError):
            if self._callback_id is not None:
                conn.domainEventDeregisterAny(self._callback_id)
        self._callback_id = None
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()

    async def async_close(self) -> None:
        if self._executor is None:
            return
        try:
            await self._call(self._close_sync)
        finally:
            self._executor.shutdown(wait=True)
            self._executor = None
            for sub in list(self._subscriptions):
                sub.close()

    # --- appliances --------------------------------------------------------

    def _define_sync(self, xml: str, appliance: str) -> None:
        self._guarded("defining", appliance, lambda: self._connection().defineXML(xml))

    async def async_define(self, spec: ApplianceSpec, host: HostDetails) -> None:
        """Define the appliance; redefining a running one changes its next boot only."""
        xml = build_domain_xml(spec, host)
        await self._call(self._define_sync, xml, spec.name)

    def _start_sync(self, appliance: str) -> None:
        dom = self._lookup(appliance)
        state = self._state_of(dom)
        if state is DomainState.RUNNING:
            return
        if state is DomainState.PAUSED:
            raise Conflict(f"appliance {appliance} is paused: resume or destroy it, not start it")
        self._guarded("starting", appliance, dom.create)
        self._deprioritise(appliance)

    def _run_dir(self) -> Path:
        root = embed_root(self.uri)
        return root / "run" if root is not None else SYSTEM_RUN_DIR

    def _deprioritise(self, appliance: str) -> None:
        """Run the guest's QEMU at ``guest_nice`` (see meshcloud.hypervisor.priority)."""
        if not self.guest_nice:
            return
        pid = read_pid(qemu_pid_file(self._run_dir(), domain_name(appliance)))
        if pid is None:
            log.warning(
                "%s: no pid file for %s: its CPU priority is unchanged", self.label, appliance
            )
            return
        with contextlib.suppress(ProcessLookupError):  # it exited at once: the agent sees it
            deprioritise(pid, self.guest_nice)

    async def async_start(self, appliance: str) -> None:
        await self._call(self._start_sync, validate_name("appliance", appliance))

    def _pause_sync(self, appliance: str) -> None:
        dom = self._lookup(appliance)
        state = self._state_of(dom)
        if state is DomainState.PAUSED:
            return
        if state is not DomainState.RUNNING:
            raise Conflict(f"appliance {appliance} is {state}, not running: nothing to pause")
        self._guarded("pausing", appliance, dom.suspend)

    async def async_pause(self, appliance: str) -> None:
        await self._call(self._pause_sync, validate_name("appliance", appliance))

    def _resume_sync(self, appliance: str) -> None:
        dom = self._lookup(appliance)
        state = self._state_of(dom)
        if state is DomainState.RUNNING:
            return
        if state is not DomainState.PAUSED:
            raise Conflict(f"appliance {appliance} is {state}, not paused: start it instead")
        self._guarded("resuming", appliance, dom.resume)

    async def async_resume(self, appliance: str) -> None:
        await self._call(self._resume_sync, validate_name("appliance", appliance))

    def _shutdown_sync(self, appliance: str) -> bool:
        """Press the power button; False if the appliance is not running at all."""
        dom = self._lookup(appliance)
        if not dom.isActive():
            return False
        self._guarded("shutting down", appliance, dom.shutdown)
        return True

    async def async_stop(self, appliance: str, timeout_s: float = 30.0) -> None:
        validate_name("appliance", appliance)
        loop = asyncio.get_running_loop()
        with self.subscribe() as events:
            if not await self._call(self._shutdown_sync, appliance):
                return
            deadline = loop.time() + timeout_s
            while True:
                if await self.async_state(appliance) in (DomainState.SHUTOFF, DomainState.CRASHED):
                    return
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                with contextlib.suppress(TimeoutError):  # wake on any event, or each second
                    await events.async_next(min(remaining, 1.0))
        log.info(
            "appliance %s did not power off within %.0f s: destroying it", appliance, timeout_s
        )
        await self.async_destroy(appliance)

    def _destroy_sync(self, appliance: str) -> None:
        dom = self._lookup(appliance)
        if not dom.isActive():
            return
        try:
            dom.destroy()
        except libvirt.libvirtError as exc:
            if _error_code(exc) == libvirt.VIR_ERR_OPERATION_INVALID and not dom.isActive():
                return  # it stopped on its own meanwhile
            raise HypervisorError(f"libvirt: destroying {appliance} failed: {exc}") from exc

    async def async_destroy(self, appliance: str) -> None:
        await self._call(self._destroy_sync, validate_name("appliance", appliance))

    def _undefine_sync(self, appliance: str) -> None:
        try:
            dom = self._lookup(appliance)
        except NotFound:
            return
        if dom.isActive():
            raise Conflict(f"appliance {appliance} is running: destroy or stop it first")
        flags = (
            libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
        )
        self._guarded("undefining", appliance, lambda: dom.undefineFlags(flags))

    async def async_undefine(self, appliance: str) -> None:
        await self._call(self._undefine_sync, validate_name("appliance", appliance))

    def _state_sync(self, appliance: str) -> DomainState:
        dom = self._lookup(appliance)
        return self._guarded("reading the state of", appliance, lambda: self._state_of(dom))

    async def async_state(self, appliance: str) -> DomainState:
        return await self._call(self._state_sync, validate_name("appliance", appliance))

    @staticmethod
    def _epoch_of(dom: libvirt.virDomain) -> int:
        try:
            text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS)
        except libvirt.libvirtError:
            return 0
        try:
            # libvirt hands back the element we wrote, from our own definition.
            return int(ET.fromstring(text).get("epoch", "0"))  # noqa: S314
        except (ET.ParseError, ValueError):
            return 0

    def _list_sync(self) -> dict[str, DomainInfo]:
        out: dict[str, DomainInfo] = {}
        try:
            domains = self._connection().listAllDomains()
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"libvirt: listing domains failed: {exc}") from exc
        for dom in domains:
            appliance = appliance_of(dom.name())
            if appliance is None:
                continue
            try:
                out[appliance] = DomainInfo(appliance, self._state_of(dom), self._epoch_of(dom))
            except libvirt.libvirtError:
                continue  # undefined while we looked
        return out

    async def async_list(self) -> dict[str, DomainInfo]:
        return await self._call(self._list_sync)

    def _xml_sync(self, appliance: str) -> str:
        dom = self._lookup(appliance)
        return self._guarded("reading the XML of", appliance, lambda: str(dom.XMLDesc(0)))

    async def async_domain_xml(self, appliance: str) -> str:
        """The live domain XML libvirt holds for the appliance (for diagnostics)."""
        return await self._call(self._xml_sync, validate_name("appliance", appliance))

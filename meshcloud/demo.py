"""`meshcloud demo`: a local demo on this machine.

At this stage the demo is one rack: a network namespace holding the rack's
appliance bridge, an embedded libvirt hypervisor whose QEMU and taps live in
that namespace, and one demo appliance on the bridge. Because people open
things from the root namespace, a small forwarder process relays a loopback
port (127.0.0.1:8480) to the appliance's HTTP port inside the namespace.

``demo up`` returns once the appliance answers; QEMU and the forwarder keep
running in the background. Everything the demo made is recorded in a state
file, which ``demo down`` reads to undo it: processes are ended by their
recorded PID (checked against their start time), never by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import click

from meshcloud.core.errors import Conflict, HypervisorError, MeshcloudError
from meshcloud.core.models import ApplianceSpec, DiskSpec, PortSpec

if TYPE_CHECKING:
    from meshcloud.hypervisor.domain_xml import HostDetails

T = TypeVar("T")

DEFAULT_STATE_DIR = Path("/var/lib/meshcloud-demo")
DEFAULT_PORT = 8480
CLUSTER_ID = "demo"
RACK = "r1"
BRIDGE = "mcbr0"
GATEWAY = "10.90.0.1"
PREFIX_LEN = 24
APPLIANCE = ApplianceSpec(
    name="demo",
    image="demo",
    memory_mib=128,
    disks=(DiskSpec("data", 1),),
    ports=(PortSpec("http", 80),),
    ip="10.90.0.10",
)
BOOT_TIMEOUT_S = 120.0

Progress = Callable[[str], None]


def rack_netns(rack: str) -> str:
    """The network namespace of a demo rack."""
    return f"mcdemo-{rack}"


@dataclass
class DemoState:
    """What ``demo up`` made, so that ``demo down`` can remove exactly that."""

    state_dir: str
    netns: list[str] = field(default_factory=list)
    libvirt_roots: dict[str, str] = field(default_factory=dict)  # netns -> root
    appliances: dict[str, str] = field(default_factory=dict)  # appliance -> netns
    forwarder_pid: int = 0
    forwarder_start: int = 0
    listen: str = ""

    @staticmethod
    def path(state_dir: Path) -> Path:
        return state_dir / "state.json"

    def save(self) -> None:
        path = self.path(Path(self.state_dir))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, state_dir: Path) -> DemoState | None:
        try:
            data = json.loads(cls.path(state_dir).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise MeshcloudError(
                f"demo state file {cls.path(state_dir)} is unreadable ({exc}): remove it and"
                " clean up by hand (ip netns list | grep mcdemo)"
            ) from exc
        return cls(**data)


def process_start_ticks(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):  # exited, not yet reaped by its parent
        return None
    return int(fields[19])


def end_process(pid: int, start_ticks: int, timeout_s: float = 5.0) -> bool:
    """End the process we started as ``pid`` (if that PID still is it); True if it was running."""
    if pid <= 0 or process_start_ticks(pid) != start_ticks:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while process_start_ticks(pid) == start_ticks and time.monotonic() < deadline:
        time.sleep(0.05)
    if process_start_ticks(pid) == start_ticks:
        os.kill(pid, signal.SIGKILL)
    return True


def make_segment(netns_name: str, bridge: str, gateway_cidr: str) -> None:
    """A rack's appliance segment: a namespace with a bridge carrying the rack's address."""
    from meshcloud.lab import netns

    netns.add_netns(netns_name)
    netns.add_bridge(bridge, netns=netns_name)
    netns.add_address(bridge, gateway_cidr, netns=netns_name)


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def start_forwarder(state: DemoState, port: int, netns_name: str, target: str) -> None:
    """Start the loopback forwarder as a detached process and record its PID."""
    log_path = Path(state.state_dir) / "forwarder.log"
    argv = [
        sys.executable, "-m", "meshcloud.cli", "demo", "forward",
        "--listen", f"127.0.0.1:{port}", "--netns", netns_name, "--target", target,
    ]  # fmt: skip
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True,
        )  # fmt: skip
    state.forwarder_pid = proc.pid
    state.forwarder_start = process_start_ticks(proc.pid) or 0
    state.listen = f"127.0.0.1:{port}"
    state.save()
    deadline = time.monotonic() + 10
    while not _can_connect("127.0.0.1", port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise MeshcloudError(f"the demo forwarder did not start: see {log_path}")
        time.sleep(0.1)


def _can_connect(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


def _http_json(url_host: str, port: int, path: str) -> dict[str, object] | None:
    from meshcloud.hypervisor.reach import http_get

    try:
        reply = http_get(None, url_host, port, path, timeout_s=2.0)
    except OSError:
        return None
    if reply.status != 200:
        return None
    data = reply.json()
    return data if isinstance(data, dict) else None


def in_fresh_process(fn: Callable[..., T], *args: object) -> T:
    """Run ``fn(*args)`` in a new (spawned) process and return its result.

    libvirt lets a process open only one embedded root, ever; each rack's
    hypervisor work therefore runs in a process of its own.
    """
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
        return child.submit(fn, *args).result()


def rack_start_appliance(root: str, ns: str, spec: ApplianceSpec, host: HostDetails) -> None:
    """Define and start ``spec`` on the rack whose libvirt root is ``root`` (own process)."""
    from meshcloud.hypervisor.libvirt_hv import LibvirtHypervisor, embed_uri

    async def run() -> None:
        hv = LibvirtHypervisor(embed_uri(Path(root)), netns=ns, label=ns)
        await hv.async_open()
        try:
            await hv.async_define(spec, host)
            await hv.async_start(spec.name)
        finally:
            await hv.async_close()  # QEMU keeps running; `demo down` reopens the root

    asyncio.run(run())


def rack_remove_appliances(root: str, ns: str) -> list[str]:
    """Destroy and undefine every appliance of one rack (own process); their names."""
    from meshcloud.hypervisor.libvirt_hv import LibvirtHypervisor, embed_uri

    async def run() -> list[str]:
        hv = LibvirtHypervisor(embed_uri(Path(root)), netns=ns, label=ns)
        await hv.async_open()
        try:
            names = sorted(await hv.async_list())
            for name in names:
                await hv.async_destroy(name)
                await hv.async_undefine(name)
            return names
        finally:
            await hv.async_close()

    return asyncio.run(run())


def check_demo_up(state_dir: Path, port: int) -> None:
    """Phase one of ``demo up``: refuse to start, with no side effects, if it cannot work."""
    if os.geteuid() != 0:
        raise MeshcloudError("the demo needs root (network namespaces): run it with sudo")
    if DemoState.load(state_dir) is not None:
        raise Conflict(
            "the demo is already up: `make demo-down` first (or `meshcloud demo status`)"
        )
    from meshcloud.lab import netns

    if netns.list_netns("mcdemo-"):
        raise Conflict("demo namespaces from an earlier run exist: `make demo-down` first")
    if not port_is_free("127.0.0.1", port):
        raise Conflict(f"127.0.0.1:{port} is in use: pick another with `meshcloud demo up --port`")


async def async_demo_up(state_dir: Path, port: int, progress: Progress) -> DemoState:
    """Bring the one-rack demo up; see the module docstring."""
    from meshcloud.hypervisor.domain_xml import (
        DiskAttachment,
        HostDetails,
        KernelBoot,
        NetworkAttachment,
        tap_name,
    )
    from meshcloud.hypervisor.kvm import choose_accel
    from meshcloud.hypervisor.libvirt_hv import embed_uri
    from meshcloud.images.appliance import ensure_appliance, new_data_disk

    check_demo_up(state_dir, port)
    # execute, recording each thing as soon as it exists
    image = await asyncio.to_thread(ensure_appliance, progress=progress)
    accel, why = await asyncio.to_thread(choose_accel, "auto", image.kernel, image.initrd)
    progress(f"demo: {why}")
    state = DemoState(state_dir=str(state_dir))
    state.save()
    ns = rack_netns(RACK)
    progress(f"demo: rack {RACK}: namespace {ns} with bridge {BRIDGE} ({GATEWAY}/{PREFIX_LEN})")
    state.netns.append(ns)
    state.save()
    await asyncio.to_thread(make_segment, ns, BRIDGE, f"{GATEWAY}/{PREFIX_LEN}")

    rack_dir = state_dir / RACK
    disk = await asyncio.to_thread(
        new_data_disk, image, rack_dir / "volumes" / APPLIANCE.name / "data"
    )
    root = rack_dir / "libvirt"
    embed_uri(root.absolute())  # checks the root is short enough for QEMU's sockets
    state.libvirt_roots[ns] = str(root)
    state.save()
    host = HostDetails(
        cluster_id=CLUSTER_ID,
        disks=(DiskAttachment("data", disk.absolute()),),
        network=NetworkAttachment(BRIDGE, PREFIX_LEN, GATEWAY, tap_name(APPLIANCE.name)),
        boot=KernelBoot(image.kernel, image.initrd),
        accel=accel,
        console_log=(rack_dir / f"{APPLIANCE.name}.console.log").absolute(),
    )
    progress(f"demo: starting appliance {APPLIANCE.name} ({APPLIANCE.ip}) on {RACK}")
    state.appliances[APPLIANCE.name] = ns
    state.save()
    await asyncio.to_thread(
        in_fresh_process, rack_start_appliance, str(root.absolute()), ns, APPLIANCE, host
    )

    progress(f"demo: forwarding 127.0.0.1:{port} to {APPLIANCE.ip}:80 inside {ns}")
    await asyncio.to_thread(start_forwarder, state, port, ns, f"{APPLIANCE.ip}:80")
    progress("demo: waiting for the appliance to boot (TCG: about 10 s)")
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    while (await asyncio.to_thread(_http_json, "127.0.0.1", port, "/counter")) is None:
        if time.monotonic() > deadline:
            raise HypervisorError(
                f"the appliance did not answer within {BOOT_TIMEOUT_S:.0f} s: see"
                f" {host.console_log} and {root}/log/qemu/"
            )
        await asyncio.sleep(0.5)
    return state


async def async_demo_down(state_dir: Path, progress: Progress) -> bool:
    """Undo what ``demo up`` recorded; False if there was nothing to undo."""
    from meshcloud.lab import netns

    state = DemoState.load(state_dir)
    if state is None:
        leftovers = netns.list_netns("mcdemo-")
        for ns in leftovers:  # a crashed `demo up` before its first save
            progress(f"demo: removing leftover namespace {ns}")
            _empty_and_delete_netns(ns)
        return bool(leftovers)
    if end_process(state.forwarder_pid, state.forwarder_start):
        progress(f"demo: stopped the forwarder (pid {state.forwarder_pid})")
    for ns, root in state.libvirt_roots.items():
        if not Path(root).exists() or not netns.netns_exists(ns):
            continue
        gone = await asyncio.to_thread(in_fresh_process, rack_remove_appliances, root, ns)
        for name in gone:
            progress(f"demo: destroyed appliance {name} ({ns})")
    for ns in state.netns:
        progress(f"demo: removing namespace {ns}")
        _empty_and_delete_netns(ns)
    progress(f"demo: removing {state_dir}")
    await asyncio.to_thread(_remove_tree, state_dir)
    return True


def _empty_and_delete_netns(ns: str) -> None:
    """Delete a demo namespace; any process still inside it is a QEMU the demo started."""
    from meshcloud.lab import netns

    if not netns.netns_exists(ns):
        return
    for pid in netns.pids_in_netns(ns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    netns.delete_netns(ns)


def _remove_tree(path: Path) -> None:
    import shutil

    if path.exists():
        shutil.rmtree(path)


def _echo(message: str) -> None:
    click.echo(message)


@click.group()
def demo() -> None:
    """Start or stop the local demo."""


@demo.command("up")
@click.option("--port", default=DEFAULT_PORT, show_default=True, help="loopback port to forward")
@click.option("--state-dir", type=click.Path(path_type=Path), default=DEFAULT_STATE_DIR,
              show_default=True, help="where the demo keeps its disks and state")  # fmt: skip
def demo_up(port: int, state_dir: Path) -> None:
    """Start the demo (one rack, one appliance) in the background."""
    if DemoState.load(state_dir) is not None:
        click.echo("meshcloud demo is already up (`make demo-down` stops it).")
        _print_status(state_dir)
        return
    check_demo_up(state_dir, port)
    try:
        state = asyncio.run(async_demo_up(state_dir, port, _echo))
    except BaseException:
        click.echo("demo: start failed; cleaning up", err=True)
        asyncio.run(async_demo_down(state_dir, lambda m: click.echo(m, err=True)))
        raise
    ns = rack_netns(RACK)
    status = _http_json("127.0.0.1", port, "/counter") or {}
    click.echo(
        f"""
meshcloud demo is up: appliance {APPLIANCE.name} runs on rack {RACK}.
  open           http://{state.listen}/          (status page)
                 http://{state.listen}/counter   (last durable counter, now {status.get("seq", "?")})
  on its segment {APPLIANCE.ip} on bridge {BRIDGE} in namespace {ns}
                 e.g. ip netns exec {ns} curl http://{APPLIANCE.ip}/counter
  stop with      make demo-down   (or: .venv/bin/meshcloud demo down)"""
    )


@demo.command("down")
@click.option("--state-dir", type=click.Path(path_type=Path), default=DEFAULT_STATE_DIR,
              show_default=True)  # fmt: skip
def demo_down(state_dir: Path) -> None:
    """Stop the demo and remove what it made."""
    if os.geteuid() != 0:
        raise MeshcloudError("the demo needs root (network namespaces): run it with sudo")
    if asyncio.run(async_demo_down(state_dir, _echo)):
        click.echo("meshcloud demo is down.")
    else:
        click.echo("meshcloud demo was not running.")


@demo.command("status")
@click.option("--state-dir", type=click.Path(path_type=Path), default=DEFAULT_STATE_DIR,
              show_default=True)  # fmt: skip
def demo_status(state_dir: Path) -> None:
    """Say whether the demo is up and where to reach it."""
    _print_status(state_dir)


def _print_status(state_dir: Path) -> None:
    state = DemoState.load(state_dir)
    if state is None:
        click.echo("meshcloud demo is not running.")
        return
    host, _, port = state.listen.partition(":")
    counter = _http_json(host, int(port), "/counter") if port else None
    answer = f"counter {counter.get('seq')}" if counter else "not answering"
    click.echo(f"meshcloud demo is up: http://{state.listen}/ ({answer})")


@demo.command("forward", hidden=True)
@click.option("--listen", required=True, help="HOST:PORT to listen on")
@click.option("--netns", "netns_name", required=True, help="namespace of the target")
@click.option("--target", required=True, help="HOST:PORT inside the namespace")
def demo_forward(listen: str, netns_name: str, target: str) -> None:
    """Relay a local port to an address inside a namespace (run by `demo up`)."""
    from meshcloud.hypervisor.reach import async_serve_forward

    lhost, _, lport = listen.rpartition(":")
    thost, _, tport = target.rpartition(":")

    async def serve() -> None:
        server = await async_serve_forward(lhost, int(lport), netns_name, thost, int(tport))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with server:
            await stop.wait()

    asyncio.run(serve())

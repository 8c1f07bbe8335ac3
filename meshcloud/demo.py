"""`meshcloud demo`: a three-rack cluster on this machine, with two demo appliances.

``demo up`` starts a lab (``meshcloud lab -n demo``: three racks in network
namespaces, each running the real daemon), gives each rack's appliance
bridge the segment's gateway address, seeds the demo image onto every rack
(rsync over the racks' sshd, checked against its SHA-256 before use),
waits for the cluster, deploys two demo appliances through the API, and
starts one background forwarder process so that people can open things
from the root namespace:

- ``127.0.0.1:8440``: the API (relayed to the first rack whose API answers);
- ``127.0.0.1:8481``, ``:8482``: each appliance's HTTP page, relayed to the
  rack the placement map says runs it, at the moment of each connection
  (so a drained or failed-over appliance stays reachable at the same port).

Everything ``demo up`` made is recorded in a state file that ``demo down``
reads to undo it: the forwarder is ended by its recorded PID (checked
against its start time), the lab is torn down with ``Lab.down``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from meshcloud.core.errors import Conflict, MeshcloudError, Unavailable
from meshcloud.core.models import ApplianceSpec, DiskSpec, PortSpec
from meshcloud.hypervisor.reach import pipe

if TYPE_CHECKING:
    from meshcloud.agent.images import ImageManifest
    from meshcloud.lab.lab import Lab

DEFAULT_STATE_DIR = Path("/var/lib/meshcloud-demo")
LAB_NAME = "demo"
RACKS = 3
LOCAL_HOST = "127.0.0.1"
DEFAULT_API_PORT = 8440
DEFAULT_APPLIANCE_PORT = 8481  # the first appliance; the next ones count up
RACK_API_PORT = 8440
SEGMENT_BRIDGE = "mcbr0"
SEGMENT_GATEWAY = "10.90.0.1"
SEGMENT_PREFIX_LEN = 24
IMAGE = "demo"
CLUSTER_TIMEOUT_S = 90.0
BOOT_TIMEOUT_S = (
    240.0  # TCG under load: a boot takes 8 s on an idle machine, far more on a busy one
)

Progress = Callable[[str], None]


def demo_appliances() -> tuple[ApplianceSpec, ...]:
    """The two appliances the demo deploys: the demo image, 128 MiB, a 1 GiB data disk."""
    return tuple(
        ApplianceSpec(
            name=name,
            image=IMAGE,
            memory_mib=128,  # the demo kernel does not boot in 64 MiB
            disks=(DiskSpec("data", 1),),
            ports=(PortSpec("http", 80),),
            ip=ip,
            priority=priority,
        )
        for name, ip, priority in (("tiles", "10.90.0.11", 600), ("wiki", "10.90.0.12", 400))
    )


@dataclass
class DemoState:
    """What ``demo up`` made, so that ``demo down`` can remove exactly that."""

    state_dir: str
    lab: str = LAB_NAME
    lab_root: str = ""
    forwarder_pid: int = 0
    forwarder_start: int = 0
    api: str = ""
    appliances: dict[str, str] = field(default_factory=dict)  # appliance -> local HOST:PORT
    console_password: str = ""  # the demo's console login: admin / this

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
                f"demo state file {cls.path(state_dir)} is unreadable ({exc}): remove it, then"
                f" run `meshcloud lab -n {LAB_NAME} down`"
            ) from exc
        try:
            return cls(**data)
        except TypeError as exc:
            raise MeshcloudError(
                f"demo state file {cls.path(state_dir)} is from another version ({exc}): remove"
                f" it, then run `meshcloud lab -n {LAB_NAME} down`"
            ) from None


# -- processes the demo started ------------------------------------------------------


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


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _can_connect(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


# -- talking to a lab from the root namespace ------------------------------------------


def lab_token(lab: Lab) -> str:
    """The API bearer token of a lab's cluster (derived from its secret)."""
    from meshcloud.web.auth import api_token

    return api_token(lab.secret_file.read_text().strip())


def lab_api(
    lab: Lab,
    method: str,
    path: str,
    body: Any = None,
    *,
    rack: str | None = None,
    token: str | None = None,
    timeout_s: float = 15.0,
) -> Any:
    """One API request to a rack of ``lab`` (default: the first that answers), from its observer.

    The calling thread enters the lab's bridge namespace for the request only.
    """
    from meshcloud.client import ApiClient
    from meshcloud.lab import netns

    token = token or lab_token(lab)
    racks = [rack] if rack is not None else lab.racks()
    last: MeshcloudError | None = None
    for name in racks:
        try:
            ip = lab.rack(name).ip
        except MeshcloudError as exc:
            last = exc
            continue
        client = ApiClient(f"http://{ip}:{RACK_API_PORT}", token, timeout_s)
        try:
            with netns.thread_in_netns(lab.bridge_netns):
                return client.request(method, path, body)
        except Unavailable as exc:  # this rack does not answer: try the next one
            last = exc
    raise last if last is not None else Unavailable(f"lab {lab.name} has no racks")


def ensure_segment_address(lab: Lab, rack: str) -> None:
    """Give ``rack``'s appliance bridge the segment's gateway address (idempotent).

    The rack (and so the forwarder, connecting from inside the rack) then
    reaches its appliances on the segment. A rack the lab powers on again
    gets a fresh namespace: call this again.
    """
    from meshcloud.lab import netns

    netns.run(
        netns.ip(
            "addr", "replace", f"{SEGMENT_GATEWAY}/{SEGMENT_PREFIX_LEN}", "dev", SEGMENT_BRIDGE,
            netns=lab.rack(rack).netns,
        )
    )  # fmt: skip


def demo_image_files() -> tuple[ImageManifest, dict[str, Path]]:
    """The demo image's manifest and files, from the local appliance build (hashed here)."""
    from meshcloud.agent.images import appliance_files, manifest_for
    from meshcloud.images.appliance import find_appliance

    built = find_appliance()
    files = appliance_files(built.kernel, built.initrd, built.data_template)
    return manifest_for(IMAGE, built.digest[:16], files), files


def seed_lab_image(
    lab: Lab,
    manifest: ImageManifest,
    files: dict[str, Path],
    racks: Iterable[str] | None = None,
) -> None:
    """Push an image to racks of ``lab`` with rsync over their sshd (from the observer).

    Each rack checks every file's SHA-256 against the manifest before using it.
    """
    from meshcloud.agent.images import push_image, write_push_source
    from meshcloud.lab import netns
    from meshcloud.replication.transport import SshTarget

    source = write_push_source(manifest, files, lab.dir / "images" / manifest.name)

    def run(argv: Sequence[str]) -> None:
        netns.run(lab.exec_argv(None, argv), timeout=300.0)

    for rack in racks if racks is not None else lab.racks():
        info = lab.rack(rack)
        target = SshTarget(info.ip, lab.ssh_key, lab.known_hosts, connect_timeout_s=5)
        push_image(manifest, source, target, str(info.state_dir / "images"), runner=run)


def wait_until(what: str, probe: Callable[[], Any], timeout_s: float, every_s: float = 0.5) -> Any:
    """Poll ``probe`` until it returns something truthy; raise Unavailable after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last_error = ""
    while True:
        try:
            result = probe()
        except MeshcloudError as exc:
            result, last_error = None, str(exc)
        if result:
            return result
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise Unavailable(f"{what} did not happen within {timeout_s:.0f} s{detail}")
        time.sleep(every_s)


def cluster_ready(lab: Lab) -> bool:
    """Every rack is in the map and a leader is known."""
    doc = lab_api(lab, "GET", "/api/v1/cluster", timeout_s=5.0)
    return bool(doc.get("leader")) and set(doc.get("racks", {})) == set(lab.racks())


# -- the forwarder -----------------------------------------------------------------------


async def async_serve_relay(
    host: str, port: int, connect: Callable[[], socket.socket], label: str
) -> asyncio.Server:
    """A TCP server relaying each connection to the socket ``connect()`` returns (in a thread)."""

    async def relay(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            sock = await asyncio.to_thread(connect)
        except (OSError, MeshcloudError) as exc:
            print(f"demo forwarder: {label}: {exc}", file=sys.stderr, flush=True)
            client_w.close()
            return
        up_r, up_w = await asyncio.open_connection(sock=sock)
        try:
            await asyncio.gather(pipe(client_r, up_w), pipe(up_r, client_w))
        finally:
            for w in (up_w, client_w):
                w.close()

    return await asyncio.start_server(relay, host, port, reuse_address=True)


def connect_api(lab: Lab) -> socket.socket:
    """A connection to the API of the first rack that accepts one."""
    from meshcloud.hypervisor.reach import connect_in_netns

    errors = []
    for rack in lab.racks():
        try:
            return connect_in_netns(lab.bridge_netns, lab.rack(rack).ip, RACK_API_PORT, 1.0)
        except (OSError, MeshcloudError) as exc:
            errors.append(f"{rack}: {exc}")
    raise Unavailable(f"no rack's API answers ({'; '.join(errors)})")


def connect_appliance(lab: Lab, spec: ApplianceSpec) -> socket.socket:
    """A connection to the appliance's HTTP port, from inside the rack that runs it now."""
    from meshcloud.hypervisor.reach import connect_in_netns

    status = lab_api(lab, "GET", f"/api/v1/appliances/{spec.name}", timeout_s=5.0)
    assignment = status.get("assignment") or {}
    rack = assignment.get("primary")
    if not rack or assignment.get("state") != "running":
        raise Unavailable(f"{spec.name} runs nowhere now ({assignment.get('reason') or 'waiting'})")
    ensure_segment_address(lab, rack)
    port = next((p.port for p in spec.ports if p.name == "http"), 80)
    assert spec.ip is not None
    return connect_in_netns(lab.rack(rack).netns, spec.ip, port, 5.0)


async def async_serve_forwards(lab_name: str, lab_root: Path | None, api_port: int,
                               appliance_ports: dict[str, int]) -> list[asyncio.Server]:  # fmt: skip
    """The demo's relays: the API and each appliance's page on loopback ports."""
    from meshcloud.lab.lab import Lab

    lab = Lab(lab_name, lab_root)
    specs = {s.name: s for s in demo_appliances()}
    servers = [await async_serve_relay(LOCAL_HOST, api_port, lambda: connect_api(lab), "api")]
    for name, port in appliance_ports.items():
        spec = specs[name]
        connect = functools.partial(connect_appliance, lab, spec)
        servers.append(await async_serve_relay(LOCAL_HOST, port, connect, name))
    return servers


def start_forwarder(state: DemoState, api_port: int, appliance_ports: dict[str, int]) -> None:
    """Start the forwarder as a detached process and record its PID."""
    log_path = Path(state.state_dir) / "forwarder.log"
    argv = [sys.executable, "-m", "meshcloud.cli", "demo", "forward", "--lab", state.lab,
            "--api-port", str(api_port)]  # fmt: skip
    if state.lab_root:
        argv += ["--lab-root", state.lab_root]
    for name, port in appliance_ports.items():
        argv += ["--appliance", f"{name}={port}"]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True,
        )  # fmt: skip
    state.forwarder_pid = proc.pid
    state.forwarder_start = process_start_ticks(proc.pid) or 0
    state.api = f"{LOCAL_HOST}:{api_port}"
    state.appliances = {n: f"{LOCAL_HOST}:{p}" for n, p in appliance_ports.items()}
    state.save()
    deadline = time.monotonic() + 20
    while not all(_can_connect(LOCAL_HOST, p) for p in (api_port, *appliance_ports.values())):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise MeshcloudError(f"the demo forwarder did not start: see {log_path}")
        time.sleep(0.1)


def _http_json(address: str, path: str) -> dict[str, Any] | None:
    from meshcloud.hypervisor.reach import http_get

    host, _, port = address.rpartition(":")
    try:
        reply = http_get(None, host, int(port), path, timeout_s=3.0)
    except OSError:
        return None
    if reply.status != 200:
        return None
    try:
        data = reply.json()
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


# -- up and down ---------------------------------------------------------------------------


def appliance_ports(first: int) -> dict[str, int]:
    return {spec.name: first + i for i, spec in enumerate(demo_appliances())}


def check_demo_up(state_dir: Path, api_port: int, first_appliance_port: int) -> None:
    """Phase one of ``demo up``: refuse to start, with no side effects, if it cannot work."""
    from meshcloud.lab.lab import Lab

    if os.geteuid() != 0:
        raise MeshcloudError("the demo needs root (network namespaces): run it with sudo")
    if DemoState.load(state_dir) is not None:
        raise Conflict(
            "the demo is already up: `make demo-down` first (or `meshcloud demo status`)"
        )
    if Lab(LAB_NAME).exists():
        raise Conflict(
            f"a lab named {LAB_NAME} is up: `meshcloud lab -n {LAB_NAME} down` (or `make demo-down`)"
        )
    for port in (api_port, *appliance_ports(first_appliance_port).values()):
        if not port_is_free(LOCAL_HOST, port):
            raise Conflict(
                f"{LOCAL_HOST}:{port} is in use: pick other ports with"
                " `meshcloud demo up --api-port P --appliance-port Q`"
            )


def write_console_users(path: Path, password: str) -> None:
    """A console users file in the kit's format with one admin (the demo's login)."""
    from argon2 import PasswordHasher

    doc = {
        "version": 1,
        "users": [
            {
                "name": "admin",
                "role": "admin",
                "password_argon2": PasswordHasher().hash(password),
                "must_change_password": False,
            }
        ],
        "emergency_codes": [],
    }
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    path.chmod(0o600)


def demo_up(
    state_dir: Path, api_port: int, first_appliance_port: int, progress: Progress
) -> DemoState:
    """Bring the demo up (see the module docstring); returns its recorded state."""
    from meshcloud.images.appliance import ensure_appliance
    from meshcloud.lab.lab import Lab

    check_demo_up(state_dir, api_port, first_appliance_port)
    ensure_appliance(progress=progress)
    lab = Lab(LAB_NAME)
    state = DemoState(state_dir=str(state_dir), lab=lab.name, lab_root=str(lab.root))
    state.save()
    progress(f"demo: starting lab {lab.name}: {RACKS} racks, each running the meshcloud daemon")
    lab.up(RACKS, start_daemons=False)
    state.console_password = secrets.token_urlsafe(12)
    state.save()
    for rack in lab.racks():
        write_console_users(lab.state_dir(rack) / "console" / "users.json", state.console_password)
        lab.start_daemon(rack)
    for rack in lab.racks():
        ensure_segment_address(lab, rack)
    manifest, files = demo_image_files()
    progress(f"demo: seeding image {manifest.name} ({manifest.version}) onto every rack (rsync)")
    seed_lab_image(lab, manifest, files)
    progress("demo: waiting for the racks to form a cluster")
    wait_until("the cluster forming", lambda: cluster_ready(lab), CLUSTER_TIMEOUT_S)
    for spec in demo_appliances():
        progress(f"demo: deploying appliance {spec.name} ({spec.ip})")
        lab_api(lab, "PUT", f"/api/v1/appliances/{spec.name}", spec.to_dict())
    ports = appliance_ports(first_appliance_port)
    progress(f"demo: forwarding the API to {LOCAL_HOST}:{api_port} and the appliances' pages")
    start_forwarder(state, api_port, ports)
    progress("demo: waiting for the appliances to boot (TCG: 10 s or more each)")
    for name, address in state.appliances.items():
        wait_until(
            f"appliance {name} answering on {address}",
            functools.partial(_http_json, address, "/counter"),
            BOOT_TIMEOUT_S,
        )
    return state


def demo_down(state_dir: Path, progress: Progress) -> bool:
    """Undo what ``demo up`` recorded; False if there was nothing to undo."""
    from meshcloud.lab.lab import Lab

    state = DemoState.load(state_dir)
    did = False
    if state is not None and end_process(state.forwarder_pid, state.forwarder_start):
        progress(f"demo: stopped the forwarder (pid {state.forwarder_pid})")
        did = True
    lab = Lab(state.lab if state else LAB_NAME, state.lab_root or None if state else None)
    if lab.exists() or lab.leftovers():
        progress(f"demo: tearing down lab {lab.name} (racks, appliances, namespaces)")
        lab.down()
        did = True
    if state_dir.exists():
        progress(f"demo: removing {state_dir}")
        import shutil

        shutil.rmtree(state_dir)
        did = True
    return did


def usage_text(state: DemoState, token: str) -> str:
    """What ``demo up`` prints: where the API is, the token, and what to try."""
    pages = "\n".join(
        f"  {name:<6}         http://{address}/   (http://{address}/counter)"
        for name, address in sorted(state.appliances.items())
    )
    return f"""
meshcloud demo is up: {RACKS} racks (lab {state.lab}), appliances {", ".join(sorted(state.appliances))}.
  console        http://{state.api}/   (log in as admin, password {state.console_password})
  API            http://{state.api}/api/v1/cluster
  token          {token}
  appliances (each relayed to the rack that runs it now):
{pages}

Use the CLI:
  export MESHCLOUD_API=http://{state.api} MESHCLOUD_TOKEN={token}
  .venv/bin/meshcloud status
  .venv/bin/meshcloud appliance ls
  .venv/bin/meshcloud rack drain r1          # its appliances move (stop and start)
  .venv/bin/meshcloud lab -n {state.lab} kill r2      # a power cut: the others take over
  .venv/bin/meshcloud lab -n {state.lab} restart r2
Stop with make demo-down (or: .venv/bin/meshcloud demo down)."""


def _echo(message: str) -> None:
    click.echo(message)


@click.group()
def demo() -> None:
    """Start or stop the local demo (a three-rack lab with two appliances)."""


@demo.command("up")
@click.option("--api-port", default=DEFAULT_API_PORT, show_default=True,
              help="loopback port for the API")  # fmt: skip
@click.option("--appliance-port", default=DEFAULT_APPLIANCE_PORT, show_default=True,
              help="loopback port of the first appliance's page (the next ones count up)")  # fmt: skip
@click.option("--state-dir", type=click.Path(path_type=Path), default=DEFAULT_STATE_DIR,
              show_default=True, help="where the demo keeps its state")  # fmt: skip
def demo_up_command(api_port: int, appliance_port: int, state_dir: Path) -> None:
    """Start the demo in the background."""
    if DemoState.load(state_dir) is not None:
        click.echo("meshcloud demo is already up (`make demo-down` stops it).")
        _print_status(state_dir)
        return
    check_demo_up(state_dir, api_port, appliance_port)
    try:
        state = demo_up(state_dir, api_port, appliance_port, _echo)
    except BaseException:
        click.echo("demo: start failed; cleaning up", err=True)
        demo_down(state_dir, lambda m: click.echo(m, err=True))
        raise
    from meshcloud.lab.lab import Lab

    click.echo(usage_text(state, lab_token(Lab(state.lab, state.lab_root or None))))


@demo.command("down")
@click.option("--state-dir", type=click.Path(path_type=Path), default=DEFAULT_STATE_DIR,
              show_default=True)  # fmt: skip
def demo_down_command(state_dir: Path) -> None:
    """Stop the demo and remove what it made."""
    if os.geteuid() != 0:
        raise MeshcloudError("the demo needs root (network namespaces): run it with sudo")
    if demo_down(state_dir, _echo):
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
    click.echo(f"meshcloud demo is up: API http://{state.api}/api/v1/cluster")
    for name, address in sorted(state.appliances.items()):
        counter = _http_json(address, "/counter")
        answer = f"counter {counter.get('seq')}" if counter else "not answering"
        click.echo(f"  {name}: http://{address}/ ({answer})")


@demo.command("forward", hidden=True)
@click.option("--lab", "lab_name", required=True, help="the lab to relay into")
@click.option("--lab-root", type=click.Path(path_type=Path), default=None)
@click.option("--api-port", type=int, required=True, help="loopback port for the API")
@click.option("--appliance", "appliances", multiple=True, help="NAME=PORT (repeatable)")
def demo_forward(
    lab_name: str, lab_root: Path | None, api_port: int, appliances: tuple[str, ...]
) -> None:
    """Relay loopback ports to the lab's API and appliances (run by `demo up`)."""
    ports = {}
    for item in appliances:
        name, _, port = item.partition("=")
        ports[name] = int(port)

    async def serve() -> None:
        servers = await async_serve_forwards(lab_name, lab_root, api_port, ports)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            for server in servers:
                server.close()
                with contextlib.suppress(Exception):
                    await server.wait_closed()

    asyncio.run(serve())

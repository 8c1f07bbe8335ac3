"""``meshcloud lab ...``: drive a lab of racks in network namespaces from the shell."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import click

from meshcloud.lab.lab import Lab, LabStatus, labs, standin_daemon_argv
from meshcloud.lab.state import default_root


def _lab(ctx: click.Context) -> Lab:
    obj = ctx.ensure_object(dict)
    return Lab(obj["name"], obj["root"])


@click.group()
@click.option("-n", "--name", default="lab", show_default=True, envvar="MESHCLOUD_LAB",
              help="the lab's name (env MESHCLOUD_LAB)")  # fmt: skip
@click.option("--root", type=click.Path(path_type=Path), default=None, envvar="MESHCLOUD_LAB_ROOT",
              help=f"where labs keep their state (env MESHCLOUD_LAB_ROOT; default {default_root()})")  # fmt: skip
@click.pass_context
def lab(ctx: click.Context, name: str, root: Path | None) -> None:
    """Several racks on this machine, each in its own network namespace (needs root)."""
    ctx.ensure_object(dict).update(name=name, root=root)


@lab.command()
@click.option("--racks", type=int, default=3, show_default=True, help="number of racks (r1..rN)")
@click.option("--sites", default=None, help="one site per rack, e.g. a,a,b,b,c (or one for all)")
@click.option(
    "--link", default=None, help='shape every rack, e.g. "delay=50ms loss=1% rate=20mbit"'
)
@click.option("--daemon-cmd", default=None,
              help="per-rack daemon command; placeholders {config} {rack} {ip} {state_dir}"
              " {rack_dir} {lab} (default: meshcloud daemon --config {config})")  # fmt: skip
@click.option("--standin", is_flag=True, help="run the stand-in daemon (meshcloud.lab.standin)")
@click.option("--no-daemon", is_flag=True, help="start no daemons (start them with start-daemon)")
@click.option("--start", default=None, help="start daemons only on these racks, e.g. r1,r2,r3")
@click.option("--bootstrap-expect", type=int, default=None,
              help="racks that form the cluster (default: the daemons started now)")  # fmt: skip
@click.option("--no-wait", is_flag=True, help="do not wait for the daemons' API ports")
@click.option("--timeout", type=float, default=60.0, show_default=True)
@click.option("--nut", is_flag=True, help="give every rack a UPS (NUT dummy-ups and upsd)")
@click.option("--tls", is_flag=True,
              help="racks serve and call HTTPS with a lab CA (<lab dir>/tls/ca.crt)")  # fmt: skip
@click.pass_context
def up(
    ctx: click.Context,
    racks: int,
    sites: str | None,
    link: str | None,
    daemon_cmd: str | None,
    standin: bool,
    no_daemon: bool,
    start: str | None,
    bootstrap_expect: int | None,
    no_wait: bool,
    timeout: float,
    nut: bool,
    tls: bool,
) -> None:
    """Create the lab: a bridge namespace and RACKS racks with sshd and a daemon each."""
    the_lab = _lab(ctx)
    argv = standin_daemon_argv() if standin else (shlex.split(daemon_cmd) if daemon_cmd else None)
    start_daemons: bool | list[str] = not no_daemon
    if start:
        start_daemons = [r.strip() for r in start.split(",") if r.strip()]
    the_lab.up(
        racks,
        sites,
        link,
        daemon_argv=argv,
        start_daemons=start_daemons,
        bootstrap_expect=bootstrap_expect,
        wait=not no_wait,
        timeout=timeout,
        nut=nut,
        tls=tls,
    )
    _print_status(the_lab.status())


@lab.command()
@click.option("--keep-logs", type=click.Path(path_type=Path), default=None,
              help="copy the racks' logs here before removing everything")  # fmt: skip
@click.pass_context
def down(ctx: click.Context, keep_logs: Path | None) -> None:
    """Kill everything the lab started; remove its namespaces, bridge and state."""
    the_lab = _lab(ctx)
    the_lab.down(keep_logs=keep_logs)
    click.echo(f"lab {the_lab.name}: down")


@lab.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Racks, addresses, processes (alive, frozen), link shaping and partitions."""
    st = _lab(ctx).status()
    if as_json:
        click.echo(json.dumps(st.to_dict(), indent=2))
    else:
        _print_status(st)


@lab.command("list")
@click.pass_context
def list_cmd(ctx: click.Context) -> None:
    """Labs that are up."""
    for name in labs(ctx.ensure_object(dict)["root"]):
        click.echo(name)


@lab.command()
@click.argument("rack")
@click.pass_context
def kill(ctx: click.Context, rack: str) -> None:
    """Power-cut RACK: cut its link, then kill every process in it (QEMU included)."""
    _lab(ctx).kill(rack)
    click.echo(f"{rack}: link cut, every process killed, namespace removed")


@lab.command()
@click.argument("rack")
@click.option("--no-wait", is_flag=True, help="do not wait for the daemon's API port")
@click.pass_context
def restart(ctx: click.Context, rack: str, no_wait: bool) -> None:
    """Power comes back on RACK: network, sshd and daemon again, same state dir."""
    _lab(ctx).restart(rack, wait=not no_wait)
    click.echo(f"{rack}: powered on")


@lab.command()
@click.argument("rack")
@click.argument("status")
@click.option("--charge", type=float, default=100.0, show_default=True, help="battery.charge, %")
@click.option("--runtime", type=float, default=3600.0, show_default=True,
              help="battery.runtime, seconds")  # fmt: skip
@click.pass_context
def ups(ctx: click.Context, rack: str, status: str, charge: float, runtime: float) -> None:
    """Set what RACK's UPS reports: STATUS flags such as "OL CHRG", "OB DISCHRG", "OB LB"."""
    _lab(ctx).set_ups(rack, status, charge, runtime)
    click.echo(f"{rack}: UPS reports {status} (charge {charge:g} %, runtime {runtime:g} s)")


@lab.command()
@click.argument("rack")
@click.pass_context
def freeze(ctx: click.Context, rack: str) -> None:
    """SIGSTOP RACK's daemon only (a hung daemon; QEMU keeps running)."""
    pid = _lab(ctx).freeze(rack)
    click.echo(f"{rack}: daemon (pid {pid}) frozen")


@lab.command()
@click.argument("rack")
@click.pass_context
def thaw(ctx: click.Context, rack: str) -> None:
    """SIGCONT RACK's daemon."""
    pid = _lab(ctx).thaw(rack)
    click.echo(f"{rack}: daemon (pid {pid}) running again")


@lab.command()
@click.argument("groups", nargs=-1, required=True)
@click.pass_context
def partition(ctx: click.Context, groups: tuple[str, ...]) -> None:
    """Split racks into GROUPS that cannot talk: `partition r1,r2 r3,r4,r5` (or `partition r3`)."""
    result = _lab(ctx).partition(*groups)
    click.echo("partitioned: " + " | ".join(",".join(g) for g in result))


@lab.command()
@click.pass_context
def heal(ctx: click.Context) -> None:
    """Remove every partition."""
    _lab(ctx).heal()
    click.echo("healed: every rack reaches every other")


@lab.command()
@click.argument("rack")
@click.argument("spec")
@click.pass_context
def degrade(ctx: click.Context, rack: str, spec: str) -> None:
    """Shape what RACK receives: SPEC like "delay=50ms loss=1% rate=20mbit"; "clear" undoes."""
    parsed = _lab(ctx).degrade(rack, spec)
    click.echo(f"{rack}: link {parsed or 'plain'}")


@lab.command("start-daemon")
@click.argument("rack")
@click.option("--no-wait", is_flag=True)
@click.pass_context
def start_daemon(ctx: click.Context, rack: str, no_wait: bool) -> None:
    """Start RACK's daemon (a late rack, or after stop-daemon)."""
    _lab(ctx).start_daemon(rack, wait=not no_wait)
    click.echo(f"{rack}: daemon started")


@lab.command("stop-daemon")
@click.argument("rack")
@click.pass_context
def stop_daemon(ctx: click.Context, rack: str) -> None:
    """Stop RACK's daemon cleanly (SIGTERM)."""
    _lab(ctx).stop_daemon(rack)
    click.echo(f"{rack}: daemon stopped")


@lab.command("add-rack")
@click.option("--site", default="default", show_default=True)
@click.option("--no-daemon", is_flag=True)
@click.pass_context
def add_rack(ctx: click.Context, site: str, no_daemon: bool) -> None:
    """Add one more rack to a running lab."""
    name = _lab(ctx).add_rack(site, start_daemon=not no_daemon)
    click.echo(f"{name}: added")


@lab.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("rack")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def exec_cmd(ctx: click.Context, rack: str, command: tuple[str, ...]) -> None:
    """Run COMMAND inside RACK (or "observer"): `meshcloud lab exec r1 -- ip addr`."""
    argv = _lab(ctx).exec_argv(rack, list(command))
    sys.stdout.flush()
    os.execvp(argv[0], argv)  # noqa: S606 -- an argv list, no shell: replaces this process


@lab.command(context_settings={"ignore_unknown_options": True})
@click.argument("rack")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def ssh(ctx: click.Context, rack: str, command: tuple[str, ...]) -> None:
    """SSH into RACK's sshd as root from the observer, with the lab's key."""
    the_lab = _lab(ctx)
    argv = the_lab.exec_argv(None, the_lab.ssh_argv(rack, *command))
    os.execvp(argv[0], argv)  # noqa: S606 -- an argv list, no shell: replaces this process


def _print_status(st: LabStatus) -> None:
    if not st.up:
        click.echo(f"lab {st.name}: not up")
    else:
        click.echo(
            f"lab {st.name}  ({st.root / st.name})  bridge netns {st.bridge_netns}"
            f"  observer {st.observer_ip}  shaping {st.shaper_backend}"
        )
        rows = [("RACK", "SITE", "IP", "POWER", "PROCESSES", "LINK")]
        for r in st.racks:
            shown = []
            for p in r.processes:
                state = "frozen" if p.frozen else ("up" if p.alive else "DEAD")
                shown.append(f"{p.name}:{p.pid}:{state}")
            rows.append((r.name, r.site, r.ip, r.power, " ".join(shown) or "-", r.link or "plain"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            click.echo(
                "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            )
        if st.partition:
            click.echo("partition: " + " | ".join(",".join(g) for g in st.partition))
        else:
            click.echo("partition: none")
    if st.leftovers:
        click.echo(
            f"leftovers of a crashed lab: {', '.join(st.leftovers)}"
            f" (remove with `meshcloud lab --name {st.name} down`)"
        )

"""`meshcloud ...`: the command line. A thin client of the API plus local commands."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from meshcloud import __version__
from meshcloud.core.errors import MeshcloudError


class _Group(click.Group):
    """A click group that prints MeshcloudError as one clear line and exits 1.

    The command groups that live next to their code (API client, lab, demo,
    images) are attached on first lookup of a command defined elsewhere, so
    that ``meshcloud daemon`` does not import the lab, the demo and the
    image tools: five daemons starting at once on a small machine pay for
    every import.
    """

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        found = super().get_command(ctx, cmd_name)
        if found is None and _register_subcommands():
            found = super().get_command(ctx, cmd_name)
        return found

    def list_commands(self, ctx: click.Context) -> list[str]:
        _register_subcommands()
        return super().list_commands(ctx)

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except MeshcloudError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(1)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="meshcloud")
def main() -> None:
    """meshcloud: keep VM appliances running on a few edge racks linked by a mesh."""


@main.group()
def config() -> None:
    """Check daemon configuration files."""


@config.command("check")
@click.argument("path", type=click.Path(path_type=Path))
def config_check(path: Path) -> None:
    """Validate a daemon config file, its cluster secret and its TLS files."""
    from meshcloud.config import load_config
    from meshcloud.web.tls import peer_tls, tls_context

    cfg = load_config(path)
    cfg.read_secret()
    tls_context(cfg.console.tls_cert, cfg.console.tls_key)
    peer_tls(cfg.console)
    tls = ", TLS with the kit's CA" if cfg.console.tls else ""
    click.echo(f"{path}: valid (rack {cfg.rack.name}, site {cfg.rack.site}{tls})")


@main.command()
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(path_type=Path),
    help="the daemon's YAML config file",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
def daemon(config_path: Path, log_level: str) -> None:
    """Run the rack daemon (refuses to start without a cluster secret)."""
    _lean_imports()
    from meshcloud.config import load_config
    from meshcloud.daemon import run_daemon
    from meshcloud.log import setup_logging

    cfg = load_config(config_path)
    setup_logging(rack=cfg.rack.name, level=log_level)
    run_daemon(cfg)


def _lean_imports() -> None:
    """Skip two costs of importing aiohttp that the daemon has no use for.

    aiohttp builds, at import, two TLS client contexts loaded with the system's
    CA store and a MIME table read from /etc/mime.types: about 0.2 s of CPU
    together, paid by every rack when five start at once on two cores. The
    daemon never verifies peers against the system store (the kit's CA is
    passed explicitly) and serves its console with its own type table
    (meshcloud/web/static.py), so both are built empty.
    """
    import mimetypes
    import os

    if "aiohttp" in sys.modules:
        return
    mimetypes.knownfiles = []  # the built-in table only
    saved = {k: os.environ.get(k) for k in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    os.environ["SSL_CERT_FILE"] = os.devnull
    os.environ["SSL_CERT_DIR"] = os.devnull
    try:
        import aiohttp  # noqa: F401
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_registered = False


def _register_subcommands() -> bool:
    """Attach command groups that live next to the code they drive (once); True if it did."""
    global _registered
    if _registered:
        return False
    _registered = True
    from meshcloud.cli_api import COMMANDS
    from meshcloud.demo import demo
    from meshcloud.lab.cli import lab

    main.add_command(demo)
    main.add_command(lab)
    for command in COMMANDS:
        main.add_command(command)
    from meshcloud.cli_drill import drill

    main.add_command(drill)

    from meshcloud.images.cli import COMMANDS as IMAGE_COMMANDS

    for command in IMAGE_COMMANDS:
        main.add_command(command)
    return True


if __name__ == "__main__":
    main()

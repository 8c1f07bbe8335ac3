"""CLI commands that are thin clients of the API: status, appliance, rack, token."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import yaml

from meshcloud.client import ApiClient, resolve_client
from meshcloud.core.errors import InvalidInput
from meshcloud.core.models import ApplianceSpec

_CA_KEY = "meshcloud.ca"


def _remember_ca(ctx: click.Context, _param: click.Parameter, value: Path | None) -> None:
    if value is not None:
        ctx.meta[_CA_KEY] = value


_ca_option = click.option(
    "--ca",
    envvar="MESHCLOUD_CA",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    expose_value=False,
    callback=_remember_ca,
    help="the kit's ca/ca.crt: trust only it for an https:// API (default: the rack config's"
    " console.tls_ca)",
)
_api_url_option = click.option(
    "--api", envvar="MESHCLOUD_API", help="API URL, e.g. https://10.44.0.11:8440"
)


def api_option(command: Any) -> Any:
    """``--api URL`` and ``--ca FILE`` (the CA that must have signed an https API's certificate)."""
    return _api_url_option(_ca_option(command))


token_option = click.option("--token", envvar="MESHCLOUD_TOKEN", help="API bearer token")
rack_config_option = click.option(
    "--rack-config",
    type=click.Path(path_type=Path),
    help="a rack's daemon.yaml to take the API address and token from",
)


def _client(api: str | None, token: str | None, rack_config: Path | None) -> ApiClient:
    ctx = click.get_current_context(silent=True)
    ca = ctx.meta.get(_CA_KEY) if ctx is not None else None
    return resolve_client(api, token, rack_config, ca=ca)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain left-aligned text table."""
    cells = [[str(h) for h in headers]] + [
        [("-" if c is None else str(c)) for c in r] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _age(seconds: object) -> str:
    return f"{seconds:.1f}s" if isinstance(seconds, int | float) else "-"


@click.command()
@api_option
@token_option
@rack_config_option
@click.option("--json", "as_json", is_flag=True, help="print the raw cluster document")
def status(api: str | None, token: str | None, rack_config: Path | None, as_json: bool) -> None:
    """Show racks, appliances and recent events."""
    doc = _client(api, token, rack_config).request("GET", "/api/v1/cluster")
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    health: dict[str, Any] = doc.get("health", {}).get("racks", {})
    click.echo(f"cluster {doc['cluster_id']}  leader {doc.get('leader') or '-'}"
               f"  answered by {doc.get('answered_by')}")  # fmt: skip
    click.echo()
    rows = []
    for name, rack in doc["racks"].items():
        h = health.get(name, {})
        rows.append([name, rack["site"], h.get("state", "-"), _age(h.get("lease_age_s")),
                     "yes" if rack.get("drained") else "no"])  # fmt: skip
    click.echo(table(["RACK", "SITE", "STATE", "LEASE AGE", "DRAINED"], rows))
    click.echo()
    click.echo(_appliance_table(doc))
    events = doc.get("events", [])[-5:]
    if events:
        click.echo()
        click.echo("recent events:")
        for e in events:
            click.echo(f"  [{e['severity']}] {e['rack']}: {e['message']}")


def _appliance_table(doc: dict[str, Any]) -> str:
    rows = []
    for name, spec in doc["appliances"].items():
        asg = doc["assignments"].get(name) or {}
        state = asg.get("state", "pending")
        move = asg.get("move") or {}
        if move.get("phase") in ("handover", "synced"):
            state = f"{state}, moving to {move['to']}"
        rows.append([
            name, spec["priority"], state, asg.get("primary"),
            ",".join(asg.get("replicas", [])) or "-", asg.get("epoch", "-"),
        ])  # fmt: skip
    return table(["APPLIANCE", "PRIORITY", "STATE", "PRIMARY", "REPLICAS", "EPOCH"], rows)


@click.group()
def appliance() -> None:
    """Deploy, list and remove appliances."""


def load_specs(path: Path) -> list[ApplianceSpec]:
    """Appliance specs from a YAML or JSON file: one document, a list, or several documents."""
    try:
        docs = list(yaml.safe_load_all(path.read_text()))
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidInput(f"cannot read {path}: {exc}") from None
    items: list[Any] = []
    for d in docs:
        items.extend(d if isinstance(d, list) else [d])
    items = [i for i in items if i is not None]
    if not items:
        raise InvalidInput(f"{path}: no appliance spec found")
    return [ApplianceSpec.from_dict(i) for i in items]


@appliance.command("deploy")
@click.argument("file", type=click.Path(path_type=Path))
@api_option
@token_option
@rack_config_option
def appliance_deploy(
    file: Path, api: str | None, token: str | None, rack_config: Path | None
) -> None:
    """Create or update the appliances described in FILE (YAML or JSON)."""
    specs = load_specs(file)
    client = _client(api, token, rack_config)
    for spec in specs:
        client.request("PUT", f"/api/v1/appliances/{spec.name}", spec.to_dict())
        click.echo(f"deployed {spec.name}")


@appliance.command("ls")
@api_option
@token_option
@rack_config_option
def appliance_ls(api: str | None, token: str | None, rack_config: Path | None) -> None:
    """List appliances and where they run."""
    click.echo(_appliance_table(_client(api, token, rack_config).request("GET", "/api/v1/cluster")))


@appliance.command("rm")
@click.argument("name")
@api_option
@token_option
@rack_config_option
def appliance_rm(name: str, api: str | None, token: str | None, rack_config: Path | None) -> None:
    """Remove appliance NAME; it is stopped everywhere."""
    from meshcloud.core.names import validate_name

    validate_name("appliance", name)
    _client(api, token, rack_config).request("DELETE", f"/api/v1/appliances/{name}")
    click.echo(f"removed {name}")


def _appliance_action(
    action: str, name: str, api: str | None, token: str | None, rc: Path | None,
    body: dict[str, Any] | None = None,
) -> Any:  # fmt: skip
    from meshcloud.core.names import validate_name

    validate_name("appliance", name)
    return _client(api, token, rc).request("POST", f"/api/v1/appliances/{name}/{action}", body)


@appliance.command("start")
@click.argument("name")
@api_option
@token_option
@rack_config_option
def appliance_start(
    name: str, api: str | None, token: str | None, rack_config: Path | None
) -> None:
    """Start appliance NAME again after a stop (on the rack that ran it, when it can)."""
    _appliance_action("start", name, api, token, rack_config)
    click.echo(f"{name}: desired state running; its rack starts it")


@appliance.command("stop")
@click.argument("name")
@api_option
@token_option
@rack_config_option
def appliance_stop(name: str, api: str | None, token: str | None, rack_config: Path | None) -> None:
    """Stop appliance NAME; it keeps its data and stays stopped until started."""
    _appliance_action("stop", name, api, token, rack_config)
    click.echo(f"{name}: desired state stopped; its rack shuts it down")


@appliance.command("move")
@click.argument("name")
@click.option("--to", "to", help="the target rack (a replica holder); default: the best one")
@api_option
@token_option
@rack_config_option
def appliance_move(
    name: str, to: str | None, api: str | None, token: str | None, rack_config: Path | None
) -> None:
    """Move appliance NAME to another rack without losing a write (planned move)."""
    from meshcloud.core.names import validate_name

    body = None
    if to is not None:
        body = {"to": validate_name("rack", to)}
    doc = _appliance_action("move", name, api, token, rack_config, body)
    move = doc.get("move", {})
    click.echo(
        f"{name}: moving from {move.get('source')} to {move.get('to')} (pause, final sync, start"
        " there); `meshcloud appliance ls` shows it, the events give the downtime"
    )


@click.group()
def rack() -> None:
    """Drain and undrain racks."""


def _rack_action(
    action: str, name: str, api: str | None, token: str | None, rc: Path | None
) -> None:
    from meshcloud.core.names import validate_name

    validate_name("rack", name)
    _client(api, token, rc).request("POST", f"/api/v1/racks/{name}/{action}")
    click.echo(f"{action}ed {name}")


@rack.command("drain")
@click.argument("name")
@api_option
@token_option
@rack_config_option
def rack_drain(name: str, api: str | None, token: str | None, rack_config: Path | None) -> None:
    """Move every appliance off rack NAME and place nothing new on it."""
    _rack_action("drain", name, api, token, rack_config)


@rack.command("undrain")
@click.argument("name")
@api_option
@token_option
@rack_config_option
def rack_undrain(name: str, api: str | None, token: str | None, rack_config: Path | None) -> None:
    """Let rack NAME take appliances again."""
    _rack_action("undrain", name, api, token, rack_config)


@click.command()
@click.option("--secret-file", type=click.Path(path_type=Path), help="the cluster secret file")
@rack_config_option
def token(secret_file: Path | None, rack_config: Path | None) -> None:
    """Print the API bearer token derived from the cluster secret."""
    from meshcloud.web.auth import api_token

    if secret_file is not None:
        secret = secret_file.read_text().strip()
    else:
        from meshcloud.client import DEFAULT_RACK_CONFIG
        from meshcloud.config import load_config

        secret = load_config(rack_config or DEFAULT_RACK_CONFIG).read_secret()
    click.echo(api_token(secret))


COMMANDS = (status, appliance, rack, token)

"""`meshcloud drill`: the fire drill, a thin client of /api/v1/drill (docs/drill.md)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from meshcloud.cli_api import _client, api_option, rack_config_option, token_option
from meshcloud.core.errors import InvalidInput, Unavailable

POLL_S = 0.5


@click.group()
def drill() -> None:
    """Fire drill: a controlled failover on the live cluster, with RTO and RPO measured."""


def _write(out: Path | None, text: str) -> None:
    if out is None:
        return
    try:
        out.write_text(text)
    except OSError as exc:
        raise InvalidInput(f"cannot write the report to {out}: {exc}") from None


def follow(client: Any, ident: str, timeout_s: float, echo: bool) -> dict[str, Any]:
    """Poll the drill's report until it has an outcome; echo each new step as it comes."""
    shown = 0
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            doc = client.request("GET", f"/api/v1/drill?id={ident}")
        except Unavailable:
            doc = None  # the answering rack may be busy for a moment: keep asking
        report = (doc or {}).get("report") or {}
        steps = report.get("steps", [])
        if echo:
            for s in steps[shown:]:
                click.echo(f"  {s.get('message')}", err=True)
        shown = max(shown, len(steps))
        if report.get("id") == ident and report.get("outcome") is not None:
            return dict(report)
        if time.monotonic() > deadline:
            raise Unavailable(
                f"drill {ident} gave no report within {timeout_s:.0f} s; `meshcloud drill status`"
                " shows it, `meshcloud drill end` ends its cut"
            )
        time.sleep(POLL_S)


@drill.command("appliance")
@click.argument("name", required=False)
@click.option("--no-restore", is_flag=True, help="do not move the appliance back afterwards")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.option("--out", type=click.Path(path_type=Path), help="also write the report to FILE")
@click.option("--timeout", "timeout_s", type=float, default=900.0, show_default=True,
              help="give up waiting for the report after this many seconds")  # fmt: skip
@api_option
@token_option
@rack_config_option
def drill_appliance(
    name: str | None, no_restore: bool, as_json: bool, out: Path | None, timeout_s: float,
    api: str | None, token: str | None, rack_config: Path | None,
) -> None:  # fmt: skip
    """Fail over appliance NAME (default: a random low-priority one) as if its rack were lost.

    Its rack stops renewing its lease and replicating; the leader declares it
    lost and restarts the appliance on the freshest replica. Prints RTO and
    RPO, then the rack rejoins and (unless --no-restore) the appliance moves
    back with a planned move. Operators only.
    """
    from meshcloud.core.drill import report_text
    from meshcloud.core.names import validate_name

    if name is not None:
        validate_name("appliance", name)
    if timeout_s <= 0:
        raise InvalidInput("--timeout must be more than 0 seconds")
    client = _client(api, token, rack_config)
    started = client.request(
        "POST", "/api/v1/drill", {"appliance": name, "restore": not no_restore}
    )["drill"]
    click.echo(
        f"drill {started['id']}: {started['appliance']} on {started['rack']}; this takes about"
        " a minute",
        err=True,
    )
    report = follow(client, started["id"], timeout_s, echo=not as_json)
    text = json.dumps(report, indent=2) + "\n" if as_json else report_text(report)
    click.echo(text, nl=False)
    _write(out, text)
    if not str(report.get("outcome", "")).startswith("passed"):
        raise SystemExit(1)


@drill.command("status")
@click.option("--json", "as_json", is_flag=True, help="print the raw document")
@api_option
@token_option
@rack_config_option
def drill_status(
    as_json: bool, api: str | None, token: str | None, rack_config: Path | None
) -> None:
    """Show the drill under way, and the report of the last drill run from this rack."""
    from meshcloud.core.drill import report_text

    doc = _client(api, token, rack_config).request("GET", "/api/v1/drill")
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    current = doc.get("current")
    click.echo(
        "no drill under way" if current is None
        else f"drill {current['id']} under way: {current['appliance']}, rack {current['rack']} cut"
        f" {'now' if current.get('fenced') else 'no more'}, run by {current['by']}"
    )  # fmt: skip
    if doc.get("report"):
        click.echo()
        click.echo(report_text(doc["report"]), nl=False)


@drill.command("end")
@api_option
@token_option
@rack_config_option
def drill_end(api: str | None, token: str | None, rack_config: Path | None) -> None:
    """End the drill under way at once: its cut rack renews its lease again."""
    ended = _client(api, token, rack_config).request("DELETE", "/api/v1/drill")["ended"]
    click.echo(f"ended drill {ended['id']}; {ended['rack']} renews its lease again")

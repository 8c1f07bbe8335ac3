"""`meshcloud demo`: a local demo on this machine."""

from __future__ import annotations

import click


@click.group()
def demo() -> None:
    """Start or stop the local demo."""


@demo.command("up")
def demo_up() -> None:
    """Start the demo."""
    raise click.ClickException("the demo is not built yet")


@demo.command("down")
def demo_down() -> None:
    """Stop the demo and remove what it made."""

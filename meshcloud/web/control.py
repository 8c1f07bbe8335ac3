"""What the API needs from the cluster, as a small interface.

The daemon implements it on top of the placement-map store; unit tests use an
in-memory implementation. Writes raise Unavailable when they cannot commit.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from meshcloud.core.events import Event
from meshcloud.core.models import ApplianceSpec, ClusterSnapshot


class ClusterControl(Protocol):
    def snapshot(self) -> ClusterSnapshot:
        """The placement map as this rack has it now."""

    def health(self) -> dict[str, Any]:
        """Per-rack health (lease age, reachability) and cluster-wide status."""

    def leader(self) -> str | None:
        """The rack this rack believes leads the Raft group (a hint)."""

    def recent_events(self, limit: int) -> list[Event]:
        """The newest ``limit`` events, oldest first."""

    async def put_appliance(self, spec: ApplianceSpec) -> None:
        """Create or replace an appliance's desired state."""

    async def delete_appliance(self, name: str) -> None:
        """Remove an appliance (NotFound if absent)."""

    async def set_drained(self, rack: str, drained: bool) -> None:
        """Drain or undrain a rack (NotFound if absent)."""

    async def set_desired(self, name: str, state: str) -> None:
        """An operator's wish for an appliance: ``running`` or ``stopped`` (NotFound if absent)."""

    async def move_appliance(self, name: str, to: str | None) -> dict[str, Any]:
        """Begin a planned move (to a replica holder; None: the best one); the move record."""

    def subscribe(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Live updates as (type, document): ("event", ...) and ("cluster", ...)."""

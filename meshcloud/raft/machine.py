"""The replicated placement map inside pysyncobj: a consumer that runs the pure state machine.

Commands travel through the Raft log as canonical JSON text and are applied
by :func:`meshcloud.core.state.apply`; nothing else in this module changes
the state. Full dumps hold ``PlacementState.to_dict()`` (plain data).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from pysyncobj import SyncObjConsumer, replicated

from meshcloud.core.errors import InvalidInput
from meshcloud.core.state import EMPTY, PlacementState, apply, validate_command

DUMP_FORMAT = 1
MAX_COMMAND_BYTES = 32 * 1024  # well under pysyncobj's 64 KiB batch: no chunked entries


def encode_command(command: Mapping[str, Any]) -> str:
    """Validate ``command`` and return its canonical JSON text, or raise InvalidInput."""
    validate_command(command)
    try:
        text = json.dumps(command, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"command is not plain JSON data: {exc}") from None
    if len(text.encode()) > MAX_COMMAND_BYTES:
        raise InvalidInput(f"command is larger than {MAX_COMMAND_BYTES} bytes")
    return text


class PlacementMachine(SyncObjConsumer):  # type: ignore[misc]
    """Holds the current :class:`PlacementState`; replaced (never mutated) on every apply.

    ``state`` may be read from any thread: it is one immutable object swapped
    by reference. ``on_apply(state, result)`` runs in the Raft thread after
    each applied command.
    """

    def __init__(self, on_apply: Callable[[PlacementState, dict[str, Any]], None] | None = None):
        self._on_apply = on_apply
        super().__init__()
        self.state: PlacementState = EMPTY

    @replicated  # type: ignore[untyped-decorator]
    def apply_json(self, payload: str) -> dict[str, Any]:
        try:
            command = json.loads(payload)
        except (TypeError, ValueError):
            result: dict[str, Any] = {"ok": False, "error": "invalid", "message": "not JSON"}
            new = self.state
        else:
            new, result = apply(self.state, command)
        self.state = new
        if self._on_apply is not None:
            self._on_apply(new, result)
        return result

    def reset(self) -> None:
        """Forget the state (a rack whose journal cannot rebuild it, before a snapshot)."""
        self.state = EMPTY

    def _serialize(self) -> dict[str, Any]:
        return {"format": DUMP_FORMAT, "state": self.state.to_dict()}

    def _deserialize(self, data: Mapping[str, Any]) -> None:
        if data.get("format") != DUMP_FORMAT:
            raise ValueError(f"unknown placement dump format {data.get('format')!r}")
        self.state = PlacementState.from_dict(data["state"])

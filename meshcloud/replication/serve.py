"""The replication verbs behind the replication key: ``python -m meshcloud.replication.serve VOLUMES``.

authorized_keys on every rack (see transport.authorized_keys_line) forces a
command for the cluster's replication key that starts rsync's daemon mode
(confined, write-only, to ``VOLUMES/.incoming``) for an rsync request and
this module for anything else. It reads ``SSH_ORIGINAL_COMMAND`` and runs
one replication verb, with a JSON request on stdin where needed, and prints
one JSON line: ``{"ok": true, ...}`` or
``{"ok": false, "error": "Conflict", "message": "..."}`` (exit 3). Anything
else, rsync included, is refused here.

Verbs: ``status APPLIANCE``, ``held``, ``fence APPLIANCE EPOCH``,
``commit`` (stdin: CommitRequest), ``seed`` (stdin: SeedRequest), and
``session``: the same verbs as JSON lines over one long-lived connection.
Anything else is refused. Keep imports light: this starts once per request.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from meshcloud.core.errors import InvalidInput, MeshcloudError
from meshcloud.core.names import validate_name

VERB_PREFIX = "meshcloud-replica"
MAX_REQUEST_BYTES = 1 << 20
EXIT_REFUSED = 3


def _reply(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload, sort_keys=True) + "\n")
    sys.stdout.flush()


def _read_request() -> Any:
    raw = sys.stdin.buffer.read(MAX_REQUEST_BYTES + 1)
    if len(raw) > MAX_REQUEST_BYTES:
        raise InvalidInput("request larger than 1 MiB refused")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise InvalidInput(f"request is not JSON: {exc}") from None


def _int_word(word: str, what: str) -> int:
    if not word.isdigit() or len(word) > 18:
        raise InvalidInput(f"{what} {word!r} must be a non-negative integer")
    return int(word)


def run_verb(volumes: Path, words: list[str], request: Any = None) -> dict[str, Any]:
    """Execute one verb (already split) against ``volumes``; return the JSON reply.

    ``request`` is the verb's JSON body; None reads it from stdin (one-shot mode).
    """
    from meshcloud.replication.store import CommitRequest, ReplicaStore, SeedRequest

    store = ReplicaStore(volumes)
    if not words:
        raise InvalidInput("no verb given")
    verb, args = words[0], words[1:]

    def body() -> Any:
        return _read_request() if request is None else request

    if verb == "status" and len(args) == 1:
        return store.status(validate_name("appliance", args[0]))
    if verb == "held" and not args:
        return {"held": {k: list(v) for k, v in store.held().items()}}
    if verb == "fence" and len(args) == 2:
        return store.fence(validate_name("appliance", args[0]), _int_word(args[1], "epoch"))
    if verb == "commit" and not args:
        return store.commit(CommitRequest.from_dict(body()))
    if verb == "seed" and not args:
        return store.seed(SeedRequest.from_dict(body()))
    raise InvalidInput(f"unknown replication verb {' '.join(words)[:80]!r}")


def run_session(volumes: Path) -> int:
    """Serve requests from one long-lived SSH session: one JSON line in, one JSON line out.

    Each request is ``{"words": [...], "request": {...} or null}``. Saves a
    connection and a process start per request on a link with many cycles.
    """
    for line in sys.stdin:
        if len(line) > MAX_REQUEST_BYTES:
            _reply({"ok": False, "error": "InvalidInput", "message": "request too large"})
            continue
        try:
            msg = json.loads(line)
            if not isinstance(msg, dict) or not isinstance(msg.get("words"), list):
                raise InvalidInput("a session request is {words: [...], request: ...}")
            words = [str(w) for w in msg["words"]]
            if words[:1] == ["session"]:
                raise InvalidInput("sessions do not nest")
            result = run_verb(volumes, words, msg.get("request") or {})
        except ValueError as exc:
            _reply({"ok": False, "error": "InvalidInput", "message": f"bad request: {exc}"})
            continue
        except MeshcloudError as exc:
            _reply({"ok": False, "error": type(exc).__name__, "message": str(exc)})
            continue
        _reply({"ok": True, **result})
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].startswith("/"):
        sys.stderr.write("usage: python -m meshcloud.replication.serve /ABSOLUTE/VOLUMES\n")
        return 2
    volumes = Path(args[0])
    command = os.environ.get("SSH_ORIGINAL_COMMAND", "")
    words = command.split()
    if words[:1] != [VERB_PREFIX]:
        message = "only replication is allowed"
        if words[:1] == ["rsync"]:
            message = (
                "rsync is only allowed as a daemon over SSH (host::incoming); this rack's"
                " authorized_keys predates that: restart its meshcloud daemon to rewrite it"
            )
        _reply({"ok": False, "error": "InvalidInput", "message": message})
        return EXIT_REFUSED
    if words[1:] == ["session"]:
        return run_session(volumes)
    try:
        result = run_verb(volumes, words[1:])
    except MeshcloudError as exc:
        _reply({"ok": False, "error": type(exc).__name__, "message": str(exc)})
        return EXIT_REFUSED
    _reply({"ok": True, **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())

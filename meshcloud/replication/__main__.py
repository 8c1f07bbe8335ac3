"""Operator and test entry points: ``python -m meshcloud.replication COMMAND VOLUMES APPLIANCE``.

- ``status``: print the manifest's status of the appliance's copy;
- ``merge``: merge stacked generations down (restartable; what the daemon does in the background);
- ``recover``: finish interrupted seeds, merges and commits under VOLUMES.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from meshcloud.core.errors import MeshcloudError
from meshcloud.replication.store import ReplicaStore


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or args[0] not in ("status", "merge", "recover"):
        sys.stderr.write("usage: python -m meshcloud.replication status|merge VOLUMES APPLIANCE\n")
        sys.stderr.write("       python -m meshcloud.replication recover VOLUMES\n")
        return 2
    store = ReplicaStore(Path(args[1]))
    try:
        if args[0] == "recover":
            store.recover_all()
            return 0
        if len(args) != 3:
            sys.stderr.write("an appliance name is needed\n")
            return 2
        if args[0] == "merge":
            merges = store.volume(args[2]).merge_all()
            print(json.dumps({"merges": merges}))
            return 0
        print(json.dumps(store.status(args[2]), sort_keys=True))
        return 0
    except MeshcloudError as exc:
        sys.stderr.write(f"{exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())

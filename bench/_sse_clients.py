"""Helper of bench/api.py, run inside the lab's observer namespace.

Opens N event streams to a rack, waits until each has its first `cluster`
message, prints READY, then waits for a line on stdin naming a marker; it
prints, as JSON, how long after reading that line each client saw an
`event`/`cluster` message containing the marker.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import aiohttp


async def client(
    session: aiohttp.ClientSession, url: str, token: str, ready: asyncio.Event,
    marker: dict[str, str], seen: list[float], counter: list[int], n: int,
) -> None:  # fmt: skip
    headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
    async with session.get(url, headers=headers) as resp:
        got_first = False
        async for raw in resp.content:
            line = raw.decode(errors="replace")
            if not line.startswith("data: "):
                continue
            if not got_first:
                got_first = True
                counter[0] += 1
                if counter[0] == n:
                    ready.set()
            if marker.get("name") and marker["name"] in line:
                seen.append(time.monotonic() - float(marker["t0"]))
                return


async def main() -> None:
    url, token, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ready = asyncio.Event()
    marker: dict[str, str] = {}
    seen: list[float] = []
    counter = [0]
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=conn) as session:
        tasks = [
            asyncio.create_task(client(session, url, token, ready, marker, seen, counter, n))
            for _ in range(n)
        ]
        await asyncio.wait_for(ready.wait(), 120)
        print("READY", flush=True)
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        marker.update(name=line.strip(), t0=str(time.monotonic()))
        _done, pending = await asyncio.wait(tasks, timeout=60)
        for task in pending:
            task.cancel()
    print(json.dumps({"clients": n, "received": len(seen), "latency_s": sorted(seen)}), flush=True)


if __name__ == "__main__":
    asyncio.run(main())

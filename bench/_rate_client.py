"""Helper of bench/api.py: an open-loop HTTP load generator at a fixed rate.

Run inside the lab's observer namespace::

    python _rate_client.py URL TOKEN RATE DURATION_S CONNECTIONS

Request ``i`` is due at ``t0 + i / RATE`` whether or not earlier answers
have come back (open loop: a slow server cannot slow the generator down and
so hide its own queueing, the "coordinated omission" of closed-loop tools
such as wrk). Each latency runs from the request's due time to the end of
its response body, so time spent waiting for a free connection counts. Up
to CONNECTIONS keep-alive connections are open at once. Prints one JSON
document: requests sent, answered, per-status counts, errors, achieved
rate and the latencies (seconds). Requests still unanswered 10 s after the
last one was due are cancelled and counted as errors ("unanswered").

`wrk` only measures a closed loop (every connection waits for its answer
before sending again), which finds the saturation throughput but not the
latency at a given load; wrk2, which does, is not packaged in Debian.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from urllib.parse import urlsplit

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]
GRACE_S = 10.0


async def _connect(host: str, port: int) -> Conn:
    return await asyncio.open_connection(host, port)


async def _exchange(conn: Conn, request: bytes) -> int:
    """Send one request on a keep-alive connection; read the whole answer; its status."""
    reader, writer = conn
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if length:
        await reader.readexactly(length)
    return status


async def run(url: str, token: str, rate: float, duration_s: float, connections: int) -> dict:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = (
        f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {token}\r\nAccept: application/json\r\n\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    pool: asyncio.Queue[Conn] = asyncio.Queue()
    for _ in range(connections):
        pool.put_nowait(await _connect(host, port))
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()

    async def one(due: float) -> None:
        conn = await pool.get()
        try:
            status = await _exchange(conn, request)
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            errors[type(exc).__name__] += 1
            conn[1].close()
            try:
                conn = await _connect(host, port)
            except OSError as exc2:
                errors[type(exc2).__name__] += 1
                return
        else:
            statuses[status] += 1
            latencies.append(loop.time() - due)
        finally:
            pool.put_nowait(conn)

    total = int(rate * duration_s)
    t0 = loop.time() + 0.05
    tasks: list[asyncio.Task[None]] = []
    sent = 0
    while sent < total:
        now = loop.time()
        # launch every request already due (the loop may wake late)
        while sent < total and t0 + sent / rate <= now:
            tasks.append(asyncio.create_task(one(t0 + sent / rate)))
            sent += 1
        if sent < total:
            await asyncio.sleep(max(0.0, t0 + sent / rate - loop.time()))
    # answers still missing GRACE_S after the last request was due are counted as
    # unanswered: a server that fell behind gives a result, not a hung benchmark
    _done, late = await asyncio.wait(
        tasks, timeout=max(0.0, t0 + duration_s + GRACE_S - loop.time())
    )
    for task in late:
        task.cancel()
    if late:
        errors["unanswered"] += len(late)
        await asyncio.gather(*late, return_exceptions=True)
    elapsed = loop.time() - t0
    while not pool.empty():
        pool.get_nowait()[1].close()
    return {
        "rate_asked": rate,
        "duration_s": duration_s,
        "connections": connections,
        "sent": sent,
        "answered": len(latencies),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "errors": dict(errors),
        "achieved_rps": len(latencies) / elapsed if elapsed > 0 else 0.0,
        "latency_s": latencies,
    }


def main() -> None:
    url, token, rate, duration, conns = sys.argv[1:6]
    result = asyncio.run(run(url, token, float(rate), float(duration), int(conns)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

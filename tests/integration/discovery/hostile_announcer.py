"""A hostile rack for the discovery tests (run inside its own namespace).

It knows the cluster id (it is public: announced over mDNS) but not the
secret. It announces garbage TXT records under the right cluster id, and
one well-formed record for an impostor ``rack-evil`` whose hello endpoint
answers every challenge with a proof made under the wrong key; it also knocks at the honest
racks with hellos made under the wrong key. Prints JSON lines: what the
honest racks answered to its own hellos, and whether anyone completed step 2
with it.

    python hostile_announcer.py --address IP --cluster-id HEX --targets ip:port,...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys

import aiohttp
from aiohttp import web
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from meshcloud.discovery import proof
from meshcloud.discovery.admission import HELLO_PATH
from meshcloud.discovery.proof import ClusterKeys
from meshcloud.discovery.records import SERVICE_TYPE

WRONG_KEY = ClusterKeys.from_secret("not the cluster secret, but 32+ characters").admission_key


def emit(event: str, **fields: object) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def garbage_records(cid: str, address: str) -> list[AsyncServiceInfo]:
    good = {
        "v": "1",
        "cid": cid,
        "site": "north",
        "raft": "7440",
        "api": "8440",
        "ver": "0.1.0",
        "formed": "0",
    }
    variants: list[dict[str | bytes, str | bytes | None]] = [
        {**good, "rack": "../../etc/passwd"},
        {**good, "rack": "rack-port", "api": "99999"},
        {**good, "rack": "rack-bin", "site": b"\xff\xfe\x00"},
        {**good, "rack": "rack-ctl\x1b[31m"},
        {**good, "rack": "rack-uuid", "formed": "1", "cuuid": "<script>"},
        {"cid": cid, "rack": "rack-missing"},
        {**good, "rack": "x" * 200},
    ]
    infos = [
        AsyncServiceInfo(
            SERVICE_TYPE,
            f"rack-evil-{cid[:8]}.{SERVICE_TYPE}",
            port=8440,
            properties={**good, "rack": "rack-evil"},
            server="rack-evil.local.",
            parsed_addresses=[address],
        )
    ]
    for index, props in enumerate(variants):
        infos.append(
            AsyncServiceInfo(
                SERVICE_TYPE,
                f"garbage-{index}.{SERVICE_TYPE}",
                port=8440,
                properties=props,
                server=f"garbage-{index}.local.",
                parsed_addresses=[address],
            )
        )
    return infos


async def knock(session: aiohttp.ClientSession, keys: ClusterKeys, target: str) -> None:
    nonce = proof.new_nonce()
    doc = {
        "protocol": 1,
        "step": "challenge",
        "cluster_id": keys.cluster_id,
        "client": "rack-evil",
        "client_nonce": nonce,
        "mac": proof.challenge_mac(keys, "rack-evil", nonce),
    }
    try:
        async with session.post(f"http://{target}/api/v1/peer/hello", json=doc) as resp:
            emit("knock", target=target, status=resp.status)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        emit("knock", target=target, status=None, error=type(exc).__name__)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--cluster-id", required=True)
    parser.add_argument("--targets", default="")
    args = parser.parse_args()
    keys = ClusterKeys(cluster_id=args.cluster_id, admission_key=WRONG_KEY)

    async def impostor_hello(request: web.Request) -> web.Response:
        """Answer every challenge with a proof made under the wrong key."""
        doc = await request.json()
        if doc.get("step") == "prove":  # an honest rack would never get this far
            emit("impostor-admitted", peer=doc.get("client"))
            return web.json_response({"error": "nope"}, status=500)
        server_nonce = proof.new_nonce()
        return web.json_response(
            {
                "protocol": 1,
                "server": "rack-evil",
                "server_nonce": server_nonce,
                "proof": proof.server_proof(
                    keys,
                    str(doc.get("client")),
                    "rack-evil",
                    str(doc.get("client_nonce")),
                    server_nonce,
                ),
            }
        )

    app = web.Application()
    app.router.add_post(HELLO_PATH, impostor_hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, args.address, 8440).start()

    aiozc = AsyncZeroconf(interfaces=[args.address], ip_version=IPVersion.V4Only)
    await asyncio.gather(
        *(
            aiozc.async_register_service(info, allow_name_change=True, strict=False)
            for info in garbage_records(args.cluster_id, args.address)
        )
    )
    emit("ready")

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    targets = [t for t in args.targets.split(",") if t]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while not stopping.is_set():
            for target in targets:
                await knock(session, keys, target)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), 0.5)
    await aiozc.async_close()
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())

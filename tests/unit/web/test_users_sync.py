"""Console users alike on every rack: a spent code is spent everywhere, users follow."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from meshcloud.core.models import Capacity, Rack
from meshcloud.web.app import WebContext, create_app
from meshcloud.web.auth import api_token
from meshcloud.web.users import Role, UserStore
from tests.unit.web.fake_cluster import CODES, FAST_HASHER, PASSWORDS, MemoryControl, write_users

TOKEN = api_token("k" * 40)


async def eventually(check, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_merge_keeps_the_newer_document_and_every_spent_code(tmp_path: Path) -> None:
    write_users(tmp_path / "a" / "users.json")  # both racks start from the same kit file
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "users.json", tmp_path / "b" / "users.json")
    a = UserStore(tmp_path / "a" / "users.json", hasher=FAST_HASHER)
    b = UserStore(tmp_path / "b" / "users.json", hasher=FAST_HASHER)
    # concurrent changes: a user added on a, a code spent on b (both revision 1):
    # whichever document wins, the spent code stays spent on both
    await a.put_user("medic", Role.OPERATOR, "first-pass-1")
    assert await b.use_emergency_code(CODES[0]) == 1
    await a.adopt(await b.doc())
    await b.adopt(await a.doc())
    assert (await a.doc()) == (await b.doc())
    assert [c.used for c in (await a.doc()).codes] == [True, False]
    assert not await a.adopt(await b.doc())  # converged: nothing more to do
    # one change after the other: both survive
    await a.put_user("nurse", Role.VIEWER, "first-pass-2")
    assert await b.adopt(await a.doc())
    assert await b.use_emergency_code(CODES[1]) == 2
    assert await a.adopt(await b.doc())
    doc = await a.doc()
    assert doc.user("nurse") is not None and [c.used for c in doc.codes] == [True, True]


async def test_a_code_spent_on_one_rack_is_refused_on_the_other(tmp_path: Path) -> None:
    cap = Capacity(4, 4096, 10)
    controls = [MemoryControl(), MemoryControl()]
    clients: list[TestClient] = []
    write_users(tmp_path / "kit-users.json")
    for index, name in enumerate(("rack-1", "rack-2")):
        (tmp_path / name).mkdir()
        shutil.copy(tmp_path / "kit-users.json", tmp_path / name / "users.json")
        users = UserStore(tmp_path / name / "users.json", hasher=FAST_HASHER)
        app = create_app(WebContext(name, "north", TOKEN, control=controls[index], users=users))
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
    try:
        racks = {
            name: Rack(name, "north", cap, address="127.0.0.1", api_port=c.server.port or 0)
            for name, c in zip(("rack-1", "rack-2"), clients, strict=True)
        }
        for control in controls:
            control.racks = dict(racks)
        one, two = clients
        resp = await one.post("/api/v1/session", json={"code": CODES[1]})
        assert resp.status == 200
        csrf = (await resp.json())["csrf"]
        resp = await one.put(
            "/api/v1/users/medic",
            json={"role": "viewer", "password": "first-pass-1"},
            headers={"X-CSRF-Token": csrf},
        )
        assert resp.status == 200

        async def on_two() -> bool:
            resp = await two.get(
                "/api/v1/console/users-doc", headers={"Authorization": f"Bearer {TOKEN}"}
            )
            body = await resp.json()
            names = {u["name"] for u in body["users"]}
            return "medic" in names and body["emergency_codes"][1]["used"]

        await eventually(on_two)
        assert (await two.post("/api/v1/session", json={"code": CODES[1]})).status == 401
        medic = {"user": "medic", "password": "first-pass-1"}
        assert (await two.post("/api/v1/session", json=medic)).status == 200
        # a console session, even an admin's, cannot read the hashes
        admin = {"user": "admin", "password": PASSWORDS["admin"]}
        assert (await one.post("/api/v1/session", json=admin)).status == 200
        assert (await one.get("/api/v1/console/users-doc")).status == 403
    finally:
        for client in clients:
            await client.close()

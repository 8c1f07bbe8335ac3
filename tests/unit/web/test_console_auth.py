"""Console logins, sessions, CSRF, roles and rate limits, against the in-memory cluster."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from meshcloud.images import kit
from meshcloud.web.app import WebContext, create_app
from meshcloud.web.auth import api_token
from meshcloud.web.ratelimit import LoginLimiter
from meshcloud.web.sessions import SessionStore
from meshcloud.web.users import CODE_ALPHABET, Role, UserStore, normalise_code
from tests.unit.web.fake_cluster import CODES, FAST_HASHER, PASSWORDS, MemoryControl, write_users

TOKEN = api_token("s" * 40)
SPEC = {"name": "tiles", "image": "demo"}


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient]:
    path = tmp_path / "console" / "users.json"
    write_users(path, must_change=("oper",))
    users = UserStore(path, hasher=FAST_HASHER)
    app = create_app(WebContext("rack-1", "north", TOKEN, control=MemoryControl(), users=users))
    async with TestClient(TestServer(app)) as c:
        yield c


async def login(client: TestClient, user: str) -> str:
    resp = await client.post("/api/v1/session", json={"user": user, "password": PASSWORDS[user]})
    assert resp.status == 200, await resp.text()
    csrf: str = (await resp.json())["csrf"]
    return csrf


async def test_login_sets_a_strict_http_only_cookie(client: TestClient) -> None:
    resp = await client.post(
        "/api/v1/session", json={"user": "admin", "password": PASSWORDS["admin"]}
    )
    assert resp.status == 200
    cookie = resp.headers["Set-Cookie"]
    assert "mc_session=" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "Secure" not in cookie  # plain HTTP in this test; TLS sets Secure
    doc = await resp.json()
    assert doc["role"] == "admin" and len(doc["csrf"]) > 20
    me = await (await client.get("/api/v1/session")).json()
    assert me["user"] == "admin" and me["csrf"] == doc["csrf"]


@pytest.mark.parametrize(
    "body", [{"user": "admin", "password": "wrong-password"}, {"user": "nobody", "password": "x"}]
)
async def test_wrong_login_is_refused_without_saying_which_part(
    client: TestClient, body: dict[str, str]
) -> None:
    resp = await client.post("/api/v1/session", json=body)
    assert resp.status == 401
    assert (await resp.json())["error"]["message"] == "wrong user name or password"
    assert (await client.get("/api/v1/cluster")).status == 401


async def test_a_malformed_login_never_echoes_the_password(client: TestClient) -> None:
    resp = await client.post("/api/v1/session", json={"user": "a", "password": "hunter2", "x": 1})
    assert resp.status == 400
    assert "hunter2" not in await resp.text()


async def test_changes_need_the_csrf_token(client: TestClient) -> None:
    csrf = await login(client, "admin")
    resp = await client.put("/api/v1/appliances/tiles", json=SPEC)
    assert resp.status == 403 and "X-CSRF-Token" in (await resp.json())["error"]["message"]
    resp = await client.put("/api/v1/appliances/tiles", json=SPEC, headers={"X-CSRF-Token": "x"})
    assert resp.status == 403
    resp = await client.put("/api/v1/appliances/tiles", json=SPEC, headers={"X-CSRF-Token": csrf})
    assert resp.status == 200
    assert (await client.delete("/api/v1/session")).status == 403  # logging out is a change too


async def test_a_foreign_origin_is_refused_even_with_the_token(client: TestClient) -> None:
    csrf = await login(client, "admin")
    headers = {"X-CSRF-Token": csrf, "Origin": "http://evil.example"}
    resp = await client.put("/api/v1/appliances/tiles", json=SPEC, headers=headers)
    assert resp.status == 403


async def test_the_bearer_token_needs_no_csrf_token(client: TestClient) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert (await client.put("/api/v1/appliances/tiles", json=SPEC, headers=headers)).status == 200
    bad = {"Authorization": "Bearer wrong"}
    assert (await client.get("/api/v1/cluster", headers=bad)).status == 401


async def test_a_viewer_reads_but_changes_nothing(client: TestClient) -> None:
    csrf = await login(client, "view")
    headers = {"X-CSRF-Token": csrf}
    assert (await client.get("/api/v1/cluster")).status == 200
    for method, path in [
        ("PUT", "/api/v1/appliances/tiles"),
        ("DELETE", "/api/v1/appliances/tiles"),
        ("POST", "/api/v1/racks/rack-2/drain"),
    ]:
        resp = await client.request(method, path, json=SPEC, headers=headers)
        assert resp.status == 403, (method, path)
        assert "viewer" in (await resp.json())["error"]["message"]
    assert (await client.get("/api/v1/users")).status == 403


async def test_a_must_change_user_may_only_change_the_password(client: TestClient) -> None:
    csrf = await login(client, "oper")
    headers = {"X-CSRF-Token": csrf}
    assert (await client.get("/api/v1/cluster")).status == 403
    resp = await client.post(
        "/api/v1/session/password", json={"new_password": "a-new-password-2"}, headers=headers
    )
    assert resp.status == 200, await resp.text()
    assert (await client.get("/api/v1/cluster")).status == 200
    assert (await client.put("/api/v1/appliances/tiles", json=SPEC, headers=headers)).status == 200
    # the new password works, the old one no longer does
    await client.delete("/api/v1/session", headers=headers)
    old = {"user": "oper", "password": PASSWORDS["oper"]}
    assert (await client.post("/api/v1/session", json=old)).status == 401
    new = {"user": "oper", "password": "a-new-password-2"}
    assert (await client.post("/api/v1/session", json=new)).status == 200


async def test_emergency_code_works_once(client: TestClient) -> None:
    resp = await client.post("/api/v1/session", json={"code": CODES[0].lower().replace("-", " ")})
    assert resp.status == 200, await resp.text()
    doc = await resp.json()
    assert doc["role"] == "admin" and doc["emergency"] and doc["user"] == "emergency-1"
    users = await (await client.get("/api/v1/users")).json()
    assert users["emergency_codes"] == {"total": 2, "unused": 1}
    client.session.cookie_jar.clear()
    again = await client.post("/api/v1/session", json={"code": CODES[0]})
    assert again.status == 401


async def test_admin_manages_users_and_codes(client: TestClient) -> None:
    headers = {"X-CSRF-Token": await login(client, "admin")}
    resp = await client.put(
        "/api/v1/users/medic",
        json={"role": "operator", "password": "first-pass-1"},
        headers=headers,
    )
    assert resp.status == 200 and (await resp.json())["must_change_password"] is True
    doc = await (await client.get("/api/v1/users")).json()
    assert {u["name"]: u["role"] for u in doc["users"]}["medic"] == "operator"
    assert "password_argon2" not in json.dumps(doc)
    assert (
        await client.put("/api/v1/users/admin", json={"role": "viewer"}, headers=headers)
    ).status == 409
    assert (await client.delete("/api/v1/users/medic", headers=headers)).status == 200
    codes = (await (await client.post("/api/v1/emergency-codes", headers=headers)).json())["codes"]
    assert len(codes) == 10 and all(normalise_code(c) == c for c in codes)
    client.session.cookie_jar.clear()
    assert (await client.post("/api/v1/session", json={"code": CODES[1]})).status == 401
    assert (await client.post("/api/v1/session", json={"code": codes[3]})).status == 200


async def test_role_change_applies_to_live_sessions(client: TestClient) -> None:
    admin = TestClient(client.server)
    await admin.start_server()
    try:
        admin_headers = {"X-CSRF-Token": await login(admin, "admin")}
        view_headers = {"X-CSRF-Token": await login(client, "view")}
        resp = await admin.put(
            "/api/v1/users/view", json={"role": "operator"}, headers=admin_headers
        )
        assert resp.status == 200
        resp = await client.put("/api/v1/appliances/tiles", json=SPEC, headers=view_headers)
        assert resp.status == 200
    finally:
        await admin.close()


async def test_login_attempts_are_rate_limited(client: TestClient) -> None:
    for _ in range(5):
        bad = await client.post("/api/v1/session", json={"user": "admin", "password": "nope-nope"})
        assert bad.status == 401
    locked = await client.post(
        "/api/v1/session", json={"user": "admin", "password": PASSWORDS["admin"]}
    )
    assert locked.status == 429 and int(locked.headers["Retry-After"]) >= 1


def test_limiter_per_user_and_per_address() -> None:
    now = [0.0]
    limiter = LoginLimiter(user_free=3, address_free=5, base_lock_s=2, clock=lambda: now[0])
    for _ in range(3):
        assert limiter.retry_after("alice", "10.0.0.1") == 0
        limiter.failed("alice", "10.0.0.1")
    assert limiter.retry_after("alice", "10.0.0.9") == 2  # the user is locked from anywhere
    assert limiter.retry_after("bob", "10.0.0.1") == 0  # others from that address are not (yet)
    for name in ("bob", "carol"):
        limiter.failed(name, "10.0.0.1")
    assert limiter.retry_after("dave", "10.0.0.1") > 0  # the address is now locked for everyone
    now[0] = 3.0
    limiter.failed("alice", "10.0.0.2")
    assert limiter.retry_after("alice", "x") == 4  # the lock doubles
    limiter.succeeded("alice")
    now[0] = 10_000.0
    assert limiter.retry_after("alice", "10.0.0.1") == 0  # forgotten


def test_sessions_expire_on_the_monotonic_clock() -> None:
    now = [100.0]
    store = SessionStore(idle_s=60, max_age_s=300, clock=lambda: now[0])
    token, session = store.create("alice", Role.VIEWER)
    now[0] += 59
    assert store.get(token) is session
    now[0] += 59
    assert store.get(token) is session  # use keeps it alive
    now[0] += 61
    assert store.get(token) is None
    token, _ = store.create("alice", Role.VIEWER)
    for _ in range(7):
        now[0] += 50
        store.get(token)
    assert store.get(token) is None  # older than max_age_s


async def test_users_seeded_from_the_kit_and_kept_in_kit_format(tmp_path: Path) -> None:
    plan = kit.plan_kit("relief", "rack-1,rack-2,rack-3")
    secrets = kit.create_kit(plan, tmp_path / "kit", hasher=FAST_HASHER)
    store = UserStore(tmp_path / "state" / "users.json", seed=tmp_path / "kit" / "users.json",
                      hasher=FAST_HASHER)  # fmt: skip
    user = await store.authenticate("admin", secrets.admin_password)
    assert user is not None and user.role is Role.ADMIN and user.must_change_password
    assert await store.use_emergency_code(secrets.emergency_codes[4]) == 5
    assert await store.use_emergency_code(secrets.emergency_codes[4]) is None
    on_disk = json.loads((tmp_path / "state" / "users.json").read_text())
    assert on_disk["emergency_codes"][4]["used"] is True
    assert (tmp_path / "state" / "users.json").stat().st_mode & 0o777 == 0o600
    kit_doc = json.loads((tmp_path / "kit" / "users.json").read_text())
    assert kit_doc["emergency_codes"][4]["used"] is False  # the kit itself is never changed
    assert CODE_ALPHABET == kit._CODE_ALPHABET


async def test_no_users_file_says_what_to_do(tmp_path: Path) -> None:
    users = UserStore(tmp_path / "none.json", seed=tmp_path / "missing.json", hasher=FAST_HASHER)
    app = create_app(WebContext("rack-1", "north", TOKEN, control=MemoryControl(), users=users))
    async with TestClient(TestServer(app)) as c:
        resp = await c.post("/api/v1/session", json={"user": "admin", "password": "whatever-1"})
        assert resp.status == 401
        assert "users.json" in (await resp.json())["error"]["message"]

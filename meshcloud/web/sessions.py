"""Console sessions: random tokens in a secure cookie, kept in memory on the rack.

The cookie is HttpOnly, SameSite=Strict and Secure when the rack speaks TLS.
The rack keeps only a hash of each token. Ages are counted on the monotonic
clock (racks may have no time source); a restarted daemon forgets every
session and people log in again.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from meshcloud.web.errors import Handler
from meshcloud.web.users import Role

COOKIE = "mc_session"
MAX_AGE_S = 24 * 3600.0
MAX_SESSIONS = 1000


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class Session:
    user: str
    role: Role
    csrf: str
    created: float
    last_seen: float
    must_change_password: bool = False
    emergency: bool = False

    def public(self) -> dict[str, object]:
        return {
            "user": self.user,
            "role": self.role.label,
            "csrf": self.csrf,
            "must_change_password": self.must_change_password,
            "emergency": self.emergency,
        }


SESSION_KEY = web.RequestKey("session", Session)


class SessionStore:
    """Sessions by token hash; idle ones and ones older than ``max_age_s`` expire."""

    def __init__(
        self,
        idle_s: float,
        max_age_s: float = MAX_AGE_S,
        clock: Callable[[], float] = time.monotonic,
        max_sessions: int = MAX_SESSIONS,
    ) -> None:
        self.idle_s = idle_s
        self.max_age_s = max_age_s
        self.clock = clock
        self.max_sessions = max_sessions
        self._by_hash: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._by_hash)

    def create(
        self, user: str, role: Role, *, must_change_password: bool = False, emergency: bool = False
    ) -> tuple[str, Session]:
        """A new session; returns (cookie token, session). The oldest goes when full."""
        self._expire()
        if len(self._by_hash) >= self.max_sessions:
            oldest = min(self._by_hash, key=lambda h: self._by_hash[h].last_seen)
            del self._by_hash[oldest]
        token = secrets.token_urlsafe(32)
        now = self.clock()
        session = Session(
            user, role, secrets.token_urlsafe(32), now, now, must_change_password, emergency
        )
        self._by_hash[_digest(token)] = session
        return token, session

    def get(self, token: str) -> Session | None:
        """The live session for ``token`` (its idle time restarts), or None."""
        key = _digest(token)
        session = self._by_hash.get(key)
        if session is None:
            return None
        now = self.clock()
        if now - session.last_seen > self.idle_s or now - session.created > self.max_age_s:
            del self._by_hash[key]
            return None
        session.last_seen = now
        return session

    def drop(self, token: str) -> None:
        self._by_hash.pop(_digest(token), None)

    def drop_user(self, user: str, keep: Session | None = None) -> None:
        """End every session of ``user`` (except ``keep``): deleted, or password changed."""
        for key, session in list(self._by_hash.items()):
            if session.user == user and session is not keep:
                del self._by_hash[key]

    def set_role(self, user: str, role: Role) -> None:
        for session in self._by_hash.values():
            if session.user == user and not session.emergency:
                session.role = role

    def _expire(self) -> None:
        now = self.clock()
        for key, s in list(self._by_hash.items()):
            if now - s.last_seen > self.idle_s or now - s.created > self.max_age_s:
                del self._by_hash[key]


SESSIONS = web.AppKey("sessions", SessionStore)


def set_cookie(request: web.Request, response: web.StreamResponse, token: str) -> None:
    response.set_cookie(
        COOKIE,
        token,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )


def clear_cookie(request: web.Request, response: web.StreamResponse) -> None:
    response.del_cookie(COOKIE, path="/", samesite="Strict", secure=request.secure)


def request_session(request: web.Request) -> Session | None:
    return request.get(SESSION_KEY)


@web.middleware
async def session_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Attach the request's live session (from the cookie), if any, to ``request``."""
    token = request.cookies.get(COOKIE)
    store = request.app.get(SESSIONS)
    if token and store is not None:
        session = store.get(token)
        if session is not None:
            request[SESSION_KEY] = session
    return await handler(request)

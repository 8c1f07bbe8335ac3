"""Console users, roles and one-time emergency codes, kept in the rack's users file.

The file has the deployment kit's format (meshcloud/images/kit.py, docs/kit.md)::

    {"version": 1, "revision": 0,
     "users": [{"name", "role", "password_argon2", "must_change_password"}],
     "emergency_codes": [{"id", "argon2", "used"}]}

Only argon2 hashes are stored. A rack copies the kit's file into its state
directory the first time it needs it (``seed``) and from then on changes its
own copy, which users_sync.py keeps alike on every rack; the file is
re-read whenever it changes on disk. Emergency codes
are random strings printed once: a code works exactly once and involves no
clock (racks may have no time source). Every blocking step (file I/O,
argon2) runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import IntEnum
from pathlib import Path
from typing import Any, TypeVar

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from meshcloud.core.errors import Conflict, InvalidInput, NotFound, Unavailable
from meshcloud.core.names import validate_name

USERS_VERSION = 1
EMERGENCY_CODES = 10
MIN_PASSWORD_LEN = 10
MAX_PASSWORD_LEN = 256
# The kit's alphabet (meshcloud/images/kit.py): no 0/O, 1/I/L, read off paper in a hurry.
CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"
CODE_GROUPS, CODE_GROUP_LEN = 3, 4
# argon2 needs 64 MiB per verification: two at a time at most.
VERIFY_SLOTS = 2

T = TypeVar("T")


class Role(IntEnum):
    """What a user may do; each role can do everything the ones below it can."""

    VIEWER = 1  # sees everything, changes nothing
    OPERATOR = 2  # deploys, deletes and drains
    ADMIN = 3  # also manages users and emergency codes

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, value: object) -> Role:
        if isinstance(value, str) and value.upper() in cls.__members__:
            return cls[value.upper()]
        raise InvalidInput(f"role {value!r} is not one of viewer, operator, admin")


@dataclass(frozen=True)
class User:
    name: str
    role: Role
    password_argon2: str
    must_change_password: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role.label,
            "password_argon2": self.password_argon2,
            "must_change_password": self.must_change_password,
        }

    def public(self) -> dict[str, Any]:
        """What the console may show: no hash."""
        return {
            "name": self.name,
            "role": self.role.label,
            "must_change_password": self.must_change_password,
        }


@dataclass(frozen=True)
class EmergencyCode:
    id: int
    argon2: str
    used: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "argon2": self.argon2, "used": self.used}


@dataclass(frozen=True)
class UsersDoc:
    users: tuple[User, ...] = ()
    codes: tuple[EmergencyCode, ...] = ()
    revision: int = 0

    def user(self, name: str) -> User | None:
        return next((u for u in self.users if u.name == name), None)

    def admins(self) -> list[str]:
        return [u.name for u in self.users if u.role is Role.ADMIN]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": USERS_VERSION,
            "revision": self.revision,
            "users": [u.to_dict() for u in self.users],
            "emergency_codes": [c.to_dict() for c in self.codes],
        }


def parse_users(data: object, source: str = "users file") -> UsersDoc:
    """Validate a users document (the kit's format); raises InvalidInput naming the problem."""
    if not isinstance(data, dict) or data.get("version") != USERS_VERSION:
        raise InvalidInput(f"{source}: not a version {USERS_VERSION} users document")
    users = []
    for entry in data.get("users", []):
        try:
            name = validate_name("user", entry["name"])
            hashed = entry["password_argon2"]
            if not isinstance(hashed, str) or not hashed.startswith("$argon2"):
                raise InvalidInput(f"user {name}: password_argon2 is not an argon2 hash")
            users.append(
                User(
                    name, Role.parse(entry["role"]), hashed, bool(entry.get("must_change_password"))
                )
            )
        except (KeyError, TypeError) as exc:
            raise InvalidInput(f"{source}: a user entry lacks {exc}") from None
    names = [u.name for u in users]
    if len(set(names)) != len(names):
        raise InvalidInput(f"{source}: user names must be unique")
    codes = []
    for entry in data.get("emergency_codes", []):
        try:
            codes.append(EmergencyCode(int(entry["id"]), str(entry["argon2"]), bool(entry["used"])))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"{source}: an emergency code entry is broken ({exc})") from None
    revision = data.get("revision", 0)
    return UsersDoc(tuple(users), tuple(codes), revision if isinstance(revision, int) else 0)


def _digest(doc: UsersDoc) -> str:
    return hashlib.sha256(json.dumps(doc.to_dict(), sort_keys=True).encode()).hexdigest()


def check_password(password: object) -> str:
    if not isinstance(password, str) or not MIN_PASSWORD_LEN <= len(password) <= MAX_PASSWORD_LEN:
        raise InvalidInput(
            f"a password needs {MIN_PASSWORD_LEN} to {MAX_PASSWORD_LEN} characters;"
            " a few words make a good one"
        )
    return password


def normalise_code(code: str) -> str | None:
    """``abcd efgh-jkmn`` -> ``ABCD-EFGH-JKMN``; None if it cannot be a code."""
    chars = [c for c in code.upper() if c.isalnum()]
    if len(chars) != CODE_GROUPS * CODE_GROUP_LEN or any(c not in CODE_ALPHABET for c in chars):
        return None
    n = CODE_GROUP_LEN
    return "-".join("".join(chars[i : i + n]) for i in range(0, len(chars), n))


def new_code() -> str:
    return "-".join(
        "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_GROUP_LEN))
        for _ in range(CODE_GROUPS)
    )


def _verify(hasher: PasswordHasher, hashed: str, secret: str) -> bool:
    try:
        return hasher.verify(hashed, secret)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def _read(path: Path) -> tuple[float, UsersDoc] | None:
    try:
        stat = path.stat()
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise Unavailable(f"cannot read the console users file {path}: {exc}") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise Unavailable(f"{path} is not valid JSON ({exc}): restore it from the kit") from None
    return stat.st_mtime_ns, parse_users(data, str(path))


def _write(path: Path, doc: UsersDoc) -> float:
    """Replace the file atomically (0600): a crash leaves the old or the new document."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(doc.to_dict(), indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path.stat().st_mtime_ns


def _seed(path: Path, seed: Path | None) -> None:
    if seed is not None and not path.exists() and seed.is_file():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        shutil.copyfile(seed, path)
        os.chmod(path, 0o600)


class UserStore:
    """The rack's console users. Methods that read the file or hash are coroutines."""

    def __init__(
        self, path: Path, seed: Path | None = None, hasher: PasswordHasher | None = None
    ) -> None:
        self.path = path
        self.seed = seed
        self.hasher = hasher or PasswordHasher()
        self._doc = UsersDoc()
        self._mtime: float | None = None
        self._lock = asyncio.Lock()
        self._slots = asyncio.Semaphore(VERIFY_SLOTS)
        self._dummy: str | None = None
        self.on_change: list[Callable[[UsersDoc], None]] = []  # local changes (users_sync.py)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    async def doc(self) -> UsersDoc:
        """The current document, re-read if the file changed on disk."""

        def load() -> tuple[float, UsersDoc] | None:
            _seed(self.path, self.seed)
            try:
                mtime = self.path.stat().st_mtime_ns
            except FileNotFoundError:
                return None
            if mtime == self._mtime:
                return mtime, self._doc
            return _read(self.path)

        loaded = await self._run(load)
        if loaded is None:
            self._doc, self._mtime = UsersDoc(), None
        else:
            self._mtime, self._doc = loaded
        return self._doc

    async def _save(self, doc: UsersDoc, *, local: bool = True) -> None:
        if local:
            doc = replace(doc, revision=doc.revision + 1)
        self._mtime = await self._run(_write, self.path, doc)
        self._doc = doc
        if local:
            for callback in self.on_change:
                callback(doc)

    async def adopt(self, remote: UsersDoc) -> bool:
        """Merge another rack's document; True if ours changed.

        The higher revision wins (equal revisions: the larger digest, so every
        rack picks the same); a code spent on either side stays spent. If the
        merge differs from what the other rack sent, ours gets a new revision
        (and is pushed on, through ``on_change``).
        """
        async with self._lock:
            local = await self.doc()
            if (remote.revision, _digest(remote)) > (local.revision, _digest(local)):
                base, other = remote, local
            else:
                base, other = local, remote
            spent = {(c.id, c.argon2) for c in other.codes if c.used}
            codes = tuple(
                replace(c, used=True) if (c.id, c.argon2) in spent else c for c in base.codes
            )
            merged = replace(base, codes=codes)
            if merged == local:
                return False
            if merged == remote:
                await self._save(merged, local=False)
            else:
                await self._save(replace(merged, revision=max(local.revision, remote.revision)))
            return True

    async def _verify(self, hashed: str, secret: str) -> bool:
        async with self._slots:
            return await self._run(_verify, self.hasher, hashed, secret)

    async def _hash(self, secret: str) -> str:
        async with self._slots:
            return await self._run(self.hasher.hash, secret)

    async def authenticate(self, name: str, password: str) -> User | None:
        """The user if ``password`` is theirs; an unknown name costs the same time."""
        doc = await self.doc()
        user = doc.user(name)
        if user is None:
            if self._dummy is None:
                self._dummy = await self._hash(secrets.token_urlsafe(16))
            await self._verify(self._dummy, password)
            return None
        return user if await self._verify(user.password_argon2, password) else None

    async def use_emergency_code(self, code: str) -> int | None:
        """Spend ``code``: its id once it is marked used on disk, None if it is not a live code."""
        normal = normalise_code(code)
        if normal is None:
            return None
        async with self._lock:
            doc = await self.doc()
            for entry in doc.codes:
                if not entry.used and await self._verify(entry.argon2, normal):
                    codes = tuple(replace(c, used=True) if c is entry else c for c in doc.codes)
                    await self._save(replace(doc, codes=codes))
                    return entry.id
        return None

    async def change_password(self, name: str, new_password: str) -> None:
        check_password(new_password)
        hashed = await self._hash(new_password)
        async with self._lock:
            doc = await self.doc()
            user = doc.user(name)
            if user is None:
                raise NotFound(f"user {name} does not exist on this rack")
            await self._save(self._with_user(doc, replace(user, password_argon2=hashed,
                                                          must_change_password=False)))  # fmt: skip

    @staticmethod
    def _with_user(doc: UsersDoc, user: User) -> UsersDoc:
        users = [u for u in doc.users if u.name != user.name]
        users.append(user)
        return replace(doc, users=tuple(sorted(users, key=lambda u: u.name)))

    async def put_user(self, name: str, role: Role, password: str | None) -> User:
        """Create a user (a password is needed) or change one's role and/or password.

        A password set by an admin must be changed by the user at the next login.
        """
        validate_name("user", name)
        hashed = await self._hash(check_password(password)) if password is not None else None
        async with self._lock:
            doc = await self.doc()
            old = doc.user(name)
            if old is None and hashed is None:
                raise InvalidInput(f"user {name} is new: give a first password")
            if old is not None and old.role is Role.ADMIN and role is not Role.ADMIN:
                self._keep_an_admin(doc, name)
            if old is None:
                assert hashed is not None
                user = User(name, role, hashed, must_change_password=True)
            else:
                user = replace(old, role=role)
                if hashed is not None:
                    user = replace(user, password_argon2=hashed, must_change_password=True)
            await self._save(self._with_user(doc, user))
            return user

    @staticmethod
    def _keep_an_admin(doc: UsersDoc, name: str) -> None:
        if doc.admins() == [name]:
            raise Conflict(f"{name} is the last admin: make another admin first")

    async def delete_user(self, name: str) -> None:
        async with self._lock:
            doc = await self.doc()
            user = doc.user(name)
            if user is None:
                raise NotFound(f"user {name} does not exist on this rack")
            if user.role is Role.ADMIN:
                self._keep_an_admin(doc, name)
            await self._save(replace(doc, users=tuple(u for u in doc.users if u.name != name)))

    async def new_codes(self, count: int = EMERGENCY_CODES) -> list[str]:
        """Replace every emergency code with ``count`` new ones; returns them (shown once)."""
        codes = [new_code() for _ in range(count)]
        hashes = [await self._hash(c) for c in codes]
        async with self._lock:
            doc = await self.doc()
            entries = tuple(EmergencyCode(i + 1, h) for i, h in enumerate(hashes))
            await self._save(replace(doc, codes=entries))
        return codes

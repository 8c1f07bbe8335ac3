"""Login attempts, rate-limited per user name and per source address.

Each key may fail ``free`` times; after that it is locked for a time that
doubles with every further failure (capped). Failures are forgotten after
``forget_s`` without one; a success clears the user's count (not the
address's). Time comes from an injected monotonic clock.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

USER_FREE, ADDRESS_FREE = 5, 20
BASE_LOCK_S, MAX_LOCK_S = 2.0, 900.0
FORGET_S = 900.0
MAX_KEYS = 10_000


@dataclass
class _Record:
    failures: int = 0
    last_failure: float = 0.0
    locked_until: float = 0.0


class LoginLimiter:
    def __init__(
        self,
        user_free: int = USER_FREE,
        address_free: int = ADDRESS_FREE,
        base_lock_s: float = BASE_LOCK_S,
        max_lock_s: float = MAX_LOCK_S,
        forget_s: float = FORGET_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.free = {"user": user_free, "address": address_free}
        self.base_lock_s = base_lock_s
        self.max_lock_s = max_lock_s
        self.forget_s = forget_s
        self.clock = clock
        self._records: dict[tuple[str, str], _Record] = {}

    def _record(self, kind: str, key: str) -> _Record | None:
        rec = self._records.get((kind, key))
        if rec is not None and self.clock() - rec.last_failure > self.forget_s:
            del self._records[(kind, key)]
            return None
        return rec

    def retry_after(self, user: str, address: str) -> float:
        """Seconds until an attempt for ``user`` from ``address`` is allowed (0: now)."""
        now = self.clock()
        wait = 0.0
        for kind, key in (("user", user), ("address", address)):
            rec = self._record(kind, key)
            if rec is not None:
                wait = max(wait, rec.locked_until - now)
        return max(0.0, wait)

    def failed(self, user: str, address: str) -> None:
        now = self.clock()
        if len(self._records) >= MAX_KEYS:
            self._prune(now)
        for kind, key in (("user", user), ("address", address)):
            rec = self._record(kind, key) or self._records.setdefault((kind, key), _Record())
            rec.failures += 1
            rec.last_failure = now
            over = rec.failures - self.free[kind]
            if over >= 0:
                lock = min(self.max_lock_s, self.base_lock_s * math.pow(2, min(over, 30)))
                rec.locked_until = now + lock

    def succeeded(self, user: str) -> None:
        self._records.pop(("user", user), None)

    def _prune(self, now: float) -> None:
        for key, rec in list(self._records.items()):
            if now - rec.last_failure > self.forget_s or rec.locked_until <= now:
                del self._records[key]

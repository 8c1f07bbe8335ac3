"""A check both lab console tests make: an emergency code spent on one rack is spent everywhere."""

from __future__ import annotations

import pytest

from meshcloud.lab.api import ApiError, LabApi
from meshcloud.lab.wait import wait_for


def spend_code_and_see_it_refused(
    api: LabApi, through: str, leader: str, codes: list[str], index: int = 0
) -> None:
    """Spend ``codes[index]`` through rack ``through``; the leader learns it and refuses it."""
    code = codes[index]
    assert api.request(through, "POST", "/api/v1/session", {"code": code})["emergency"]

    def spent_on_leader() -> bool:
        doc = api.get(leader, "/api/v1/console/users-doc")
        return bool(doc["emergency_codes"][index]["used"])

    wait_for(spent_on_leader, 15, "the spent code to reach the leader")
    with pytest.raises(ApiError) as refused:
        api.request(leader, "POST", "/api/v1/session", {"code": code})
    assert refused.value.status == 401

"""Fixtures for the discovery integration tests (see discovery_mesh.py)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
from discovery_mesh import Mesh, build_mesh, can_run

from meshcloud.lab import netns


@pytest.fixture
def mesh() -> Iterator[Callable[[int], Mesh]]:
    """Make a mesh of N rack namespaces (once per test); always removed afterwards."""
    reason = can_run()
    if reason:
        pytest.skip(reason)
    made: list[Mesh] = []
    prefix = f"mcd{os.getpid() % 100000}"

    def make(count: int) -> Mesh:
        assert not made, "one mesh per test"
        for name in netns.list_netns(prefix + "-"):  # leftovers of a crashed run
            netns.delete_netns(name)
        made.append(build_mesh(prefix, count))
        return made[0]

    try:
        yield make
    finally:
        for m in made:
            m.teardown()

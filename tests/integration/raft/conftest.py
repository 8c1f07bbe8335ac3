"""Fixtures for the Raft integration tests: node clusters and loopback partitions."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from raftcluster import LoopbackFirewall, RaftCluster, cleanup_leftover_tables


def _can_use_nft() -> bool:
    import os

    return os.geteuid() == 0 and shutil.which("nft") is not None


@pytest.fixture
def firewall() -> Iterator[LoopbackFirewall]:
    """A dedicated nftables table for loopback partitions, always deleted afterwards."""
    if not _can_use_nft():
        pytest.skip("needs root and nftables for loopback partitions")
    cleanup_leftover_tables()
    fw = LoopbackFirewall()
    try:
        yield fw
    finally:
        fw.delete()


@pytest.fixture
async def clusters(tmp_path: Path) -> AsyncIterator[Callable[..., RaftCluster]]:
    """Make clusters of node processes; every process is killed at the end."""
    made: list[RaftCluster] = []

    def make(mode: str, size: int = 3, **kwargs: Any) -> RaftCluster:
        cluster = RaftCluster(tmp_path / f"{mode}{len(made)}", mode, size, **kwargs)
        made.append(cluster)
        return cluster

    try:
        yield make
    finally:
        for cluster in made:
            cluster.shutdown()

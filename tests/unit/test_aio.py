"""Deadlines that never lose a cancellation (meshcloud.aio), and a daemon that always stops."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
import yaml

from meshcloud.aio import dump_tasks, wait_event, within
from meshcloud.config import load_config
from meshcloud.daemon import Daemon


async def cancelled_as_it_wakes(waiter: object) -> asyncio.Task[object]:
    """Start ``waiter``, then wake it and cancel it in the same loop iteration."""
    event = asyncio.Event()
    future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    make = waiter(event, future)  # type: ignore[operator]
    task = asyncio.create_task(make)
    await asyncio.sleep(0)  # let the task reach its wait
    event.set()
    future.set_result("ready")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(5):
            await task
    return task


def test_a_wake_and_a_cancellation_together_still_cancel() -> None:
    async def main() -> None:
        t1 = await cancelled_as_it_wakes(lambda ev, fut: wait_event(ev, 60))
        t2 = await cancelled_as_it_wakes(lambda ev, fut: within(fut, 60))
        assert t1.cancelled() and t2.cancelled()

    asyncio.run(main())


def test_deadlines_and_results() -> None:
    async def main() -> None:
        event = asyncio.Event()
        assert await wait_event(event, 0.01) is False
        event.set()
        assert await wait_event(event, 0.01) is True
        assert await wait_event(event, None) is True
        with pytest.raises(TimeoutError):
            await within(asyncio.Event().wait(), 0.01)
        assert await within(asyncio.sleep(0, result=7), None) == 7

    asyncio.run(main())


def test_stopping_the_daemon_waits_for_tasks_spawned_while_it_stops(tmp_path: Path) -> None:
    """A task that finishes a step after its cancellation and spawns another (the
    cluster task spawning the lease) must not leave the daemon waiting for ever."""
    path = tmp_path / "daemon.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "rack": {"name": "rack-1"},
                "cluster": {"secret": "s" * 40},
                "network": {"bind_address": "127.0.0.1"},
                "state_dir": str(tmp_path / "state"),
            }
        )
    )
    cfg = load_config(path)

    async def main() -> None:
        daemon = Daemon(cfg, "s" * 40)
        forever = asyncio.Event()
        started: list[str] = []

        async def child() -> None:
            started.append("child")
            await forever.wait()

        async def stubborn() -> None:
            with contextlib.suppress(asyncio.CancelledError):  # as a lost cancellation
                await forever.wait()  # would: carry on and start more work
            daemon._spawn(child(), "child")
            await asyncio.sleep(0)

        daemon._spawn(stubborn(), "stubborn")
        daemon._spawn(child(), "first-child")
        await asyncio.sleep(0)
        async with asyncio.timeout(10):
            await daemon._stop_tasks()
        assert all(t.done() for t in daemon._tasks)
        assert started == ["child"]  # the first child ran; the late one never started
        daemon._spawn(child(), "too-late")
        assert [t.get_name() for t in daemon._tasks] == ["stubborn", "first-child"]

    asyncio.run(main())


def test_the_task_dump_names_what_each_task_waits_for() -> None:
    async def inner_wait(event: asyncio.Event) -> None:
        await event.wait()

    async def outer(event: asyncio.Event) -> None:
        await inner_wait(event)

    async def main() -> str:
        event = asyncio.Event()
        task = asyncio.create_task(outer(event), name="stuck-stop")
        await asyncio.sleep(0)
        dump = dump_tasks()
        event.set()
        await task
        return dump

    dump = asyncio.run(main())
    section = dump.split("task stuck-stop:\n", 1)[1].split("task ", 1)[0]
    assert " in outer\n" in section and " in inner_wait\n" in section
    assert "thread MainThread:" in dump

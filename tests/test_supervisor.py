"""Supervisor: restarts a task that dies, gives up on one that keeps dying, stops cleanly."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from depthflow.accounting import CheckState
from depthflow.metrics import Metrics
from depthflow.supervisor import Supervisor

WAIT_S = 10.0


async def until(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT_S):
        while not predicate():  # noqa: ASYNC110 (polling a plain attribute)
            await asyncio.sleep(0.01)


def supervisor(metrics: Metrics, gave_up: list[str], limit: int = 5) -> Supervisor:
    return Supervisor(metrics, restart_limit=limit, window_s=300, on_give_up=gave_up.append)


async def test_a_task_that_raises_is_restarted_and_counted() -> None:
    metrics, gave_up = Metrics(), list[str]()
    sup = supervisor(metrics, gave_up)
    runs = 0
    healthy = asyncio.Event()

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise RuntimeError("boom")
        healthy.set()
        await asyncio.Event().wait()

    sup.start("feed", flaky)
    await asyncio.wait_for(healthy.wait(), WAIT_S)
    assert runs == 2
    assert metrics.task_restarts == {"feed": 1}
    assert metrics.errors == {"task": 1}
    assert sup.states() == {"feed": CheckState.OK}
    await sup.cancel_all()
    assert gave_up == []
    assert sup.states() == {"feed": CheckState.OK}  # stopped on purpose: not a failure


async def test_a_task_that_keeps_dying_makes_it_give_up() -> None:
    metrics, gave_up = Metrics(), list[str]()
    sup = supervisor(metrics, gave_up, limit=2)

    async def dies() -> None:
        raise RuntimeError("always")

    sup.start("writer", dies)
    await until(lambda: gave_up == ["writer"])
    assert sup.gave_up == "writer"
    assert metrics.task_restarts == {"writer": 1}  # died twice: restarted once, then gave up
    assert sup.states() == {"writer": CheckState.STOPPED}
    assert not sup.all_running


async def test_a_return_is_a_failure_but_a_oneshot_may_finish() -> None:
    metrics, gave_up = Metrics(), list[str]()
    sup = supervisor(metrics, gave_up)
    done = asyncio.Event()

    async def finishes() -> None:
        done.set()

    async def returns_early() -> None:
        return None

    sup.start("restore", finishes, oneshot=True)
    sup.start("analytics", returns_early)
    await asyncio.wait_for(done.wait(), WAIT_S)
    await until(lambda: metrics.task_restarts["analytics"] >= 1)
    assert sup.states()["restore"] is CheckState.OK
    assert "restore" not in metrics.task_restarts
    await sup.cancel_all()


async def test_join_cancels_a_task_that_does_not_stop_in_time() -> None:
    sup = supervisor(Metrics(), [])

    async def stubborn() -> None:
        await asyncio.Event().wait()

    sup.start("redis", stubborn)
    assert await sup.join("redis", timeout=0.05) is False
    assert not sup.alive("redis")


async def test_a_name_is_supervised_once() -> None:
    sup = supervisor(Metrics(), [])

    async def idle() -> None:
        await asyncio.Event().wait()

    sup.start("feed", idle)
    with pytest.raises(ValueError, match="already supervised"):
        sup.start("feed", idle)
    await sup.cancel_all()

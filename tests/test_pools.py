"""Thread pools of their own (``smtpgate.pools``): a job's budget starts when
a thread takes it; a job that finds no thread in time is refused, never run."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from smtpgate.pools import Pool, PoolBusy


async def test_a_job_waits_for_a_thread_then_gets_its_whole_budget() -> None:
    pool, gate = Pool("t", 1), threading.Event()
    blocker = asyncio.ensure_future(pool.run(gate.wait, 5))
    await asyncio.sleep(0.05)
    waiting = asyncio.ensure_future(pool.run(time.sleep, 0.3, limit=0.5))
    await asyncio.sleep(0.4)  # longer than the budget left if it counted from the queueing
    gate.set()
    await blocker
    assert await waiting is None  # ran 0.3 s of its 0.5 s, after 0.4 s in the queue


async def test_a_job_over_its_budget_times_out() -> None:
    with pytest.raises(TimeoutError):
        await Pool("t", 1).run(time.sleep, 1, limit=0.1)


async def test_no_thread_within_the_wait_is_busy_and_the_job_never_runs() -> None:
    pool, gate, ran = Pool("t", 1), threading.Event(), []
    blocker = asyncio.ensure_future(pool.run(gate.wait, 5))
    await asyncio.sleep(0.05)
    with pytest.raises(PoolBusy, match=r"no t thread free within 0\.2 s"):
        await pool.run(ran.append, "ran", limit=1, wait=0.2)
    gate.set()
    await blocker
    assert await pool.run(ran.append, "later") is None
    assert ran == ["later"]

"""A queued job's place in the cluster's queue and its estimated start (`serve.jobs.queue.Backlog`), from what
the reclaim scan reads anyway, and as GET /v1/videos/{id} shows them."""

from __future__ import annotations

import asyncio

from serve.jobs.queue import Backlog
from serve.jobs.record import new_job_id
from serve.storage import Storage
from tests.unit.test_routes import AUTH, create, run, serving, wait_status


def ids(n: int, start_ms: int = 1_700_000_000_000) -> list[str]:
    return [new_job_id(start_ms + i) for i in range(n)]


def test_position_counts_the_jobs_queued_before():
    a, b, c, later = ids(4)
    backlog = Backlog(at=100.0, waiting=((a, "t"), (b, "t"), (c, "t")), running=2)
    assert [backlog.position(j, "t") for j in (a, b, c, later)] == [0, 1, 2, 3]
    assert backlog.estimated_start(a, "t", now=100.0) is None  # no pace from one scan


def test_position_follows_the_round_robin_across_tenants():
    """One tenant's burst does not push another tenant's single job to the back: FairQueue serves one job per
    tenant per round."""
    burst = ids(100)
    (single,) = ids(1, start_ms=1_800_000_000_000)  # newer than the whole burst
    backlog = Backlog(at=0.0, waiting=tuple((j, "big") for j in burst) + ((single, "small"),), running=1)
    assert backlog.position(single, "small") == 1  # after the burst's first job only
    # the burst's third job: its own two older ones, and the single job in round one
    assert backlog.position(burst[2], "big") == 3
    assert backlog.position(burst[0], "big") == 0
    # a job not scanned yet is the newest of its tenant
    (fresh,) = ids(1, start_ms=1_900_000_000_000)
    assert backlog.position(fresh, "small") == 1 + 1 + 1  # single's round, and the burst's jobs of rounds 1, 2


def test_the_pace_is_the_jobs_that_left_the_queue_per_second():
    a, b, c, d = ids(4)
    first = Backlog(at=100.0, waiting=tuple((j, "t") for j in (a, b, c, d)), running=1)
    second = first.after_scan(110.0, [(c, "t"), (d, "t")], running=1)  # a and b started within 10 s
    assert second.starts_per_s == 0.2
    assert second.position(d, "t") == 1
    assert second.estimated_start(c, "t", now=110.0) == 115.0 and second.estimated_start(d, "t", now=110.0) == 120.0
    # smoothed: half the old pace, half the new one
    third = second.after_scan(120.0, [(d, "t")], running=1)
    assert third.starts_per_s == 0.5 * 0.2 + 0.5 * 0.1
    # nothing moved: no estimate, rather than a made-up one
    stuck = Backlog(at=0.0, waiting=((d, "t"),), running=1).after_scan(10.0, [(d, "t")], running=1)
    assert stuck.starts_per_s == 0 and stuck.estimated_start(d, "t", now=10.0) is None
    assert second.estimated_start(c, "t", now=200.0) == 200.0  # never in the past


def test_a_queued_video_reports_its_place(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage, max_concurrent=1) as env:
            env.pipeline.gate.clear()
            running = await create(env)
            await wait_status(env, running["id"], "in_progress")
            queued = [await create(env) for _ in range(2)]
            await env.runner.reclaim_once()
            await env.runner.reclaim_once()
            views = [(await env.client.get(f"/v1/videos/{v['id']}", headers=AUTH)).json() for v in queued]
            assert [v["status"] for v in views] == ["queued", "queued"]
            assert [v["queue_position"] for v in views] == [0, 1]
            assert all(v["estimated_start_at"] is None for v in views)  # nothing has started between the scans
            started = (await env.client.get(f"/v1/videos/{running['id']}", headers=AUTH)).json()
            assert started["queue_position"] is None and started["estimated_start_at"] is None
            assert env.runner.backlog is not None and env.runner.backlog.running == 1
            env.pipeline.gate.set()
            await asyncio.gather(*(wait_status(env, v["id"], "completed") for v in queued))

    run(main())

"""POST /v1/videos/sync: create, then answer with the finished video; a job that outlives the wait keeps
running and the 202 answer says where to poll it."""

from __future__ import annotations

import asyncio

from serve.jobs.service import VideoService
from serve.storage import Storage
from tests.unit.test_routes import AUTH, SMALL, assert_error, run, serving, wait_status

BODY = {"prompt": "a paper boat on a pond", **SMALL}


def test_sync_answers_with_the_finished_video(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            r = await env.client.post("/v1/videos/sync", json=BODY, headers=AUTH)
            assert r.status_code == 200, r.text
            video = r.json()
            assert video["status"] == "completed" and video["video_url"]
            assert "location" not in r.headers

    run(main())


def test_a_job_that_outlives_the_wait_keeps_running_and_says_where_to_poll(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            env.pipeline.gate.clear()  # the chain waits until released
            r = await env.client.post("/v1/videos/sync?wait_s=0.5", json=BODY, headers=AUTH)
            assert r.status_code == 202, r.text
            video = r.json()
            assert video["status"] in ("queued", "in_progress")
            assert r.headers["location"] == f"/v1/videos/{video['id']}"
            assert r.headers["openai-poll-after-ms"]
            env.pipeline.gate.set()
            done = await wait_status(env, video["id"], "completed")
            assert done.json()["id"] == video["id"] and env.pipeline.calls == 1

    run(main())


def test_sync_wakes_when_the_job_ends_here(storage: Storage, monkeypatch) -> None:
    """The wait returns as the job ends on this replica, not at the next read of the record: with re-reads 60 s
    apart, only the runner's wake-up can answer within the test's 10 s."""
    monkeypatch.setattr(VideoService, "wait_first_poll_s", 60.0)
    monkeypatch.setattr(VideoService, "wait_max_poll_s", 60.0)

    async def main() -> None:
        async with serving(storage) as env:
            env.pipeline.gate.clear()
            call = asyncio.create_task(env.client.post("/v1/videos/sync?wait_s=120", json=BODY, headers=AUTH))
            await asyncio.sleep(0.3)
            assert not call.done()
            env.pipeline.gate.set()
            r = await asyncio.wait_for(call, 10)
            assert r.status_code == 200 and r.json()["status"] == "completed"

    run(main())


def test_sync_refuses_a_wait_above_the_limit_and_creates_nothing(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            r = await env.client.post("/v1/videos/sync?wait_s=100000", json=BODY, headers=AUTH)
            assert_error(r, 400, "invalid_value", "wait_s")
            r = await env.client.post("/v1/videos/sync?wait_s=-1", json=BODY, headers=AUTH)
            assert r.status_code == 422 and r.json()["error"]["param"] == "wait_s"
            assert env.all_keys() == [] and env.pipeline.calls == 0

    run(main())


def test_sync_replays_by_idempotency_key(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            headers = {**AUTH, "Idempotency-Key": "sync-1"}
            first = await env.client.post("/v1/videos/sync", json=BODY, headers=headers)
            again = await env.client.post("/v1/videos/sync", json=BODY, headers=headers)
            assert first.status_code == again.status_code == 200
            assert first.json()["id"] == again.json()["id"] and env.pipeline.calls == 1

    run(main())


def test_the_runner_wakes_a_waiter_when_the_job_ends_here(storage: Storage) -> None:
    """`JobRunner.ended`: the terminal record as soon as this replica sees it land, None at the timeout."""
    async def main() -> None:
        async with serving(storage) as env:
            env.pipeline.gate.clear()
            video = (await env.client.post("/v1/videos", json=BODY, headers=AUTH)).json()
            assert await env.runner.ended(video["id"], 0.05) is None
            waiter = asyncio.create_task(env.runner.ended(video["id"], 30))
            await asyncio.sleep(0.05)
            env.pipeline.gate.set()
            ended = await asyncio.wait_for(waiter, 10)  # the terminal record itself: the waiter reads nothing
            assert ended is not None and ended.id == video["id"] and ended.status == "completed"
            assert (await env.client.get(f"/v1/videos/{video['id']}", headers=AUTH)).json()["status"] == "completed"

    run(main())


def test_the_default_wait_cannot_exceed_the_longest():
    import pytest
    from pydantic import ValidationError

    from serve.config import ApiConfig

    with pytest.raises(ValidationError, match="sync_wait_s .* must not exceed api.sync_max_wait_s"):
        ApiConfig(sync_wait_s=301)
    assert ApiConfig(sync_wait_s=300).sync_max_wait_s == 300


def test_every_waiter_on_one_job_is_woken_even_after_another_gave_up(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage) as env:
            env.pipeline.gate.clear()
            video = (await env.client.post("/v1/videos", json=BODY, headers=AUTH)).json()
            patient = asyncio.create_task(env.runner.ended(video["id"], 30))
            await asyncio.sleep(0.05)
            assert await env.runner.ended(video["id"], 0.05) is None  # a second waiter gives up first
            env.pipeline.gate.set()
            assert (await asyncio.wait_for(patient, 10)).status == "completed"

    run(main())

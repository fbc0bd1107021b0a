"""Idempotency-Key claims (serve/admission/idempotency.py) on the local moto S3: one winner among concurrent retries,
replays, 422 on another body, per-tenant scope, expiry, abandon, takeover of a dead winner's claim."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from serve.admission.idempotency import (
    IdempotencyConfig,
    IdempotencyStore,
    body_hash,
    canonical_body,
    validate_key,
)
from serve.api.wire import CreateVideoRequest
from serve.errors import ServiceError
from serve.jobs.record import new_job_id
from serve.storage import Storage
from tests.clock import Clock

BODY = body_hash(canonical_body({"prompt": "a cat on a skateboard", "seed": 7}))
OTHER = body_hash(canonical_body({"prompt": "a dog on a skateboard", "seed": 7}))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def idem(storage: Storage, clock: Clock) -> IdempotencyStore:
    return IdempotencyStore(storage, ttl_s=3600, takeover_after_s=30, now=clock)


def test_same_key_and_body_return_the_same_job(idem: IdempotencyStore) -> None:
    first_id, second_id = new_job_id(), new_job_id()
    first = idem.claim("acme", "order-42", BODY, first_id)
    again = idem.claim("acme", "order-42", BODY, second_id)
    assert (first.outcome, first.job_id) == ("created", first_id)
    assert (again.outcome, again.job_id) == ("replay", first_id)


def test_twenty_concurrent_claims_have_exactly_one_winner(idem: IdempotencyStore) -> None:
    ids = [new_job_id() for _ in range(20)]
    start = threading.Barrier(20)

    def claim(job_id: str) -> tuple[str, str]:
        start.wait(timeout=10)
        c = idem.claim("acme", "retry-storm", BODY, job_id)
        return c.outcome, c.job_id

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(claim, ids))
    winners = [job_id for outcome, job_id in results if outcome == "created"]
    assert len(winners) == 1
    assert {job_id for _, job_id in results} == {winners[0]}
    assert sum(outcome == "replay" for outcome, _ in results) == 19


def test_same_key_with_another_body_is_422(idem: IdempotencyStore) -> None:
    idem.claim("acme", "order-42", BODY, new_job_id())
    with pytest.raises(ServiceError) as err:
        idem.claim("acme", "order-42", OTHER, new_job_id())
    assert (err.value.status, err.value.code, err.value.param) == (422, "idempotency_key_reused", "Idempotency-Key")


def test_keys_are_scoped_per_tenant(idem: IdempotencyStore) -> None:
    a = idem.claim("acme", "order-42", BODY, new_job_id())
    b = idem.claim("globex", "order-42", OTHER, new_job_id())  # another body is fine too: another tenant's key
    assert a.outcome == b.outcome == "created" and a.job_id != b.job_id
    assert idem.record_key("acme", "order-42") != idem.record_key("globex", "order-42")
    with pytest.raises(ValueError):
        idem.record_key("acme/../globex", "order-42")


def test_an_expired_key_can_be_used_again(idem: IdempotencyStore, clock: Clock) -> None:
    old = idem.claim("acme", "order-42", BODY, new_job_id())
    clock.advance(3599)
    assert idem.claim("acme", "order-42", BODY, new_job_id()).job_id == old.job_id
    clock.advance(1)
    fresh_id = new_job_id()
    fresh = idem.claim("acme", "order-42", OTHER, fresh_id)  # expired: another body is a new request
    assert (fresh.outcome, fresh.job_id) == ("created", fresh_id)
    assert idem.claim("acme", "order-42", OTHER, new_job_id()).job_id == fresh_id


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9", "line\nbreak", "tab\tkey", "\x7f"])
def test_malformed_keys_are_400(idem: IdempotencyStore, key: str) -> None:
    with pytest.raises(ServiceError) as err:
        idem.claim("acme", key, BODY, new_job_id())
    assert (err.value.status, err.value.code, err.value.param) == (400, "invalid_idempotency_key", "Idempotency-Key")


def test_keys_up_to_255_printable_characters_are_accepted() -> None:
    for key in ["k", "x" * 255, "a b~!{}", "550e8400-e29b-41d4-a716-446655440000"]:
        assert validate_key(key) == key


def test_body_hash_depends_on_the_validated_fields_only() -> None:
    as_json = CreateVideoRequest.model_validate({"prompt": "a cat", "seed": 7, "use_dynamic_cfg": True})
    as_form = CreateVideoRequest.model_validate({"use_dynamic_cfg": "true", "seed": "7", "prompt": "a cat",
                                                 "size": None})
    h = body_hash(canonical_body(as_json.model_dump(exclude_none=True)))
    assert h == body_hash(canonical_body(as_form.model_dump(exclude_none=True)))
    assert h == body_hash(canonical_body({"seed": 7, "prompt": "a cat", "use_dynamic_cfg": True, "fps": None}))
    assert h != body_hash(canonical_body({"prompt": "a cat", "seed": 8, "use_dynamic_cfg": True}))
    assert len(h) == 64


def test_an_abandoned_claim_is_free_for_the_next_retry(idem: IdempotencyStore) -> None:
    won = idem.claim("acme", "order-42", BODY, new_job_id())
    idem.abandon("acme", "order-42", won)  # e.g. admission refused the job: no record will ever exist
    retry_id = new_job_id()
    assert idem.claim("acme", "order-42", BODY, retry_id).job_id == retry_id


# ---- resolve: what VideoService.create runs -------------------------------------------------------------------


def test_a_replay_waits_for_the_winners_job_record(idem: IdempotencyStore) -> None:
    jobs: dict[str, dict[str, Any]] = {}

    async def main() -> None:
        won = idem.claim("acme", "order-42", BODY, new_job_id())

        async def create_later() -> None:
            await asyncio.sleep(0.3)
            jobs[won.job_id] = {"id": won.job_id}

        writer = asyncio.create_task(create_later())
        got = await idem.resolve("acme", "order-42", BODY, new_job_id(), jobs.get, wait_s=10, poll_s=0.02)
        await writer
        assert (got.outcome, got.job_id, got.job) == ("replay", won.job_id, {"id": won.job_id})

    asyncio.run(main())


def test_a_replay_that_outwaits_a_live_winner_gets_409(idem: IdempotencyStore) -> None:
    idem.claim("acme", "order-42", BODY, new_job_id())
    with pytest.raises(ServiceError) as err:
        asyncio.run(idem.resolve("acme", "order-42", BODY, new_job_id(), lambda _id: None, wait_s=0.2, poll_s=0.05))
    assert (err.value.status, err.value.code) == (409, "idempotency_key_in_use")
    assert err.value.headers == {"Retry-After": "1"}


def test_a_dead_winners_claim_is_taken_over(idem: IdempotencyStore, clock: Clock) -> None:
    dead = idem.claim("acme", "order-42", BODY, new_job_id())  # its request died before writing the record
    clock.advance(31)
    taker_id = new_job_id()
    got = asyncio.run(idem.resolve("acme", "order-42", BODY, taker_id, lambda _id: None, wait_s=0))
    assert (got.outcome, got.job_id) == ("created", taker_id)
    assert idem.claim("acme", "order-42", BODY, new_job_id()).job_id == taker_id
    # the stalled winner finds out before writing its record
    assert idem.confirm("acme", "order-42", dead) is None
    mine = idem.confirm("acme", "order-42", got.claim)
    assert mine is not None and mine.job_id == taker_id and mine.etag != got.claim.etag


def test_twenty_concurrent_resolves_create_one_job(idem: IdempotencyStore) -> None:
    jobs: dict[str, dict[str, Any]] = {}
    runs: list[str] = []

    async def create() -> str:
        res = await idem.resolve("acme", "retry-storm", BODY, new_job_id(), jobs.get, wait_s=10, poll_s=0.02)
        if res.outcome == "replay":
            return res.job["id"]
        assert await asyncio.to_thread(idem.confirm, "acme", "retry-storm", res.claim) is not None
        await asyncio.sleep(0.2)  # the winner's admission + record write
        jobs[res.job_id] = {"id": res.job_id}
        runs.append(res.job_id)
        return res.job_id

    async def main() -> list[str]:
        return await asyncio.gather(*(create() for _ in range(20)))

    ids = asyncio.run(main())
    assert len(runs) == 1 and set(ids) == {runs[0]}


def test_config_builds_the_store(storage: Storage) -> None:
    cfg = IdempotencyConfig(ttl_s=60, takeover_after_s=5)
    store = IdempotencyStore.from_config(storage, cfg)
    assert (store.ttl_s, store.takeover_after_s) == (60, 5)
    assert all(f.description for f in IdempotencyConfig.model_fields.values())

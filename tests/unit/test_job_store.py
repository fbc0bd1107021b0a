"""JobStore against a local moto S3: CAS updates, leases, listing, deletion and the progress side channel."""

from __future__ import annotations

import threading

import pytest
from pydantic import ValidationError

from serve.config import S3Config
from serve.jobs.record import JobError, JobRecord, JobResult, job_created_ms, new_job_id
from serve.jobs.store import JobExists, JobNotFound, JobStore
from serve.storage import PreconditionFailed, Storage
from tests.clock import T0, Clock
from tests.params import example_params


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(s3_config: S3Config, clock: Clock) -> JobStore:
    st = Storage.from_config(s3_config)
    st.ensure_bucket()
    return JobStore(st, retention_s=3600, now=clock)


def make_record(created_ms: int | None = None, tenant: str = "default", **kw: object) -> JobRecord:
    ms = int(T0 * 1000) if created_ms is None else created_ms
    fields = {"model": "cogvideox-tiny-2b", "prompt": "a cat", "params": example_params(num_inference_steps=50, seed=1), **kw}
    return JobRecord(id=new_job_id(ms), tenant=tenant, created_at=ms // 1000, **fields)


# ---- ids and the record ---------------------------------------------------------------------------------------


def test_job_ids_sort_by_creation_time() -> None:
    a, b = new_job_id(1_000), new_job_id(1_001)
    assert a < b and len(a) == len("video_") + 28
    assert job_created_ms(a) == 1_000
    with pytest.raises(ValueError):
        job_created_ms("video_../../x")


def test_record_rejects_tenant_that_could_escape_its_prefix() -> None:
    with pytest.raises(ValidationError):
        make_record(tenant="a/b")


# ---- create / get / update ------------------------------------------------------------------------------------


def test_create_get_and_conditional_create(store: JobStore) -> None:
    rec = store.create(make_record())
    assert rec.version == 1 and rec.updated_at == T0
    assert store.get(rec.id) == rec
    assert store.get("video_nope") is None and store.get("../jobs/x") is None

    # The same record again (a retried PUT whose first answer was lost) is not a conflict ...
    assert store.create(rec) == rec
    # ... a different record under the same id is.
    with pytest.raises(JobExists) as info:
        store.create(rec.model_copy(update={"prompt": "a dog"}))
    assert isinstance(info.value, PreconditionFailed)
    assert store.get(rec.id).prompt == "a cat"


def test_update_bumps_version_and_none_means_no_write(store: JobStore) -> None:
    rec = store.create(make_record())

    def start(r: JobRecord) -> JobRecord:
        r.status, r.attempts = "in_progress", r.attempts + 1
        return r

    updated = store.update(rec.id, start)
    assert (updated.status, updated.attempts, updated.version) == ("in_progress", 1, 2)
    assert store.update(rec.id, lambda r: None).version == 2

    def boom(r: JobRecord) -> JobRecord:
        raise RuntimeError("abort")

    with pytest.raises(RuntimeError):
        store.update(rec.id, boom)
    assert store.get(rec.id).version == 2
    with pytest.raises(JobNotFound):
        store.update(new_job_id(1), start)


def test_concurrent_updates_do_not_lose_writes(store: JobStore) -> None:
    rec = store.create(make_record())
    # Both threads read the same version before either writes, so one write must lose and be re-applied.
    both_read = threading.Barrier(2, timeout=10)
    calls: list[str] = []

    def mutate_for(name: str):
        def mutate(r: JobRecord) -> JobRecord:
            calls.append(name)
            if calls.count(name) == 1:
                both_read.wait()
            r.timings[name] = 1.0
            return r

        return mutate

    results: dict[str, JobRecord] = {}
    threads = [
        threading.Thread(target=lambda n=n: results.__setitem__(n, store.update(rec.id, mutate_for(n))))
        for n in ("a", "b")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)

    final = store.get(rec.id)
    assert final.version == rec.version + 2
    assert final.timings == {"a": 1.0, "b": 1.0}
    assert len(calls) == 3  # one of the two re-read and re-applied
    assert sorted(r.version for r in results.values()) == [2, 3]


# ---- leases ---------------------------------------------------------------------------------------------------


def test_two_owners_racing_for_a_lease_exactly_one_wins(store: JobStore) -> None:
    rec = store.create(make_record())
    start = threading.Barrier(2, timeout=10)
    won: dict[str, JobRecord | None] = {}

    def race(owner: str) -> None:
        start.wait()
        won[owner] = store.try_acquire_lease(rec.id, owner, lease_s=30)

    threads = [threading.Thread(target=race, args=(o,)) for o in ("replica-a", "replica-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)

    winners = [o for o, r in won.items() if r is not None]
    assert len(winners) == 1
    final = store.get(rec.id)
    assert final.lease_owner == winners[0] and final.lease_expires_at == T0 + 30
    assert (final.attempts, final.status) == (0, "queued")  # the lease alone changes nothing else


def test_expired_lease_is_taken_over_and_loser_sees_it(store: JobStore, clock: Clock) -> None:
    rec = store.create(make_record())
    assert store.try_acquire_lease(rec.id, "a", lease_s=30) is not None
    assert store.try_acquire_lease(rec.id, "b", lease_s=30) is None
    assert store.try_acquire_lease(rec.id, "a", lease_s=30) is not None  # re-acquire by the holder is fine

    clock.advance(10)
    renewed = store.renew_lease(rec.id, "a", lease_s=30)
    assert renewed is not None and renewed.lease_expires_at == T0 + 40

    clock.advance(41)  # a stopped heartbeating
    taken = store.try_acquire_lease(rec.id, "b", lease_s=30)
    assert taken is not None and taken.lease_owner == "b"
    assert store.renew_lease(rec.id, "a", lease_s=30) is None
    assert store.finish(rec.id, "a", "completed") is None
    assert store.release_lease(rec.id, "a") is None

    # The heartbeat returns the record, so the holder sees a cancel request.
    store.update(rec.id, lambda r: r.model_copy(update={"cancel_requested": True}))
    assert store.renew_lease(rec.id, "b", lease_s=30).cancel_requested

    released = store.release_lease(rec.id, "b")
    assert released.lease_owner is None
    assert store.try_acquire_lease(rec.id, "c", lease_s=30).lease_owner == "c"


def test_finish_is_terminal_and_removes_active_marker(store: JobStore, clock: Clock) -> None:
    rec = store.create(make_record())
    other = store.create(make_record())
    assert sorted(store.list_active_ids()) == sorted([rec.id, other.id])

    store.try_acquire_lease(rec.id, "a", lease_s=30)
    store.put_progress(rec.id, "denoising", 3, 50)
    clock.advance(5)
    result = JobResult(video_key="videos/default/x.mp4", cover_key="videos/default/x.jpg")
    done = store.finish(rec.id, "a", "completed", result=result, timings={"denoise_s": 2.5})
    assert done is not None
    assert (done.status, done.progress, done.lease_owner, done.result) == ("completed", 100, None, result)
    assert done.completed_at == int(T0 + 5) and done.expires_at == int(T0 + 5) + 3600
    assert done.timings == {"denoise_s": 2.5}
    assert store.list_active_ids() == [other.id]
    assert store.get_progress(rec.id) is None

    # Terminal is final: no second finish, no new lease.
    assert store.finish(rec.id, "a", "failed") is None
    assert store.try_acquire_lease(rec.id, "b", lease_s=30) is None
    with pytest.raises(ValueError):
        store.finish(other.id, None, "in_progress")

    # A queued job nobody holds can be finished without an owner (cancel before start).
    cancelled = store.finish(other.id, None, "cancelled", error=JobError(code="cancelled", message="by user"))
    assert cancelled.status == "cancelled" and cancelled.error.code == "cancelled"
    assert store.list_active_ids() == []


# ---- listing and deletion -------------------------------------------------------------------------------------


def test_list_newest_first_with_pagination(store: JobStore) -> None:
    base = int(T0 * 1000)
    ids = [store.create(make_record(created_ms=base + i)).id for i in range(5)]
    store.create(make_record(created_ms=base + 10, tenant="acme"))
    newest_first = ids[::-1]

    page1, more1 = store.list(limit=2, tenant="default")
    assert [r.id for r in page1] == newest_first[:2] and more1
    page2, more2 = store.list(limit=2, after=page1[-1].id, tenant="default")
    assert [r.id for r in page2] == newest_first[2:4] and more2
    page3, more3 = store.list(limit=2, after=page2[-1].id, tenant="default")
    assert [r.id for r in page3] == newest_first[4:] and not more3
    exact, more = store.list(limit=5, tenant="default")
    assert [r.id for r in exact] == newest_first and not more

    acme, _ = store.list(tenant="acme")
    assert len(acme) == 1 and acme[0].tenant == "acme"

    # Deleted jobs are gone from the listing, and has_more stays exact around them.
    store.delete(ids[3])
    page, more = store.list(limit=3, tenant="default")
    assert [r.id for r in page] == [ids[4], ids[2], ids[1]] and more
    # A marker whose record is gone (crash mid-delete) is skipped too.
    store.storage.delete(store.record_key(ids[0]))
    page, more = store.list(limit=3, tenant="default")
    assert [r.id for r in page] == [ids[4], ids[2], ids[1]] and not more


def test_delete_removes_record_and_markers(store: JobStore) -> None:
    rec = store.create(make_record())
    store.try_acquire_lease(rec.id, "a", lease_s=30)
    store.put_progress(rec.id, "denoising", 1, 50)

    gone = store.delete(rec.id)
    assert gone is not None and gone.deleted and gone.cancel_requested
    assert store.get(rec.id) is None
    for key in (
        store.record_key(rec.id),
        *store.index_keys(rec.tenant, rec.id),
        store.active_key(rec.id),
        store.progress_key(rec.id),
    ):
        assert not store.storage.exists(key), key
    assert store.renew_lease(rec.id, "a", lease_s=30) is None  # the runner learns it should stop
    assert store.delete(rec.id) is None


# ---- oldest first (order=asc) and the ascending index ---------------------------------------------------------


def newest_first(ids: list[str]) -> list[str]:
    """The order `desc` has always had: newest millisecond first, ids ascending within one millisecond."""
    return sorted(ids, key=lambda i: (-job_created_ms(i), i))


def all_pages(store: JobStore, tenant: str, order: str, limit: int) -> list[tuple[list[str], bool]]:
    """Every page from the first, each asked for with `after` = the last id of the page before."""
    pages: list[tuple[list[str], bool]] = []
    after = None
    for _ in range(50):
        page, more = store.list(limit=limit, after=after, tenant=tenant, order=order)
        pages.append(([r.id for r in page], more))
        if not more:
            return pages
        after = page[-1].id
    raise AssertionError(f"no last page after 50: {pages[-3:]}")


def listed(store: JobStore, tenant: str, order: str) -> list[str]:
    return [r.id for r in store.list(limit=100, tenant=tenant, order=order)[0]]


def create_old_layout(store: JobStore, record: JobRecord) -> JobRecord:
    """What `create` wrote before the ascending index existed: active marker, newest-first marker, record."""
    rec = record.model_copy(update={"version": 1, "updated_at": T0})
    store.storage.put_bytes(store.active_key(rec.id), b"", "application/octet-stream")
    store.storage.put_bytes(store.index_key(rec.tenant, rec.id), b"", "application/octet-stream")
    store.storage.put_if_absent(store.record_key(rec.id), rec.to_json_bytes())
    return rec


def test_list_oldest_first_pages_with_after_and_is_the_exact_reverse_of_newest_first(store: JobStore) -> None:
    base = int(T0 * 1000)
    # three jobs share one millisecond: the tie order must reverse too, and a page boundary falls inside it
    ids = [store.create(make_record(created_ms=base + ms)).id for ms in (0, 1, 1, 1, 2, 5, 9)]
    other = [store.create(make_record(created_ms=base + ms, tenant="acme")).id for ms in (3, 4)]
    oldest_first = newest_first(ids)[::-1]

    pages = all_pages(store, "default", "asc", limit=2)
    assert pages == [(oldest_first[0:2], True), (oldest_first[2:4], True), (oldest_first[4:6], True),
                     (oldest_first[6:], False)]
    assert [i for page, _ in all_pages(store, "default", "desc", limit=2) for i in page] == newest_first(ids)
    assert listed(store, "default", "asc") == listed(store, "default", "desc")[::-1] == oldest_first
    # a page size that divides the count: has_more is exact, the last page is not followed by an empty one
    assert all_pages(store, "default", "asc", limit=7) == [(oldest_first, False)]
    # `after` is strictly past that id in the asked order, whichever order
    for order, expected in (("asc", oldest_first), ("desc", newest_first(ids))):
        for n, after in enumerate(expected):
            page, more = store.list(limit=100, after=after, tenant="default", order=order)
            assert [r.id for r in page] == expected[n + 1 :] and not more, (order, n)
    # tenants see only their own, in both orders
    assert listed(store, "acme", "asc") == other and listed(store, "acme", "desc") == other[::-1]
    with pytest.raises(ValueError, match="'asc' or 'desc'"):
        store.list(tenant="default", order="sideways")  # type: ignore[arg-type]


def test_deleted_and_half_written_jobs_vanish_from_both_orders(store: JobStore) -> None:
    base = int(T0 * 1000)
    ids = [store.create(make_record(created_ms=base + i)).id for i in range(5)]
    for key in store.index_keys("default", ids[2]):
        assert store.storage.exists(key), key

    store.delete(ids[2])
    for key in store.index_keys("default", ids[2]):
        assert not store.storage.exists(key), key
    assert listed(store, "default", "asc") == [ids[0], ids[1], ids[3], ids[4]]
    assert listed(store, "default", "desc") == [ids[4], ids[3], ids[1], ids[0]]
    # has_more stays exact around the gap: 2 of 4 live jobs, then the rest
    assert all_pages(store, "default", "asc", limit=2) == [([ids[0], ids[1]], True), ([ids[3], ids[4]], False)]

    # a DELETE that died after marking the record: both markers still there, the job hidden in both orders ...
    store.update(ids[1], lambda r: r.model_copy(update={"deleted": True}))
    assert listed(store, "default", "asc") == [ids[0], ids[3], ids[4]]
    assert listed(store, "default", "desc") == [ids[4], ids[3], ids[0]]
    # ... and the retried DELETE removes both markers
    assert store.delete(ids[1]) is not None
    for key in [*store.index_keys("default", ids[1]), store.record_key(ids[1])]:
        assert not store.storage.exists(key), key

    # a create that died between its markers (one or both index markers, no record) lists nothing, in either order
    half = make_record(created_ms=base + 3)
    store.storage.put_bytes(store.index_key("default", half.id), b"", "application/octet-stream")
    both = make_record(created_ms=base + 4)
    for key in store.index_keys("default", both.id):
        store.storage.put_bytes(key, b"", "application/octet-stream")
    assert listed(store, "default", "asc") == [ids[0], ids[3], ids[4]]
    assert listed(store, "default", "desc") == [ids[4], ids[3], ids[0]]
    assert store.list(limit=1, after=ids[3], tenant="default", order="asc")[0][0].id == ids[4]


def test_backfill_gives_jobs_from_before_the_ascending_index_their_marker(s3_config: S3Config, clock: Clock) -> None:
    st = Storage.from_config(s3_config)
    st.ensure_bucket()
    store = JobStore(st, now=clock, index_page=3)  # small pages: boundaries inside a tenant and between tenants
    base = int(T0 * 1000)
    old = [create_old_layout(store, make_record(created_ms=base + ms)).id for ms in (0, 1, 1, 2, 4, 6, 7)]
    new = [store.create(make_record(created_ms=base + ms)).id for ms in (1, 3, 8)]
    # "acme-eu" starts with "acme": the tenant prefixes must not overlap
    acme = [create_old_layout(store, make_record(created_ms=base + ms, tenant="acme")).id for ms in (2, 5)]
    acme_eu = [create_old_layout(store, make_record(created_ms=base + 1, tenant="acme-eu")).id]
    everything = old + new

    # before: oldest first shows only what was created with both markers; newest first shows everything
    assert listed(store, "default", "asc") == newest_first(new)[::-1]
    assert listed(store, "default", "desc") == newest_first(everything)

    assert store.backfill_ascending_index("default") == len(old)
    assert listed(store, "default", "asc") == newest_first(everything)[::-1]
    paged = [i for page, _ in all_pages(store, "default", "asc", limit=4) for i in page]
    assert paged == newest_first(everything)[::-1]
    assert listed(store, "acme", "asc") == [] and listed(store, "acme-eu", "asc") == []  # one tenant's only

    assert store.backfill_ascending_index("acme") == len(acme)
    assert listed(store, "acme", "asc") == newest_first(acme)[::-1] and listed(store, "acme-eu", "asc") == []
    assert store.backfill_ascending_index() == len(acme_eu)  # all tenants: only what is still missing
    assert listed(store, "acme-eu", "asc") == acme_eu
    assert store.backfill_ascending_index() == 0  # idempotent: safe at every ingress start
    # nothing but the missing markers was written: one per job, each the marker `create` writes today
    asc_markers = st.list_keys(st.key("index-asc", ""))
    assert sorted(asc_markers) == sorted(store.asc_index_key(r.tenant, r.id) for r in
                                         (store.get(i) for i in everything + acme + acme_eu))

    # a backfilled job deletes like any other: gone from both orders, no marker left
    store.delete(old[3])
    assert old[3] not in listed(store, "default", "asc") + listed(store, "default", "desc")
    assert not any(st.exists(k) for k in store.index_keys("default", old[3]))


class DeletesAfterListing(Storage):
    """A DELETE racing the backfill: the job goes right after the backfill listed its newest-first marker."""

    victim: tuple[JobStore, str] | None = None

    def list_keys(self, prefix: str, start_after: str | None = None, max_keys: int = 1000) -> list[str]:
        keys = super().list_keys(prefix, start_after=start_after, max_keys=max_keys)
        if self.victim is not None and prefix == self.key("index", ""):
            store, job_id = self.victim
            self.victim = None
            store.delete(job_id)
        return keys


def test_backfill_racing_a_delete_leaves_no_marker_of_the_deleted_job(s3_config: S3Config, clock: Clock) -> None:
    st = DeletesAfterListing(s3_config)
    st.ensure_bucket()
    store = JobStore(st, now=clock)
    base = int(T0 * 1000)
    kept, doomed = (create_old_layout(store, make_record(created_ms=base + i)).id for i in range(2))
    st.victim = (store, doomed)

    assert store.backfill_ascending_index() == 1
    assert st.victim is None  # the race did happen
    assert listed(store, "default", "asc") == [kept]
    assert st.list_keys(st.key("index-asc", "")) == [store.asc_index_key("default", kept)]


# ---- progress side channel ------------------------------------------------------------------------------------


def test_progress_side_channel_merges_without_touching_the_record(store: JobStore, clock: Clock) -> None:
    rec = store.create(make_record())
    store.try_acquire_lease(rec.id, "a", lease_s=30)
    running = store.update(
        rec.id, lambda r: r.model_copy(update={"status": "in_progress", "stage": "encoding", "attempts": 1})
    )
    assert store.merge_progress(running) == running  # nothing written yet

    clock.advance(1)
    assert store.put_progress(rec.id, "denoising", 25, 50, attempt=1)
    assert store.get_progress(rec.id).step == 25
    # Progress writes do not touch the record, so the lease CAS right after them succeeds at once.
    assert store.renew_lease(rec.id, "a", lease_s=30).version == running.version + 1

    shown = store.merge_progress(store.get(rec.id))
    assert (shown.stage, shown.step, shown.total_steps) == ("denoising", 25, 50)
    assert 5 < shown.progress < 90

    # The record moved past denoising: a late progress write does not pull it back.
    decoding = store.update(rec.id, lambda r: r.model_copy(update={"stage": "decoding", "progress": 90}))
    store.put_progress(rec.id, "denoising", 50, 50, attempt=1)
    assert store.merge_progress(decoding).stage == "decoding"

    # Progress from an earlier attempt is ignored.
    retry = store.update(rec.id, lambda r: r.model_copy(update={"stage": "encoding", "attempts": 2}))
    assert store.merge_progress(retry).stage == "encoding"

    # Only running jobs are merged.
    queued = store.create(make_record())
    store.put_progress(queued.id, "denoising", 5, 50)
    assert store.merge_progress(queued) == queued


def test_a_remembered_version_that_is_stale_costs_one_lost_write_and_the_stored_record_decides(
        s3_config: S3Config, clock: Clock) -> None:
    """Each store starts a compare-and-swap from the version it saw last (no GET); another replica's write in
    between makes that conditional PUT lose, and the change is applied again on the stored record."""
    mine = JobStore(Storage(s3_config), now=clock)
    mine.storage.ensure_bucket()
    theirs = JobStore(Storage(s3_config), now=clock)
    rec = mine.create(make_record())
    assert mine.try_acquire_lease(rec.id, "me", lease_s=30) is not None
    theirs.update(rec.id, lambda r: r.model_copy(update={"cancel_requested": True}))  # a DELETE elsewhere
    renewed = mine.renew_lease(rec.id, "me", lease_s=30)
    assert renewed is not None and renewed.cancel_requested and renewed.version == 4  # the heartbeat sees it


def test_a_refusal_is_never_decided_on_a_remembered_version(s3_config: S3Config, clock: Clock) -> None:
    mine = JobStore(Storage(s3_config), now=clock)
    mine.storage.ensure_bucket()
    theirs = JobStore(Storage(s3_config), now=clock)
    rec = mine.create(make_record())
    assert theirs.try_acquire_lease(rec.id, "other", lease_s=30) is not None
    mine.get(rec.id)  # remembered: leased by "other", for 30 s
    assert theirs.release_lease(rec.id, "other") is not None  # ...which gave it back since
    # on the remembered version the lease is not free; the stored one is, and it decides
    taken = mine.try_acquire_lease(rec.id, "me", lease_s=30)
    assert taken is not None and taken.lease_owner == "me"
